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
