"""Checks of command-line options that every command shares, run on the parsed config before any work.

- :func:`check_options` walks a parsed config (a dataclass, nested ones included) and stops with one
  line at the first float option that is NaN or infinite (every float of every command: positions,
  scales, angles, guidance, learning rates, ...), the first count marked :data:`PositiveInt` that is
  below 1, and the first output path marked :data:`OutputDir` / :data:`OutputFile` that cannot be
  written (a file where a folder should be, a folder without write permission). The ``vq3d``
  subcommands, ``vq3d-train-stage2`` and ``ns-train vq3d*`` run it once, on the whole config.
- :func:`check_nerfstudio_command_line`: ``ns-render`` and ``ns-export`` are nerfstudio's, but they
  build this plugin's pipeline before they do their work; the pipeline runs this on their command
  line so that a truncated ``--camera-path-filename``, ``--num-points 0`` or an unwritable
  ``--output-dir`` is refused in one line before the model loads, not after.

This module is imported by ``vq3d_nerfstudio.ns.trainer`` (every ``ns-*`` command imports it): standard
library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from typing_extensions import Annotated, get_args, get_origin


class _Marker:
    """``Annotated`` metadata naming a check; tyro ignores it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


POSITIVE = _Marker("positive")
OUTPUT_DIR = _Marker("output folder")
OUTPUT_FILE = _Marker("output file")
#: On a field holding a group of options (a nested dataclass) whose options the command line spells
#: without the field's name (``--fps``, not ``--orbit.fps``; tyro's ``OmitArgPrefixes``), so that
#: messages name them as the user typed them.
UNPREFIXED = _Marker("unprefixed")

PositiveInt = Annotated[int, POSITIVE]
"""A count that must be at least 1 (frames, samples, batch sizes, ...)."""
OutputDir = Annotated[Path, OUTPUT_DIR]
"""A folder the command writes into (created when missing): its place must be writable."""
OutputFile = Annotated[Path, OUTPUT_FILE]
"""A file the command writes (its folder created when missing): its place must be writable."""


def option_name(path: Sequence[str]) -> str:
    """``("pipeline", "model", "depth_loss_mult")`` -> ``--pipeline.model.depth-loss-mult`` (tyro's spelling)."""
    return "--" + ".".join(part.replace("_", "-") for part in path)


def _markers(hint: Any) -> List[_Marker]:
    """The markers on a field's type hint, through ``Optional[...]``."""
    if get_origin(hint) is Annotated:
        return [m for m in hint.__metadata__ if isinstance(m, _Marker)]
    if get_origin(hint) is typing.Union:
        return [m for arg in get_args(hint) for m in _markers(arg)]
    return []


def _type_hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:  # a third-party config whose annotations do not resolve: no markers
        return {}


def _leaves(value: Any, path: Tuple[str, ...], markers: List[_Marker]) -> Iterator[Tuple[Tuple[str, ...], Any, List[_Marker]]]:
    """Every plain value of a config: ``(option path, value, markers of its field)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _type_hints(type(value))
        for f in dataclasses.fields(value):
            if not f.name.startswith("_"):
                field_markers = _markers(hints.get(f.name))
                prefix = path if UNPREFIXED in field_markers else path + (f.name,)
                yield from _leaves(getattr(value, f.name), prefix, field_markers)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (str(key),), markers)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item, path, markers)
    else:
        yield path, value, markers


def output_path_problem(path: Path, is_folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written as an output folder (``is_folder``) or file, or ``None``.
    A missing path is fine when the nearest existing folder above it is writable (it is created)."""
    path = Path(path)
    if path.exists():
        if is_folder and not path.is_dir():
            return f"{path} is a file, not a folder; pass a folder"
        if not is_folder and path.is_dir():
            return f"{path} is a folder; pass a file name"
        folder = path if is_folder else path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write in {folder} (permission denied); pass a folder you can write to"
        return None
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{above} is a file, so {path} cannot be created; pass another path"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"cannot create {path}: {above} is not writable (permission denied); pass a folder you can write to"
    return None


def check_options(config: Any, command: str) -> None:
    """Stop with ``"<command>: error: --<option> ..."`` (``SystemExit``, one line) at the first
    option of ``config`` that is a non-finite float, a :data:`PositiveInt` below 1, or an
    :data:`OutputDir` / :data:`OutputFile` that cannot be written."""
    for path, value, markers in _leaves(config, (), []):
        name = option_name(path)
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{command}: error: {name} is {value}; give a finite number")
        if POSITIVE in markers and isinstance(value, int) and value < 1:
            raise SystemExit(f"{command}: error: {name} must be >= 1, got {value}")
        if isinstance(value, Path) and (OUTPUT_DIR in markers or OUTPUT_FILE in markers):
            problem = output_path_problem(value, is_folder=OUTPUT_DIR in markers)
            if problem is not None:
                raise SystemExit(f"{command}: error: {name}: {problem}")


def json_file_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable JSON file (one line, naming it), or ``None``."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        return f"{path}: cannot read it ({err.strerror or err})"
    except UnicodeDecodeError as err:
        return f"{path}: not a JSON file (not UTF-8 text: {err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        if not err.doc.strip():
            return f"{path}: empty file, not JSON"
        what = "truncated" if err.pos >= len(err.doc.rstrip()) else "not valid JSON"
        return f"{path}: {what} ({err.msg} at line {err.lineno} column {err.colno})"
    return None


def _argument(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of ``--name`` in ``argv`` (``--name v``, ``--name=v``, underscores or dashes), or ``None``."""
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        key, equals, value = token[2:].partition("=")
        if key.replace("_", "-") == name:
            if equals:
                return value
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


#: nerfstudio's counts that must be at least 1, per command (an ns-export --num-points 0 writes a batch anyway).
NERFSTUDIO_COUNTS = {"ns-export": ("num-points", "num-rays-per-batch"), "ns-render": ()}


def check_nerfstudio_command_line(argv: Sequence[str]) -> None:
    """Check the options of an ``ns-render`` / ``ns-export`` command line that this plugin can check
    before nerfstudio does the work: the camera path is readable JSON, counts are at least 1, the
    output folder is writable. Other programs' command lines are left alone."""
    if not argv:
        return
    command = Path(argv[0]).name
    if command not in NERFSTUDIO_COUNTS:
        return
    problem = None
    camera_path = _argument(argv, "camera-path-filename")
    if command == "ns-render" and camera_path is not None:
        problem = json_file_problem(Path(camera_path))
        if problem is not None:
            problem += "; pass a camera path written by the viewer or vq3d (configs/camera_paths/*.json)"
    for count in NERFSTUDIO_COUNTS[command]:
        value = _argument(argv, count)
        if problem is None and value is not None and value.lstrip("-").isdigit() and int(value) < 1:
            problem = f"--{count} must be >= 1, got {value}"
    output_dir = _argument(argv, "output-dir")
    if problem is None and command == "ns-export" and output_dir is not None:
        problem = output_path_problem(Path(output_dir), is_folder=True)
        problem = None if problem is None else f"--output-dir: {problem}"
    if problem is not None:
        raise SystemExit(f"{command}: error: {problem}")
