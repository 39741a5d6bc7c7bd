"""Model packages by name, without torch: where packages live, how a ``--model`` name resolves, and
their ``config.json`` (checked) and model card. :mod:`vq3d_nerfstudio.stage1.package` builds and
writes the model itself; this module stays light so ``vq3d models`` and name errors answer at once.

A package is a folder::

    config.json         format and version, the model config's fields, under ``data`` its canonical
                        camera (camera distance, field of view) and what it took from the
                        dataparser (depth kind, class names),
                        provenance (source run, step, revision), the weights' dtype, a description
                        and held-out figures
    model.safetensors   stage-1 weights only (no discriminator, no optimizer)
    README.md           the model card
    examples/           optional: a few held-out images (what ``vq3d view`` offers)
    stage2/             optional: a stage-2 checkpoint's model.safetensors and config.json

Names resolve (:func:`resolve_model`) in this order: an existing path; a model shipped with the
install (``vq3d_nerfstudio/models/<name>/``); a model in the user folder (``$VQ3D_HOME/models/<name>/``,
default ``~/.cache/vq3d/models``); a hub id ``org/name`` through ``huggingface_hub`` (optional).

A training run's ``config.yml`` is arbitrary-object YAML that nerfstudio reads with ``yaml.Loader``,
which runs code. One that a file names (a stage-2 checkpoint's ``config.json``, a token cache's
``meta.json``) rather than the user is read first with a safe loader (:func:`run_config_problem`):
only the Python tags nerfstudio writes for its own and this plugin's config classes pass.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from vq3d_nerfstudio.errors import PackageError
from vq3d_nerfstudio.geometry.poses import CanonicalCamera

FORMAT = "vq3d-model"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, STAGE2_DIR = "config.json", "model.safetensors", "README.md", "stage2"
SHIPPED_DIR = Path(__file__).resolve().parent / "models"
"""Models that come with the install (package data of ``vq3d_nerfstudio``)."""
DATA_KEYS = ("camera_distance", "fov_deg", "depth_kind", "class_names")
"""``config.json``'s ``data``: the model's canonical camera (its config's ``canonical_camera``, kept
here as packages always have) and what the model takes from the dataparser's metadata."""


def user_models_dir() -> Path:
    """``$VQ3D_HOME/models`` (default ``~/.cache/vq3d/models``): where named models of the user live."""
    home = os.environ.get("VQ3D_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "vq3d") / "models"


def shipped_models() -> List[Path]:
    """The package folders that come with the install, by name."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def is_package(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "config.yml").exists()


def resolve_model(name_or_path: str) -> Path:
    """A package folder or a run's ``config.yml`` for ``--model``: an existing path (a run folder
    gives its ``config.yml``), a shipped model, a model in :func:`user_models_dir`, or a hub id
    ``org/name`` (downloaded with ``huggingface_hub``). Anything else: :class:`PackageError` naming
    the shipped models."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.yml").is_file():
            return path / "config.yml"
        if path.is_file() and path.name == CONFIG_FILE:
            return path.parent
        if path.is_file() or is_package(path):
            return path
        raise PackageError(f"{path}: neither a model package (no {CONFIG_FILE}) nor a run (no config.yml); pass either")
    for folder in (SHIPPED_DIR / name_or_path, user_models_dir() / name_or_path):
        if "/" not in name_or_path and is_package(folder):
            return folder
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return download_from_hub(name_or_path)
    names = ", ".join(p.name for p in shipped_models()) or "none"
    raise PackageError(
        f"{name_or_path}: no such file, shipped model or model in {user_models_dir()}; "
        f"shipped models: {names} (vq3d models lists them)"
    )


# ---- run config.yml files that a file, not the user, names --------------------------------------
YAML_TAG = "tag:yaml.org,2002:"
#: Python tags of ``yaml.Loader`` that build plain data (no import, no call).
PLAIN_PYTHON_TAGS = frozenset(
    f"python/{kind}" for kind in ("none", "bool", "str", "unicode", "bytes", "int", "long", "float", "complex", "list", "tuple", "dict")
)
CONFIG_MODULES = ("nerfstudio", "vq3d_nerfstudio")
"""Where the classes of a run's config live: ``!!python/object:`` may build their dataclasses
(no ``__init__`` runs), ``!!python/object/apply:`` may look up their enums' members."""
NAME_MODULES = CONFIG_MODULES + ("torch.optim",)
"""Where ``!!python/name:`` references may point (the ``_target`` classes and functions nerfstudio
instantiates, the optimizers): defined there, not imported into those modules from elsewhere."""
PATH_CLASSES = frozenset(
    f"{module}.{name}" for module in ("pathlib", "pathlib._local")
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
)
"""``!!python/object/apply:`` of these builds a path from strings (nerfstudio writes paths so)."""
MAX_RUN_CONFIG_BYTES = 16 << 20
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _defined_in(target: str, modules: Tuple[str, ...]) -> Any:
    """The object ``module.name`` names when it is defined in one of ``modules`` (its ``__module__``;
    importing only such modules), else None."""
    if not _DOTTED.fullmatch(target) or not target.startswith(tuple(f"{m}." for m in modules)):
        return None
    module_name, _, attribute = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except Exception:  # noqa: BLE001  (a missing or broken module: not a class of ours)
        return None
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str) or not any(owner == m or owner.startswith(f"{m}.") for m in modules):
        return None
    return obj


