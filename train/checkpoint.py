"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, optimizer and GradScaler state, the schedule position
(iteration and epoch), the RNG states, the input pipeline's position inside the epoch,
the resolved config, the categories of the class outputs and the id of the run that wrote
it, with the digest of the shard set it trained on. It is written to a temporary file in the
same folder and renamed into place (`os.replace` is atomic on POSIX), so a crash or SIGKILL
never leaves a half-written file under a checkpoint name; the temporary file such a kill leaves
is removed by the next trainer on the folder (`remove_abandoned_temporaries`). A write that
fails (a full disk, which torch's zip writer reports as a RuntimeError "unexpected pos") is one
sentence, `CheckpointWriteError`, with the newest checkpoint kept as it was. A file damaged
later (a disk fault, a copy cut short) is skipped by `newest_readable_checkpoint`, which resumes
from the newest one that still reads. Which checkpoints a run may delete is the run folder's
business (train/run_folder.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from model.weights import load_failure
from train.config import Config
from train.distributed import DistributedContext, gather_from_ranks

log = logging.getLogger(__name__)

FORMAT = "maskrcnn-train-checkpoint/1"
TEMPORARY_PREFIX = "."  # a checkpoint is written as `.ckpt-<iteration>.pt.tmp-<pid>`, then renamed
# Sections of the config a checkpoint must agree with to be resumed: they fix the parameters'
# shapes, the schedule, the random streams and the images the model sees. Evaluation, logging
# and the machine's settings may change between a run and its resumption (each change is
# recorded in run.json and the log).
MATCHING_SECTIONS = ("seed", "model", "solver", "data")
# Data keys that say where the shards are and how fast they are read, not what is computed: the
# training shards' identity is checked by their manifest instead (`check_training_data`).
MOVABLE_DATA_KEYS = (
    "data.train_shards", "data.val_shards", "data.val_annotations", "data.backend", "data.decode_device",
    "data.dali_threads", "data.torch_workers", "data.prefetch", "data.shuffle_buffer",
)
# How an attempt is started, never a change of the run.
NOT_A_CHANGE = ("train.resume",)
# Where the schedule ends: a resumed run may move it (extend a finished run, or shorten one).
# The LR at an iteration does not depend on it, so an extended run trains exactly as a longer one.
SCHEDULE_END_KEYS = ("solver.max_iter", "train.max_epochs")


class CheckpointError(ValueError):
    """A checkpoint the user pointed at cannot be used; the message says why and what to do."""


class UnreadableCheckpoint(CheckpointError):
    """The file is damaged or is not a checkpoint of this trainer."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk); the message names it, the newest one kept, and the fix."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"ckpt-{iteration:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files never match the pattern)."""
    folder = checkpoint_dir(output_dir)
    return sorted(folder.glob("ckpt-*.pt")) if folder.is_dir() else []


def rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a list so weights_only loading accepts it
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuples(states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a round trip may have turned into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    iteration: int,
    epoch: int,
    loader_state: Any,
    config: Config,
    run_id: str = "",
    categories: list[dict[str, Any]] | None = None,
    shards_digest: str | None = None,
) -> Path:
    """Write `ckpt-<iteration>.pt` atomically (over an older file of that name).

    `epoch` is the epoch the next iteration belongs to and `loader_state` the pipeline's
    position inside it (None: the epoch starts from its beginning). `categories` (the train
    manifest's) say what the class outputs stand for, so the checkpoint alone can predict,
    name its detections and be fine-tuned onto other categories (model/weights.py);
    `shards_digest` (`shard_set_digest` of the training shards) lets a resume check its data.
    """
    path = checkpoint_path(output_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "iteration": iteration,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states(),
        "loader": loader_state,
        "config": config.to_dict(),
        "categories": categories,
        "run_id": run_id,
        "shards_digest": shards_digest,
    }
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "unexpected pos" not in str(e):
            raise  # torch's zip writer reports a failed write (a full disk) as "unexpected pos"; others are bugs
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(e, path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_failure(error: OSError | RuntimeError, path: Path) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else "the write stopped short"
    free_mb = shutil.disk_usage(path.parent).free / 1e6
    kept = [p for p in list_checkpoints(path.parent.parent) if p != path]
    previous = f"the newest checkpoint, {kept[-1]}, is kept" if kept else "no earlier checkpoint exists"
    return (
        f"cannot write checkpoint {path} ({reason}; {free_mb:.1f} MB free on its disk); {previous}: free some space "
        "or set a larger disk's output_dir, and continue with --resume"
    )


def remove_abandoned_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete the partial checkpoints (`.ckpt-*.pt.tmp-PID`) that a kill during a write left behind.

    Called by the trainer that holds the run folder's lock (train/run_folder.py) before it writes a
    checkpoint of its own: no other trainer can be writing there, so every such file is a dead
    writer's, whatever its PID (a restarted container often gives the new trainer the old one's PID).
    """
    folder = checkpoint_dir(output_dir)
    abandoned = sorted(folder.glob(f"{TEMPORARY_PREFIX}ckpt-*.pt.tmp-*")) if folder.is_dir() else []
    for path in abandoned:
        path.unlink(missing_ok=True)
    return abandoned


def parameters_are_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite: a checkpoint of NaN weights would be no checkpoint."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents on the CPU; UnreadableCheckpoint if the file is damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file or train.resume=auto")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: torch raises many kinds of error
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read ({load_failure(e)}); pass another checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UnreadableCheckpoint(f"{path} is not a checkpoint written by train/main.py; pass one from <output_dir>/checkpoints")
    return state


def load_checkpoint(path: str | Path, config: Config) -> dict[str, Any]:
    """Read a checkpoint on the CPU and check it was written by a compatible config."""
    state = read_checkpoint(path)
    differences = config_differences(state["config"], config.to_dict())
    if differences:
        shown = ", ".join(differences[:3]) + (", ..." if len(differences) > 3 else "")
        raise CheckpointError(
            f"checkpoint {path} was written by another config ({shown}); "
            "resume with the config it was written with, or start a fresh output_dir"
        )
    return state


def newest_readable_checkpoint(output_dir: str | Path, config: Config) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in output_dir that reads, and its contents; None when there is none.

    A damaged newer file is skipped with a warning (the older ones hold finished work); a
    config mismatch is not damage and stays an error.
    """
    found = list_checkpoints(output_dir)
    damaged: list[str] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, config)
        except UnreadableCheckpoint as e:
            log.warning("%s; trying the next older one", e.args[0].split(";")[0])
            damaged.append(path.name)
            continue
        if damaged:
            log.warning("resuming from %s, the newest readable checkpoint (damaged: %s)", path, ", ".join(damaged))
        return path, state
    if damaged:
        raise CheckpointError(
            f"none of the {len(damaged)} checkpoints in {checkpoint_dir(output_dir)} can be read; "
            "resume from a copy with --resume PATH, or start a fresh run in a new output_dir"
        )
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every leaf of MATCHING_SECTIONS that differs (the schedule's end may move)."""
    allowed = (*SCHEDULE_END_KEYS, *MOVABLE_DATA_KEYS)
    return [d for d in _differences(saved, current, MATCHING_SECTIONS) if d.split(":")[0] not in allowed]


def setting_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for what a resumed run may change and records: paths, evaluation, logging, the machine."""
    kept = {d.split(":")[0] for d in config_differences(saved, current)} | {*SCHEDULE_END_KEYS, *NOT_A_CHANGE}
    sections = sorted(set(saved) | set(current))
    return [d for d in _differences(saved, current, sections) if d.split(":")[0] not in kept]


def shard_set_digest(manifest: Mapping[str, Any]) -> str:
    """What identifies a shard set: sha256 over its shards (names, sample counts, sizes, sha256s) and categories.

    The sharder writes identical bytes for the same input and options, so a re-sharded or moved
    copy of the same data keeps its digest; other data, or other categories, do not.
    """
    identity = {"shards": manifest["shards"], "categories": manifest["categories"]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_training_data(state: Mapping[str, Any], path: Path, shard_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """A resumed run trains on the data its checkpoint trained on: the same categories and the same shards.

    Another class count would not even load into the checkpoint's layers, other categories would
    silently rename its classes, and another shard set breaks the epoch's position; each is one
    sentence naming both sides. Checkpoints written before the digest existed are checked by categories.
    """
    saved, current = state.get("categories"), manifest["categories"]
    if saved is not None and [_category(c) for c in saved] != [_category(c) for c in current]:
        raise CheckpointError(
            f"checkpoint {path} was trained on {_category_names(saved)}, but data.train_shards={shard_dir} holds "
            f"{_category_names(current)}; resume with the shards it was trained on, or fine-tune it on these in a "
            f"new output_dir with train.weights={path}"
        )
    digest = shard_set_digest(manifest)
    if state.get("shards_digest") and state["shards_digest"] != digest:
        raise CheckpointError(
            f"checkpoint {path} was trained on another shard set than data.train_shards={shard_dir} (shard digest "
            f"{state['shards_digest'][:12]} -> {digest[:12]}); resume with the shards it was trained on, or start "
            "a fresh output_dir"
        )


def _category(category: Mapping[str, Any]) -> tuple[int, int, str]:
    return int(category["id"]), int(category["coco_id"]), str(category["name"])


def _category_names(categories: Sequence[Mapping[str, Any]]) -> str:
    names = [str(c["name"]) for c in categories]
    return f"{len(names)} categories ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''})"


def schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for each SCHEDULE_END_KEYS entry a resumed run moves."""
    sections = sorted({key.split(".")[0] for key in SCHEDULE_END_KEYS})
    return [d for d in _differences(saved, current, sections) if d.split(":")[0] in SCHEDULE_END_KEYS]


def _differences(saved: dict[str, Any], current: dict[str, Any], sections: Sequence[str]) -> list[str]:
    differences: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}")
        elif a != b:
            differences.append(f"{key}: {a!r} -> {b!r}")

    for section in sections:
        walk(saved.get(section), current.get(section), section)
    return differences


@contextlib.contextmanager
def weights_loaded(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """`model` holds `state` (e.g. an older checkpoint's weights) inside the block, its own again after it, bit for bit.

    Both loads copy in place (`load_state_dict`), so the optimizer and captured CUDA graphs
    keep pointing at the same tensors.
    """
    own = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        yield
    finally:
        model.load_state_dict(own)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in state_dict order: equal digests, identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_positions(position: Any, ctx: DistributedContext) -> list[Any] | None:
    """Every rank's pipeline position (rank order) for rank 0's checkpoint; None at an epoch end."""
    if position is None:
        return None
    return gather_from_ranks(ctx, position)


def this_ranks_position(positions: list[Any] | None, ctx: DistributedContext, path: Path) -> Any:
    """This rank's saved pipeline position; a mid-epoch checkpoint needs the same process count."""
    if positions is None:
        return None
    if len(positions) != ctx.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written mid-epoch by {len(positions)} processes, this run has {ctx.world_size}; "
            f"resume with {len(positions)} processes or from an epoch-end checkpoint"
        )
    return positions[ctx.rank]
