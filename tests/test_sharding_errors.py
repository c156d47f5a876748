"""`tools/shard_coco.py` faults a user can cause: one sentence on stderr, exit status 2, nothing lost.

Every case runs the real command line in a subprocess. "Nothing lost" is checked byte for byte:
the shard set that was in --out before a failed run is still there, unchanged and verifiable,
and nothing temporary is left beside it.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.shard_format import read_index
from pipeline.sharding import shard_coco, verify_shards

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(120)


def run_cli(*argv, limit_file_size: int | None = None, drop_root_powers: bool = False) -> subprocess.CompletedProcess:
    """Run tools/shard_coco.py; optionally under a file size limit, or as root without its permission override."""
    command = [sys.executable, "tools/shard_coco.py", *map(str, argv)]
    if drop_root_powers and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          preexec_fn=limit if limit_file_size else None)


def assert_clear_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit status 2 and one `shard_coco: ...` sentence as the last line of stderr (a progress bar may precede it)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("shard_coco: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and beside it (the parent's other entries), by relative path."""
    files = {str(p.relative_to(folder.parent)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return {**files, **{f"../{p.name}": b"" for p in folder.parent.iterdir() if p != folder}}


def shard_val(synthetic_coco, out: Path, **kwargs) -> None:
    shard_coco(synthetic_coco.val_images, synthetic_coco.val_json, out, mode="eval", samples_per_shard=4, **kwargs)


def val_args(synthetic_coco, out: Path, *more) -> list:
    return ["--images", synthetic_coco.val_images, "--annotations", synthetic_coco.val_json, "--out", out,
            "--mode", "eval", "--samples-per-shard", 100, *more]


@pytest.fixture
def shard_copy(val_shards, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(val_shards, copy)
    return copy


# ----------------------------------------------------------------------------- a failed re-shard loses nothing


def test_a_re_shard_that_runs_out_of_space_leaves_the_previous_set_as_it_was(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    shard_val(synthetic_coco, out)
    before = snapshot(out)
    # A file size limit makes the first tar fail as a full disk would, in the real command line.
    result = run_cli(*val_args(synthetic_coco, out), limit_file_size=20_000)
    assert_clear_error(result, f"cannot write the shards for {out}", "File too large", "the shard set there is unchanged")
    assert snapshot(out) == before
    verify_shards(out)


def test_no_space_left_on_device_is_one_sentence(synthetic_coco, tmp_path, monkeypatch, capsys):
    """ENOSPC itself, in the tool's `main`, with the writer failing as a full disk makes it fail."""
    import pipeline.shard_format as shard_format
    from test_sharding import shard_tool

    out = tmp_path / "out"
    shard_val(synthetic_coco, out)
    before = snapshot(out)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_format._HashingWriter, "write", full_disk)
    args = shard_tool.get_args_parser().parse_args([str(a) for a in val_args(synthetic_coco, out)])
    assert shard_tool.main(args) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in message and "free some space" in message and "unchanged" in message
    assert snapshot(out) == before


def test_a_first_run_that_fails_leaves_no_folder_behind(synthetic_coco, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    result = run_cli(*val_args(synthetic_coco, out), limit_file_size=20_000)
    assert_clear_error(result, "File too large", "nothing was left behind")
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it created


def test_ctrl_c_while_sharding_leaves_the_previous_set_as_it_was(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    shard_val(synthetic_coco, out)
    images = tmp_path / "images"
    shutil.copytree(synthetic_coco.val_images, images)
    blocking = sorted(images.iterdir())[-1]
    blocking.unlink()
    os.mkfifo(blocking)  # reading it blocks for ever: the run is certainly still going when Ctrl-C comes
    before = snapshot(out)
    process = subprocess.Popen(
        [sys.executable, "tools/shard_coco.py", "--images", images, "--annotations", synthetic_coco.val_json,
         "--out", out, "--mode", "eval"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    staging = out.with_name(f".out.incoming-{process.pid}")
    deadline = time.monotonic() + 60
    while not staging.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staging.exists()
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"shard_coco: stopped by SIGINT; {out} is as it was before this run: run the same command again"
    assert snapshot(out) == before


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    abandoned = out.with_name(f".out.incoming-{_dead_pid()}")
    abandoned.mkdir()
    (abandoned / "val-landscape-000000.tar.tmp").write_bytes(b"half a shard")
    result = run_cli(*val_args(synthetic_coco, out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    verify_shards(out)


def _dead_pid() -> int:
    """The id of a process that has ended (as a run killed with -9 has)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    shard_val(synthetic_coco, out)
    out.with_name(f".out.incoming-{os.getpid()}").mkdir()  # this test's process stands for a running sharder
    before = snapshot(out)
    result = run_cli(*val_args(synthetic_coco, out))
    assert_clear_error(result, f"another shard_coco run (process {os.getpid()}) is writing {out}")
    assert snapshot(out) == before


def test_a_successful_re_shard_replaces_the_set_and_keeps_the_folder_mode(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    shard_val(synthetic_coco, out)
    out.chmod(0o751)
    assert run_cli(*val_args(synthetic_coco, out)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o751
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2  # one per group at 100 per shard
    verify_shards(out)


# ----------------------------------------------------------------------------- where --out points


def test_out_that_is_a_file(synthetic_coco, tmp_path):
    out = tmp_path / "shards"
    out.write_text("my notes")
    assert_clear_error(run_cli(*val_args(synthetic_coco, out)), f"--out {out} is a file, not a folder")
    assert out.read_text() == "my notes" and sorted(tmp_path.iterdir()) == [out]


def test_out_below_a_file(synthetic_coco, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli(*val_args(synthetic_coco, tmp_path / "file" / "shards"))
    assert_clear_error(result, f"lies under {tmp_path / 'file'}, which is a file")


def test_out_that_holds_other_files_is_refused_not_emptied(synthetic_coco, tmp_path):
    out = tmp_path / "data"
    (out / "train2017").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    result = run_cli(*val_args(synthetic_coco, out))
    assert_clear_error(result, "holds files that are not part of a shard set (notes.txt, train2017)")
    assert snapshot(out) == before


def test_out_that_is_a_mount_point(synthetic_coco):
    assert_clear_error(run_cli(*val_args(synthetic_coco, "/")), "--out / is a mount point", "pass a folder inside it")


@pytest.mark.parametrize("existing", [True, False], ids=["read-only folder", "in a read-only folder"])
def test_out_that_cannot_be_written(synthetic_coco, tmp_path, existing):
    parent = tmp_path / "parent"
    out = parent / "shards"
    out.mkdir(parents=True) if existing else parent.mkdir()
    (out if existing else parent).chmod(0o555)
    try:
        result = run_cli(*val_args(synthetic_coco, out), drop_root_powers=True)
        assert_clear_error(result, "read-only")
        assert list(parent.iterdir()) == ([out] if existing else [])
        assert not existing or list(out.iterdir()) == []
    finally:
        (out if existing else parent).chmod(0o755)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_json(synthetic_coco, tmp_path):
    """Write a changed copy of the val annotations; returns the writer."""
    def write(change) -> Path:
        data = json.loads(synthetic_coco.val_json.read_text())
        data = change(data) or data
        path = tmp_path / "instances_bad.json"
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return path
    return write


def _first_annotation(data: dict) -> dict:
    return data["annotations"][0]


def _first_polygon(data: dict) -> list:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))["segmentation"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "{not json", "is not valid JSON"),
        (lambda d: [d], "not in COCO instances format"),
        (lambda d: d.pop("categories") and None, "not in COCO instances format"),
        (lambda d: _first_annotation(d).pop("bbox") and None, "lacks a valid 'bbox'"),
        (lambda d: _first_annotation(d).update(bbox=[1, 2, "3", 4]), "has a bbox that is not 4 numbers"),
        (lambda d: _first_annotation(d).update(image_id=-5), "names unknown image -5"),
        (lambda d: _first_annotation(d).update(category_id=12345), "names unknown category 12345"),
        (lambda d: _first_polygon(d).__setitem__(0, "12"), "has a polygon that is not a flat list of x, y numbers"),
        (lambda d: _first_polygon(d).__setitem__(0, None), "has a polygon that is not a flat list of x, y numbers"),
        (lambda d: d.update(annotations=[]), "no image passes the filter"),
    ],
)
def test_bad_annotation_file_gets_one_sentence(synthetic_coco, bad_json, tmp_path, change, message):
    path = bad_json(change)
    mode = "train" if message == "no image passes the filter" else "eval"
    result = run_cli("--images", synthetic_coco.val_images, "--annotations", path, "--out", tmp_path / "out",
                     "--mode", mode)
    assert_clear_error(result, str(path), message)
    assert not (tmp_path / "out").exists()


def test_missing_paths(synthetic_coco, tmp_path):
    cases = [
        (["--images", tmp_path / "nope", "--annotations", synthetic_coco.val_json], "no such images folder"),
        (["--images", synthetic_coco.val_images, "--annotations", tmp_path / "nope.json"], "no such annotation file"),
        (["--images", synthetic_coco.val_images], "sharding needs --images, --annotations and --mode"),
    ]
    for argv, message in cases:
        assert_clear_error(run_cli(*argv, "--out", tmp_path / "o", "--mode", "train"), message)
    assert_clear_error(run_cli("--verify", "--out", tmp_path), "manifest.json is missing")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["text", "nothing"], ids=["a folder of non-images", "an empty folder"])
def test_an_images_folder_without_the_splits_images(synthetic_coco, tmp_path, content):
    images = tmp_path / "images"
    images.mkdir()
    names = [i["file_name"] for i in json.loads(synthetic_coco.val_json.read_text())["images"]]
    if content == "text":
        for name in names:
            (images / name).write_text("not an image")
    reason = "image: does not decode" if content == "text" else "image: file missing or unreadable"
    result = run_cli("--images", images, "--annotations", synthetic_coco.val_json, "--out", tmp_path / "out",
                     "--mode", "eval")
    assert_clear_error(result, f"none of the {len(names)} images", f"{len(names)} x {reason!r}",
                       f"check that {images} is the folder of its JPEGs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_unreadable_image_is_left_out_and_counted(synthetic_coco, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic_coco.val_images, images)
    victim = sorted(images.iterdir())[0]
    victim.chmod(0o000)
    result = run_cli("--images", images, "--annotations", synthetic_coco.val_json, "--out", tmp_path / "out",
                     "--mode", "eval", drop_root_powers=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dropped"]["image: file missing or unreadable"] == 1 and manifest["undecodable"] == [victim.name]


def _claim_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size; the pixels stay as they are."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9 :]


def test_an_image_too_large_to_decode_safely_is_left_out_and_counted(synthetic_coco, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic_coco.val_images, images)
    victim = sorted(images.iterdir())[0]
    victim.write_bytes(_claim_size(victim.read_bytes(), 20000, 20000))  # 400 Mpixels: over PIL's bomb limit
    result = run_cli("--images", images, "--annotations", synthetic_coco.val_json, "--out", tmp_path / "out",
                     "--mode", "eval")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dropped"]["image: more pixels than PIL decodes safely (Image.MAX_IMAGE_PIXELS)"] == 1
    assert manifest["undecodable"] == [victim.name]


def test_an_unreadable_annotation_file(synthetic_coco, tmp_path):
    annotations = tmp_path / "instances_val.json"
    shutil.copy(synthetic_coco.val_json, annotations)
    annotations.chmod(0o000)
    result = run_cli("--images", synthetic_coco.val_images, "--annotations", annotations, "--out", tmp_path / "out",
                     "--mode", "eval", drop_root_powers=True)
    assert_clear_error(result, f"cannot read {annotations} (Permission denied)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --verify


def test_verify_passes_a_good_folder(shard_copy):
    result = run_cli("--verify", "--out", shard_copy)
    assert result.returncode == 0 and "every sample passes" in result.stdout


def test_verify_names_a_truncated_tar(shard_copy):
    victim = sorted(shard_copy.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:-2048])
    assert_clear_error(run_cli("--verify", "--out", shard_copy), f"{victim.name} has", "truncated?")


def test_verify_names_the_damaged_sample(shard_copy):
    victim = sorted(shard_copy.glob("*.tar"))[0]
    row = read_index(victim.with_suffix(".idx"))[1]
    data = bytearray(victim.read_bytes())
    data[row.members["jpg"][0] + 1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert_clear_error(run_cli("--verify", "--out", shard_copy),
                       f"{victim.name} (sample {row.key}): the jpg member does not match its crc32")


def test_verify_finds_damage_outside_every_sample(shard_copy):
    victim = sorted(shard_copy.glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # in the end-of-archive padding: no member holds it, the sha256 covers it
    victim.write_bytes(bytes(data))
    assert_clear_error(run_cli("--verify", "--out", shard_copy), f"{victim.name}: sha256 differs")


def test_verify_names_an_index_that_disagrees_with_its_tar(shard_copy):
    index = sorted(shard_copy.glob("*.idx"))[-1]
    lines = index.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)
    index.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    assert_clear_error(run_cli("--verify", "--out", shard_copy), f"{index.name} does not match")


def test_verify_names_a_missing_shard(shard_copy):
    victim = sorted(shard_copy.glob("*.tar"))[0]
    victim.unlink()
    assert_clear_error(run_cli("--verify", "--out", shard_copy), f"{victim.name} is missing")


def _edit_first_shard(change):
    def edit(manifest: dict) -> None:
        change(manifest["shards"][0])
    return edit


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_edit_first_shard(lambda s: s.pop("sha256")), "'sha256' is missing or not 64 hex digits"),
        (_edit_first_shard(lambda s: s.update(bytes="81920")), "'bytes' is missing or not a count"),
        (_edit_first_shard(lambda s: s.update(name="../../etc/passwd")), "has no valid name and group"),
        (lambda m: m.update(shards="all of them"), "'shards' is missing or not a list"),
        (lambda m: m.update(samples=m["samples"] + 1), "but the shards hold"),
        (lambda m: m.pop("categories"), "'categories' is missing or empty"),
        (lambda m: m.update(max_instances=-1), "'max_instances' is missing or not a count"),
        (lambda m: m.update(format="coco-wds/1"), "has format 'coco-wds/1', this code reads 'coco-wds/3'; re-shard"),
    ],
)
def test_verify_on_a_hand_edited_manifest(shard_copy, change, message):
    path = shard_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    assert_clear_error(run_cli("--verify", "--out", shard_copy), str(path), message)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda fields: fields.__setitem__(1, fields[1] + "x"), "line 2 is not a valid index line"),
        (lambda fields: fields.__setitem__(3, "000000000001.jpg"), "line 2 is not a valid index line"),
        (lambda fields: fields.pop(), "line 2 is not a valid index line"),
    ],
)
def test_verify_on_a_hand_edited_index(shard_copy, change, message):
    index = sorted(shard_copy.glob("*.idx"))[0]
    lines = index.read_text().splitlines()
    fields = lines[1].split()
    change(fields)
    index.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    assert_clear_error(run_cli("--verify", "--out", shard_copy), index.name, message)