def _refused_tag(tag: str) -> Optional[str]:
    """A YAML tag of a run's config.yml as written (``!!python/...``) when it is not one nerfstudio
    writes for its and vq3d's configs, else None."""
    if not tag.startswith(YAML_TAG):
        return tag
    name = tag[len(YAML_TAG):]
    if not name.startswith("python/") or name in PLAIN_PYTHON_TAGS:
        return None  # YAML's own types, plain Python data
    kind, _, target = name.partition(":")
    if kind == "python/name":
        if _defined_in(target, NAME_MODULES) is not None:
            return None
    elif kind == "python/object":
        cls = _defined_in(target, CONFIG_MODULES)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return None
    elif kind == "python/object/apply":
        if target in PATH_CLASSES:
            return None
        cls = _defined_in(target, CONFIG_MODULES)
        if isinstance(cls, type) and issubclass(cls, enum.Enum):
            return None
    return f"!!{name}"


def run_config_problem(path: Path) -> Optional[str]:
    """Why nerfstudio should not load the run ``config.yml`` at ``path`` when a file named it (one
    phrase naming the tag and its line), or None. Read with a safe loader (nodes only: nothing is
    built, imported or called) as nerfstudio reads it; every tag must be YAML's own, plain Python
    data, a path, a dataclass or enum of nerfstudio / vq3d_nerfstudio, or a name defined there (or
    a torch optimizer)."""
    try:
        size = path.stat().st_size
        if size > MAX_RUN_CONFIG_BYTES:
            return f"is {size} bytes, far more than a run's config.yml"
        text = path.read_text()  # the locale's encoding, as nerfstudio's eval_setup reads it
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except UnicodeDecodeError as err:
        return f"is not text ({err.reason} at byte {err.start})"
    except yaml.YAMLError as err:
        return f"is not a YAML document ({str(err).splitlines()[0]})"
    if root is None:
        return "is empty"
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:  # an alias: a node met before
            continue
        seen.add(id(node))
        refused = _refused_tag(node.tag)
        if refused is not None:
            return (
                f"holds {refused} on line {node.start_mark.line + 1}, a tag outside those nerfstudio writes for "
                "its and vq3d's config classes (loading it can run code)"
            )
        if isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def check_named_run_config(path: Path, named_by: Path, option: str) -> None:
    """Stop with a :class:`PackageError` (one line naming both files and the fix) when the run
    ``config.yml`` at ``path``, which the file ``named_by`` names, fails :func:`run_config_problem`.
    ``option``: the command-line option with which the user may pass that file themselves."""
    problem = run_config_problem(path)
    if problem is not None:
        raise PackageError(
            f"{named_by} names the stage-1 run {path}, which was not loaded: it {problem}; if you trust that "
            f"file, pass it yourself with {option} {path}, otherwise a stage-1 run or model package you trust"
        )


