"""The one rule every tool applies to what it writes: an output path may not be, or lie inside, an input path.

`tools/evaluate.py --json` naming the annotation file would replace it with metrics; `visualize.py
--out` equal to `--images` would write its PNGs over the source pictures; a shard or prediction
folder inside the folder it reads would mix its files into the input. Each tool calls
`check_outputs_apart` with its output and input flags before it reads or writes anything, and a
clash is one sentence naming both. Paths are compared after resolving symbolic links and `..`,
so two spellings of one file are one file; an input inside an output folder is allowed (the demo
keeps its data and shards in its run folder, and a run may fine-tune from a checkpoint it holds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Union

PathLike = Union[str, Path, None]


class OutputPathError(ValueError):
    """An output path that is, or lies inside, an input path; the message names both."""


def check_outputs_apart(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike]) -> None:
    """Raise OutputPathError for the first output that is or lies inside an input; None paths are skipped.

    Both map a flag (or config key) to its path; an output's flag may say which part of it is meant
    ("--out (its pictures/)"), the sentence then asks for another value of the flag's first word.
    """
    resolved_inputs = {flag: Path(os.path.realpath(path)) for flag, path in inputs.items() if path}
    for out_flag, out in outputs.items():
        if not out:
            continue
        target, flag = Path(os.path.realpath(out)), out_flag.split()[0]
        for in_flag, source in resolved_inputs.items():
            if target == source:
                kind = "folder" if source.is_dir() else "file" if source.exists() else "path"
                raise OutputPathError(
                    f"{out_flag} {out} is the {in_flag} {kind} {inputs[in_flag]}: writing it would overwrite that "
                    f"input; pass another {flag}"
                )
            if source in target.parents:
                raise OutputPathError(
                    f"{out_flag} {out} lies inside the {in_flag} folder {inputs[in_flag]}: what it writes would land "
                    f"among the inputs; pass an {flag} outside it"
                )


def exit_if_overlapping(tool: str, outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike]) -> None:
    """`check_outputs_apart` for tools without an error path of their own (the benchmarks): the sentence
    on stderr, then exit code 2."""
    try:
        check_outputs_apart(outputs, inputs)
    except OutputPathError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
