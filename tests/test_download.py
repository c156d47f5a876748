"""tools/download_coco.sh offline: lint, argument handling, the checksum step, and a resumed fetch."""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "tools" / "download_coco.sh"
SHELLCHECK = REPO / ".venv" / "bin" / "shellcheck"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.skipif(not SHELLCHECK.exists() and not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck_clean():
    shellcheck = str(SHELLCHECK) if SHELLCHECK.exists() else shutil.which("shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_arguments():
    assert run("--help").returncode == 0 and "--check-md5" in run("--help").stdout
    assert run().returncode == 2 and "DIR" in run().stderr
    assert run("--bogus").returncode == 2
    too_many = run("a", "b")
    assert too_many.returncode == 1 and "one folder" in too_many.stderr
    assert "takes FILE and MD5" in run("--check-md5", "only-a-file").stderr


def test_checksum_step_on_a_local_file(tmp_path):
    archive = tmp_path / "val2017.zip"
    archive.write_bytes(b"not really a zip, but bytes with a known MD5")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert run("--check-md5", archive, md5).returncode == 0
    wrong = run("--check-md5", archive, "442b8da7639aecaf257c1dceb8ba8c80")
    assert wrong.returncode == 1
    assert f"{archive} has MD5 {md5}, expected 442b8da7639aecaf257c1dceb8ba8c80" in wrong.stderr
    assert "does not exist" in run("--check-md5", tmp_path / "missing.zip", md5).stderr


def test_download_resumes_and_stops_at_a_bad_checksum(tmp_path):
    """A stand-in curl records its arguments and delivers wrong bytes: the script must stop there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "curl_args"
    fake_curl = bin_dir / "curl"
    fake_curl.write_text(
        '#!/usr/bin/env bash\necho "$@" >> "%s"\n'
        'while [[ $# -gt 0 ]]; do [[ $1 == --output ]] && echo partial >> "$2"; shift; done\n' % log
    )
    fake_curl.chmod(0o755)
    (bin_dir / "unzip").write_text("#!/bin/sh\nexit 1\n")  # present, so the test runs where unzip is not
    (bin_dir / "unzip").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run(tmp_path / "coco", env=env)
    assert result.returncode == 1
    assert "annotations_trainval2017.zip has MD5" in result.stderr
    assert "expected f4bbac642086de4f52a3fdda2de5fa2c" in result.stderr
    args = log.read_text()
    assert "--continue-at -" in args
    assert "http://images.cocodataset.org/annotations/annotations_trainval2017.zip" in args


# --- tools/download_weights.py: the public weights, checked, from local files (no network here) ---------

def _weights(*argv) -> int:
    from tools.download_weights import get_args_parser, main

    return main(get_args_parser().parse_intermixed_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def detectron_pickle(tmp_path_factory):
    """A file made as Detectron's R-50.pkl is (a protocol-2 pickle of named numpy blobs), with random values."""
    import pickle

    import numpy as np

    from tests.test_model_weights import msra_r50_blobs

    blobs, _ = msra_r50_blobs(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("mirror") / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    return path


def test_weights_come_from_a_mirror_checked_and_are_checked_again_when_there(detectron_pickle, tmp_path, capsys):
    out = tmp_path / "weights"
    assert _weights("r50-msra", "--out", out, "--mirror", detectron_pickle.parent.as_uri()) == 0
    said = capsys.readouterr().out
    assert (out / "R-50.pkl").read_bytes() == detectron_pickle.read_bytes() and not list(out.glob("*.part.*"))
    digest = hashlib.sha256(detectron_pickle.read_bytes()).hexdigest()
    assert f"downloading {detectron_pickle.parent.as_uri()}/R-50.pkl" in said
    assert f"{out / 'R-50.pkl'}: checked; sha256 {digest}" in said
    assert _weights("r50-msra", "--out", out) == 0  # there already: checked, not fetched (no network needed)
    said = capsys.readouterr().out
    assert "downloading" not in said and f"{out / 'R-50.pkl'}: checked; sha256 {digest}" in said


@pytest.mark.slow  # torch.hub's own check, on a 150 MB file
def test_a_published_sha256_prefix_is_checked(detectron_pickle, tmp_path):
    from tools.download_weights import DownloadError, Published, fetch

    prefix = hashlib.sha256(detectron_pickle.read_bytes()).hexdigest()[:8]
    url = detectron_pickle.as_uri()
    assert fetch(Published("r50-msra", url, prefix, ()), url, tmp_path).read_bytes() == detectron_pickle.read_bytes()
    wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
    (tmp_path / "again").mkdir()
    with pytest.raises(DownloadError, match=f"has another SHA-256 than the published file's, which begins with {wrong}"):
        fetch(Published("r50-msra", url, wrong, ()), url, tmp_path / "again")
    assert not any((tmp_path / "again").iterdir())


@pytest.mark.parametrize("case", ["torchvision bytes", "damaged pickle", "unreachable"])
def test_a_file_that_fails_its_check_is_not_kept_and_is_one_sentence(case, tmp_path, capsys):
    import pickle

    mirror, out = tmp_path / "mirror", tmp_path / "out"
    mirror.mkdir()
    if case == "torchvision bytes":  # its published name carries the SHA-256 prefix torch.hub checks
        name, expected = "maskrcnn-coco", "has another SHA-256 than the published file's, which begins with bf2d0c1e"
        (mirror / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth").write_bytes(b"not the published file")
    elif case == "damaged pickle":  # no checksum is published: the content must load (here a blob of 2 is all)
        import numpy as np

        (mirror / "R-50.pkl").write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, protocol=2))
        name, expected = "r50-msra", "does not load as R-50.pkl (Detectron R-50.pkl "
    else:
        mirror = tmp_path / "nowhere"
        name, expected = "r50-msra", f"cannot download {mirror.as_uri()}/R-50.pkl ("
    assert _weights(name, "--out", out, "--mirror", mirror.as_uri()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not any(out.iterdir())  # neither the file nor its .part