def download_from_hub(repo_id: str) -> Path:
    """A hub id's snapshot folder (``huggingface_hub.snapshot_download``, cached by the hub)."""
    try:
        from huggingface_hub import snapshot_download  # optional: only hub ids need it
    except ImportError:
        raise PackageError(f"{repo_id}: a hub id needs huggingface_hub; pip install huggingface_hub, or pass a local folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, f"{STAGE2_DIR}/*"]))
    except Exception as err:  # noqa: BLE001  (offline, unknown repo, auth: all end in the one line)
        raise PackageError(f"{repo_id}: could not download from the hub ({type(err).__name__}); check the id and the network, or pass a local folder") from None


def source_revision() -> str:
    """This install's version, and its git commit when it runs from a checkout (``-dirty`` when
    tracked files differ from it)."""
    import subprocess
    from importlib import metadata

    try:
        version = metadata.version("vq3d_nerfstudio")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return version
    if head.returncode or not head.stdout.strip():
        return version
    return f"{version} ({head.stdout.strip()}{'-dirty' if dirty.stdout.strip() else ''})"


def run_provenance(load_config: Path, load_step: Optional[int] = None) -> Dict[str, Any]:
    """Where a package comes from: the run's ``config.yml``, the checkpoint's step, this install's
    revision."""
    if load_step is None:
        steps = [int(p.stem.split("-")[1]) for p in (load_config.parent / "nerfstudio_models").glob("step-*.ckpt")]
        load_step = max(steps) if steps else None
    return {"source_run": str(load_config), "step": load_step, "revision": source_revision()}


def eval_figures(summary: Dict[str, Any]) -> Dict[str, float]:
    """The held-out figures a model card quotes from a ``vq3d eval`` summary: canonical PSNR and
    depth delta<1.25, novel-view PSNR, its 'nothing moves' floor (views pooled by count)."""

    def novel(key: str) -> float:
        rows = [row for offset, row in summary.items() if float(offset) > 0 and key in row]
        count = sum(row["count"] for row in rows)
        return sum(row[key] * row["count"] for row in rows) / count if count else float("nan")

    figures = {"canonical_psnr": summary["0"]["psnr"], "novel_psnr": novel("psnr"), "floor_psnr": novel("still_psnr")}
    if "delta1" in summary["0"]:
        figures["canonical_delta1"] = summary["0"]["delta1"]
    return {key: round(float(value), 4) for key, value in figures.items()}


def read_package_config(folder: Path) -> Dict[str, Any]:
    """``config.json`` of a package, checked: its format and version, and its ``data`` keys."""
    path = folder / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; a model package has {CONFIG_FILE} and {WEIGHTS_FILE} (make one with vq3d package)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackageError(f"{path}: not readable JSON ({err}); copy the package again or remake it with vq3d package") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PackageError(f"{path}: not a vq3d model package (format {info.get('format') if isinstance(info, dict) else None!r}); remake it with vq3d package")
    if info.get("version") != VERSION:
        raise PackageError(
            f"{path}: package version {info.get('version')!r}, this install reads version {VERSION}; "
            "use the vq3d version that wrote it, or remake the package with this one"
        )
    for key in ("model", "data"):
        if not isinstance(info.get(key), dict):
            raise PackageError(f"{path}: no '{key}' object; remake the package with vq3d package")
    missing = [key for key in DATA_KEYS if key not in info["data"]]
    if missing:
        raise PackageError(f"{path}: 'data' lacks {', '.join(missing)}; remake the package with vq3d package")
    return info


def package_summary(folder: Path) -> str:
    """One line on a package: its description, its held-out figures, its size."""
    info = read_package_config(folder)
    about = info.get("about") or {}
    figures = about.get("eval") or {}
    parts = [about.get("description") or "no description"]
    if figures:
        parts.append(
            f"held out: canonical {figures['canonical_psnr']:.2f} dB, novel views {figures['novel_psnr']:.2f} dB "
            f"('nothing moves' {figures['floor_psnr']:.2f})"
        )
    model = info["model"]
    parts.append(f"{model['image_size']} px, {'with' if (folder / STAGE2_DIR).is_dir() else 'no'} stage 2")
    return "; ".join(parts)


def model_card(name: str, info: Dict[str, Any], has_stage2: bool = False) -> str:
    """The package's ``README.md``: what it is, how to use it, where it came from."""
    about, model, data, prov = info.get("about") or {}, info["model"], info["data"], info["provenance"]
    quantizer = model["quantizer"]
    lines = [
        f"# {name}",
        "",
        about.get("description") or "A VQ3D stage-1 model (vq3d_nerfstudio).",
        "",
        "## Use",
        "",
        "```bash",
        f"vq3d reconstruct --model {name} --image photo.jpg",
        f"vq3d view --model {name}",
        *([f"vq3d sample --model {name} --class-label 0"] if has_stage2 else []),
        "```",
        "",
        "## Model",
        "",
        f"- input: {model['image_size']} px, patches of {model['patch_size']} px, tokens of width {model['hidden_dim']}",
        f"- quantizer: {quantizer['type']}",
        f"- tri-planes: {model['triplane_resolution']} texels, {model['triplane_channels']} channels, layout {model['triplane_layout']}",
        f"- camera: {CanonicalCamera(data['camera_distance'], data['fov_deg']).describe()}; depth kind in training: {data['depth_kind']}",
        f"- classes: {', '.join(data['class_names']) or 'none'}",
        f"- weights: {info['dtype']}",
    ]
    figures = about.get("eval")
    if figures:
        lines += ["", "## Held-out figures (`vq3d eval`)", "", "| canonical PSNR | novel-view PSNR | 'nothing moves' | canonical depth δ<1.25 |", "|---|---|---|---|"]
        lines.append(
            f"| {figures['canonical_psnr']:.2f} | {figures['novel_psnr']:.2f} | {figures['floor_psnr']:.2f} | "
            f"{figures.get('canonical_delta1', float('nan')):.3f} |"
        )
    lines += ["", "## Provenance", "", f"- run: `{prov.get('source_run')}`", f"- step: {prov.get('step')}", f"- vq3d_nerfstudio: {prov.get('revision')}", ""]
    return "\n".join(lines)
