"""Checks of command-line options that every command shares, run on the parsed config before any work.

- :func:`check_options` walks a parsed config (a dataclass, nested ones included) and raises a
  one-line :class:`~vq3d_nerfstudio.errors.Vq3dError` at the first float option that is NaN or infinite (every float of every command: positions,
  scales, angles, guidance, learning rates, ...), the first number outside the :class:`Range` its
  field is marked with (:data:`PositiveInt`, :data:`Probability`, :func:`ranged`, ...), and the first
  output path marked :data:`OutputDir` / :data:`OutputFile` that cannot be written (a file where a
  folder should be, a folder without write permission). The ``vq3d`` subcommands,
  ``vq3d-train-stage2`` and ``ns-train vq3d*`` run it once, on the whole config. A range also shows
  in ``--help``, beside the default: ``(> 0; default: 1.0)``.
- :func:`check_nerfstudio_command_line`: ``ns-render`` and ``ns-export`` are nerfstudio's, but they
  build this plugin's pipeline before they do their work; the pipeline runs this on their command
  line so that a truncated ``--camera-path-filename``, ``--num-points 0`` or an unwritable
  ``--output-dir`` is refused in one line before the model loads, not after.
- :func:`renamed`: an option's old flag keeps setting it for one release;
  :func:`renamed_option_notes` gives the deprecation line for each old flag a command line uses.

The entry points print the error after ``"<command>: error: "``.

This module is imported by ``vq3d_nerfstudio.ns.trainer`` (every ``ns-*`` command imports it): standard
library only, ``errors``, and tyro's option metadata (every command has imported tyro to parse its
command line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import tyro
from typing_extensions import Annotated, get_args, get_origin

from vq3d_nerfstudio.errors import Vq3dError


class _Marker:
    """``Annotated`` metadata naming a check; tyro ignores it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Range(_Marker):
    """``Annotated`` metadata: the option's numbers (each one of a tuple or list) lie in this interval;
    ``None`` of an optional option is allowed. ``low_open`` / ``high_open`` leave out the end."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        super().__init__(self.text)

    @property
    def text(self) -> str:
        """``> 0``, ``>= 1``, ``<= 1``, ``in (0, 1]``: what messages and ``--help`` say."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def help_hint(self, default: str) -> str:
        """What tyro prints after the option's help, in place of ``(default: ...)``."""
        return f"({self.text}; default: {default})"


