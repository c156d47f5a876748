"""Download the public weights this trainer starts from, each checked before it takes its name.

    python tools/download_weights.py --out /data/weights                   # both files
    python tools/download_weights.py --out /data/coco r50-msra              # what tools/download_coco.sh fetches
    python tools/download_weights.py --out weights --mirror file:///mnt/share/weights   # the same names elsewhere

- `r50-msra`: Detectron's MSRA `R-50.pkl`, the reference's provided ImageNet weights
  (train.weights for the recipes in configs/);
- `maskrcnn-coco`: torchvision's COCO `maskrcnn_resnet50_fpn` (box AP 37.9, mask AP 34.6;
  train.weights to fine-tune from, --weights for tools/evaluate.py and tools/predict.py), its
  address taken from torchvision itself.

A download goes to `<stem>.part<suffix>` in --out and takes its name only once checked; a file already
there is checked, not fetched again. The checks: torchvision's file must have the SHA-256 its
published name begins with (bf2d0c1e, what torch.hub checks); Detectron publishes no checksum
for R-50.pkl, so it must load into the reference model (every blob of the ResNet-50 body, with
its shape: model/weights.py). Both must load as what they are, and the tool prints each file's
SHA-256 to pin. --mirror takes another base address (https:// or file://) holding the same file
names, for machines that reach only a local copy. Errors end in one sentence, exit code 2; a
file that fails its check is not kept.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.shard_format import file_sha256

R50_URL = "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl"
NAMES = ("r50-msra", "maskrcnn-coco")


class DownloadError(ValueError):
    """A download that failed or a file that failed its check; the message says which and what to do."""


@dataclass(frozen=True)
class Published:
    """One public weights file: where it is and what checks it."""

    name: str
    url: str
    sha256_prefix: str | None  # what its publisher gives (None: nothing)
    config_overrides: tuple[str, ...]  # what the reference config needs to load it (the check)

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1]


def published(name: str) -> Published:
    """The file `name` stands for; torchvision's address and checksum come from torchvision."""
    if name == "r50-msra":
        return Published(name, R50_URL, None, ())
    import torch.hub
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    url = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url
    prefix = re.search(torch.hub.HASH_REGEX, url.rsplit("/", 1)[1])
    overrides = ("model.backbone.stride_in_1x1=false", "model.normalization=rgb", "model.convention=torchvision")
    return Published(name, url, prefix.group(1) if prefix else None, overrides)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"{' or '.join(NAMES)} (default: both)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the files")
    parser.add_argument("--mirror", help="base address holding the same file names (https://... or file:///...)")
    return parser


def main(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in NAMES]
    if unknown:
        print(f"error: no published weights named {unknown[0]}; name {' or '.join(NAMES)}", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out} cannot be made ({e.strerror}); pass a folder you can write to", file=sys.stderr)
        return 2
    try:
        for name in args.names or NAMES:
            entry = published(name)
            url = f"{args.mirror.rstrip('/')}/{entry.file}" if args.mirror else entry.url
            path = fetch(entry, url, args.out)
            print(f"{path}: checked; sha256 {file_sha256(path)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def fetch(entry: Published, url: str, out: Path) -> Path:
    """`out/<file>` downloaded from `url` and checked (or checked only, when it is there already)."""
    path = out / entry.file
    if path.is_file():
        check(entry, path, what=f"{path} (already there)", fix="delete it and run again")
        return path
    import torch.hub  # a download with a progress bar that checks a SHA-256 prefix, as torchvision's own

    partial = path.with_name(f"{path.stem}.part{path.suffix}")  # the suffix tells model/weights.py the format
    print(f"downloading {url} -> {path}", flush=True)
    try:
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=entry.sha256_prefix, progress=sys.stderr.isatty())
    except RuntimeError as e:  # torch.hub's "invalid hash value": the partial file is gone already
        partial.unlink(missing_ok=True)
        if "invalid hash value" not in str(e):
            raise
        raise DownloadError(
            f"{url} has another SHA-256 than the published file's, which begins with {entry.sha256_prefix}; "
            "it was not kept: run again, or check --mirror"
        ) from None
    except OSError as e:  # URLError, a refused connection, a full disk
        partial.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise DownloadError(f"cannot download {url} ({reason}); check the network, or pass --mirror with a copy") from None
    try:
        check(entry, partial, what=f"the file downloaded from {url}", fix="run again, or check --mirror")
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def check(entry: Published, path: Path, what: str, fix: str) -> None:
    """The file's published SHA-256 prefix, then that it loads into the model it is for; DownloadError if not."""
    digest = file_sha256(path)
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
        raise DownloadError(
            f"{what} has SHA-256 {digest[:16]}..., but the published {entry.file} begins with {entry.sha256_prefix}; {fix}"
        )
    from model.build import build_model
    from model.weights import WeightsError, load_weights
    from train.config import REFERENCE_CONFIG, load_config

    model = build_model(load_config(REFERENCE_CONFIG, entry.config_overrides).model)
    try:
        load_weights(model, path, for_training=True)
    except WeightsError as e:
        raise DownloadError(f"{what} does not load as {entry.file} ({e}); {fix}") from None


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