def ranged(hint: Any, low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:
    """``hint`` (``float``, ``int``, ``Optional[float]``, ``Tuple[float, float]``, ...) whose numbers must lie
    in the interval, checked by :func:`check_options` and shown in ``--help``. Give an optional option
    ``ranged(Optional[float], ...)``, not ``Optional[ranged(float, ...)]``: tyro reads help metadata only
    at the top of a field's type."""
    marker = Range(low, high, low_open=low_open, high_open=high_open)
    return Annotated[hint, marker, tyro.conf.arg(help_behavior_hint=marker.help_hint)]


OUTPUT_DIR = _Marker("output folder")
OUTPUT_FILE = _Marker("output file")
#: On a field holding a group of options (a nested dataclass) whose options the command line spells
#: without the field's name (``--fps``, not ``--orbit.fps``; tyro's ``OmitArgPrefixes``), so that
#: messages name them as the user typed them.
UNPREFIXED = _Marker("unprefixed")

PositiveInt = ranged(int, 1)
"""A count that must be at least 1 (frames, samples, batch sizes, ...)."""
NonNegativeInt = ranged(int, 0)
"""A count or step that may be 0 (warm-up steps, workers, ...)."""
PositiveFloat = ranged(float, 0, low_open=True)
"""A number that must be above 0 (learning rates, sizes, distances, ...)."""
NonNegativeFloat = ranged(float, 0)
"""A number that may be 0 but not negative (loss weights, angles of a range, ...)."""
Probability = ranged(float, 0, 1)
"""A probability or fraction, in [0, 1]."""
YawRange = ranged(float, 0, 180)
"""The largest yaw of views round the pivot (degrees): 180 reaches every side."""
ElevationRange = ranged(float, 0, 90, high_open=True)
"""The largest elevation of views round the pivot (degrees): below 90, where the camera would look straight down."""
OutputDir = Annotated[Path, OUTPUT_DIR]
"""A folder the command writes into (created when missing): its place must be writable."""
OutputFile = Annotated[Path, OUTPUT_FILE]
"""A file the command writes (its folder created when missing): its place must be writable."""


def option_name(path: Sequence[str]) -> str:
    """``("pipeline", "model", "depth_loss_mult")`` -> ``--pipeline.model.depth-loss-mult`` (tyro's spelling)."""
    return "--" + ".".join(part.replace("_", "-") for part in path)


class Renamed(_Marker):
    """``Annotated`` metadata: the option's flag before it was renamed (``old``, spelled in full as
    ``ns-train`` takes it), which still sets it (:func:`renamed`)."""

    def __init__(self, old: str):
        self.old = old
        super().__init__(f"renamed from {old}")

    @property
    def old_field(self) -> str:
        """The field name the old flag spelled (its last part): what a ``config.yml`` of that time holds."""
        return self.old.rsplit(".", 1)[-1].lstrip("-").replace("-", "_")


def renamed(hint: Any, old: str) -> Any:
    """``hint`` of an option whose flag was ``old`` (``"--pipeline.model.output-normals"``): ``old``
    still sets it, as a tyro alias (tyro uses aliases verbatim, so ``old`` is the whole flag), and
    :func:`renamed_option_notes` says it is deprecated. Removal of the old flags: at version 0.2.0."""
    return Annotated[hint, Renamed(old), tyro.conf.arg(aliases=(old,))]


def renamed_fields(cls: type) -> Dict[str, str]:
    """``{old field name: field name}`` of the :func:`renamed` options of dataclass ``cls`` (for loading
    configs saved under the old names)."""
    hints = _type_hints(cls)
    return {
        marker.old_field: f.name
        for f in dataclasses.fields(cls) for marker in _markers(hints.get(f.name)) if isinstance(marker, Renamed)
    }


def under_current_names(cls: type, fields: Dict[str, Any], extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``fields`` of dataclass ``cls`` as saved by an older version (a ``config.yml``'s state, a
    package's ``config.json`` object) with its :func:`renamed` options (and ``extra``'s ``{old: new}``)
    under their current names; the rest as they are."""
    renames = {**(extra or {}), **renamed_fields(cls)}
    return {renames.get(key, key): value for key, value in fields.items()}


def pop_renamed_fields(cls: type, fields: Dict[str, Any]) -> Dict[str, Any]:
    """``{current name: value}`` of the :func:`renamed` options of ``cls`` that ``fields`` holds under
    their old names, popped from it: options that moved into ``cls`` from the config ``fields`` came from."""
    return {new: fields.pop(old) for old, new in renamed_fields(cls).items() if old in fields}


def renamed_option_notes(config: Any, argv: Sequence[str]) -> List[str]:
    """One line for each old flag of a :func:`renamed` option of ``config`` that ``argv`` uses, naming
    the new flag: ``"vq3d: --pipeline.model.adversarial-loss-mult is deprecated, use
    --pipeline.model.adversarial.loss-mult (the old names go at version 0.2.0)"``."""
    used = {token.partition("=")[0].replace("_", "-") for token in argv if token.startswith("--")}
    notes: Dict[str, str] = {}
    for path, _, markers in _leaves(config, (), []):
        for marker in markers:
            if isinstance(marker, Renamed) and marker.old.replace("_", "-") in used:
                notes[marker.old] = f"vq3d: {marker.old} is deprecated, use {option_name(path)} (the old names go at version 0.2.0)"
    return list(notes.values())


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


def check_options(config: Any) -> None:
    """Raise ``Vq3dError("--<option> ...")`` (one line) at the first option of ``config`` that is a
    non-finite float, a number outside its :class:`Range` (:data:`PositiveInt` below 1, ...), or an
    :data:`OutputDir` / :data:`OutputFile` that cannot be written."""
    for path, value, markers in _leaves(config, (), []):
        name = option_name(path)
        if isinstance(value, float) and not math.isfinite(value):
            raise Vq3dError(f"{name} is {value}; give a finite number")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        for bounds in (m for m in markers if isinstance(m, Range) and is_number and value not in m):
            raise Vq3dError(f"{name} must be {bounds.text}, got {value}")
        if isinstance(value, Path) and (OUTPUT_DIR in markers or OUTPUT_FILE in markers):
            problem = output_path_problem(value, is_folder=OUTPUT_DIR in markers)
            if problem is not None:
                raise Vq3dError(f"{name}: {problem}")


def _type_name(hint: Any) -> str:
    """``int``, ``float or None``, ``one of 'frustum', 'world'``, ``a list of float``: for messages."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _fits(value: Any, hint: Any) -> Optional[bool]:
    """Whether ``value`` has the type ``hint`` declares; ``None`` where the hint is not one this checks."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _fits(value, args[0])
    if origin is typing.Union:
        verdicts = [_fits(value, arm) for arm in args]
        return None if None in verdicts and True not in verdicts else any(verdicts)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        items = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if items and origin is tuple and len(items) == len(args) and len(value) != len(items):
            return False
        return all(_fits(v, items[i] if len(items) > 1 else items[0]) is not False for i, v in enumerate(value)) if items else True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return dataclasses.is_dataclass(value) and not isinstance(value, type)
    return None


def config_type_problem(config: Any, path: Tuple[str, ...] = ()) -> Optional[str]:
    """The first field of a loaded config (a dataclass, nested ones included: a run's ``config.yml``,
    a package's ``config.json``) whose value is not of its declared type, as one line naming it by its
    dotted key: ``pipeline.model.image_size is '64' (a str), not int``; ``None`` when all fit. Types
    this does not know (callables, classes, dicts) are not checked."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return None
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name.startswith("_") or f.name not in hints or not hasattr(config, f.name):
            continue
        value, key = getattr(config, f.name), path + (f.name,)
        if _fits(value, hints[f.name]) is False:
            return f"{'.'.join(key)} is {value!r} (a {type(value).__name__}), not {_type_name(hints[f.name])}"
        problem = config_type_problem(value, key) if dataclasses.is_dataclass(value) else None
        if problem is None and isinstance(value, dict):
            problem = next((p for k, v in value.items() if (p := config_type_problem(v, key + (str(k),)))), None)
        if problem is not None:
            return problem
    return None


def json_file_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable JSON file (one line, naming it), or ``None``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"{path}: cannot read it ({err.strerror or err})"
    return json_bytes_problem(data, path)


def json_bytes_problem(data: bytes, path: Any) -> Optional[str]:
    """Why ``data``, read from ``path`` (a file or a URL, named in the line), is not JSON (empty,
    truncated, not UTF-8, ...), or ``None``."""
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"{path}: not a JSON file (not UTF-8 text: {err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        if not err.doc.strip():
            return f"{path}: empty file, not JSON"
        cut = err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string")  # cut inside a string
        what = "truncated" if cut else "not valid JSON"
        return f"{path}: {what} ({err.msg} at line {err.lineno} column {err.colno})"
    return None


def checkpoint_file_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete ``torch.save`` file (one line, naming it), or ``None``. Cheap: it
    reads the zip archive's directory, which a truncated file has lost, not the tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return f"{path}: empty file (0 bytes), not a checkpoint"
        with open(path, "rb") as f:
            if f.read(2) == b"\x80\x02":  # torch's legacy (pre-zip) format: a pickle stream, not checked here
                return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError as err:
        return f"{path}: cannot read it ({err.strerror or err})"
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        return f"{path}: truncated or not a checkpoint ({size:,} bytes, {err})"
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return f"{path}: not a torch checkpoint (no data.pkl in the archive)"
    return None


CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.ckpt$")


def nerfstudio_checkpoint_problem(load_dir: Path, load_step: Optional[int] = None) -> Optional[str]:
    """Why the checkpoint that nerfstudio's ``eval_setup`` loads from a run's ``load_dir``
    (``step-<load_step>.ckpt``, by default the latest) is empty or truncated, with what to do (one
    line), or ``None`` (also when there is none: nerfstudio says so itself)."""
    try:
        steps = sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.match, os.listdir(load_dir)) if m)
    except OSError:
        return None
    if load_step is None and not steps:
        return None
    step = steps[-1] if load_step is None else load_step
    path = Path(load_dir) / f"step-{step:09d}.ckpt"
    if not path.exists():
        return None
    problem = checkpoint_file_problem(path)
    if problem is None:
        return None
    earlier = [s for s in steps if s < step]
    if load_step is not None:
        fix = "pick another step" + (f" (the run also holds {', '.join(str(s) for s in earlier[-3:])})" if earlier else "")
    elif earlier:
        fix = f"delete it to use the checkpoint before it (step-{earlier[-1]:09d}.ckpt), or train the run again"
    else:
        fix = "it is the run's only checkpoint: train the run again"
    return f"{problem}; {fix}"


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
    output folder is writable: a one-line ``Vq3dError`` (``"--num-points must be >= 1, got 0"``) at
    the first problem. Other programs' command lines are left alone."""
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
        raise Vq3dError(problem)
