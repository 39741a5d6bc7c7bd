"""Model packages: build a stage-1 model from a package folder, and write one (the weights and
``config.json``; the folder's layout, names and card are :mod:`vq3d_nerfstudio.model_index`).

Loading reads JSON and safetensors only: no pickle, no YAML object tags, no ``torch.load``, so a
package from anyone runs no code. It builds the model alone (no dataparser, datamanager or viewer),
as nanoGPT's ``sample.py`` rebuilds its model from the checkpoint's own arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from nerfstudio.data.scene_box import SceneBox

from vq3d_nerfstudio.checks import config_type_problem, under_current_names
from vq3d_nerfstudio.errors import PackageError
from vq3d_nerfstudio.geometry.poses import CanonicalCamera
from vq3d_nerfstudio.model_index import (
    CARD_FILE,
    CONFIG_FILE,
    DATA_KEYS,
    FORMAT,
    VERSION,
    WEIGHTS_FILE,
    model_card,
    read_package_config,
)
from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig
from vq3d_nerfstudio.stage1.model import Vq3dModel, Vq3dModelConfig, upgrade_model_fields
from vq3d_nerfstudio.stage1.quantizer import QUANTIZER_COMMANDS

SKIPPED_FIELDS = ("_target",)
"""Model config fields a package does not store (the class is always :class:`Vq3dModel`)."""
DATA_FIELDS = ("canonical_camera",)
"""Model config fields a package stores under ``data``, where packages have always kept them: the
canonical camera as ``camera_distance`` and ``fov_deg`` (:func:`camera_to_data`, :func:`camera_from_data`)."""
INFERENCE_FIELDS = ("inference_field", "bake_nodes_per_texel")
"""Model config fields that choose how a model renders, not what its weights mean: a package written
before one existed lacks it and loads with this install's default."""
MOVED_DATA_FIELDS = ("relative_disparity_percentiles", "relative_disparity_range")
"""Model config fields of packages written when the relative-depth target's options were the
model's; they shape the training data, not the weights (now the datamanager's
``relative_disparity``), so a package's are ignored. Removal: with their old flags, at version 0.2.0."""


# ---- writing ---------------------------------------------------------------------------------------
def config_to_json(config: Any) -> Dict[str, Any]:
    """A model config's fields as JSON values; the nested quantizer config as ``{"type": <its
    subcommand>, <its fields>}``, the nested adversarial config as ``{<its fields>}``."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in SKIPPED_FIELDS + DATA_FIELDS:
            continue
        value = getattr(config, f.name)
        if f.name == "quantizer":
            kind = next(name for name, cls in QUANTIZER_COMMANDS.items() if type(value) is cls)
            value = {"type": kind, **config_to_json(value)}
        elif f.name == "adversarial":
            value = config_to_json(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def stage1_state_dict(model: Vq3dModel, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The model's weights and buffers without the adversarial component's (the discriminator);
    floating tensors in ``dtype``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("adversarial."):
            continue
        value = value.detach().cpu()
        state[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return state


def camera_to_data(camera: CanonicalCamera) -> Dict[str, float]:
    """The canonical camera as ``config.json``'s ``data`` keeps it."""
    return {"camera_distance": float(camera.distance), "fov_deg": float(camera.fov_deg)}


def model_metadata(model: Vq3dModel) -> Dict[str, Any]:
    """``config.json``'s ``data``: the model's canonical camera (which its training data had: the
    pipeline checks they agree) and what :meth:`Vq3dModel.populate_modules` read from the dataparser."""
    metadata = model.kwargs.get("metadata") or {}
    return {
        **camera_to_data(model.config.canonical_camera),
        "depth_kind": metadata.get("depth_kind", "none"),
        "class_names": list(metadata.get("class_names") or []),
    }


def write_package_files(
    folder: Path, model: Vq3dModel, provenance: Dict[str, Any], about: Dict[str, Any], dtype: torch.dtype = torch.float32
) -> Dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and the ``README.md`` model card of ``model``
    into ``folder`` (the caller makes the folder appear atomically); returns ``config.json``'s
    contents. ``about``: ``description`` (one line) and ``eval`` (:func:`eval_figures`, optional)."""
    from safetensors.torch import save_file

    info = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(dtype).replace("torch.", ""),
        "model": config_to_json(model.config),
        "data": model_metadata(model),
        "provenance": provenance,
        "about": about,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    save_file(stage1_state_dict(model, dtype), str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors writes 0600; a package is for sharing
    (folder / CARD_FILE).write_text(model_card(folder.name.lstrip(".").split(".partial")[0], info))
    return info


# ---- reading ---------------------------------------------------------------------------------------
def camera_from_data(data: Dict[str, Any]) -> CanonicalCamera:
    """The canonical camera of ``config.json``'s ``data`` (:func:`camera_to_data`; its keys are
    checked by :func:`~vq3d_nerfstudio.model_index.read_package_config`)."""
    return CanonicalCamera(distance=data["camera_distance"], fov_deg=data["fov_deg"])


def config_from_json(fields: Dict[str, Any], path: Path, camera: CanonicalCamera) -> Vq3dModelConfig:
    """The model config of ``config.json``'s ``model`` object with ``camera``, its ``data``'s
    (:func:`camera_from_data`); unknown or missing fields (but :data:`INFERENCE_FIELDS`), or a
    quantizer of no known type, are :class:`PackageError` naming ``path``. A package written before
    the adversarial options were nested or booleans were named ``use_*`` loads
    (:func:`~vq3d_nerfstudio.stage1.model.upgrade_model_fields`), its :data:`MOVED_DATA_FIELDS` ignored."""
    fields = {k: v for k, v in upgrade_model_fields(fields).items() if k not in MOVED_DATA_FIELDS}
    known = {f.name: f for f in dataclasses.fields(Vq3dModelConfig) if f.name not in SKIPPED_FIELDS + DATA_FIELDS}
    unknown = sorted(set(fields) - set(known))
    missing = sorted(set(known) - set(fields) - set(INFERENCE_FIELDS))
    if unknown or missing:
        said = "; ".join(x for x in (unknown and f"unknown fields {unknown}", missing and f"missing fields {missing}") if x)
        raise PackageError(f"{path}: 'model' does not fit this install's model ({said}); remake the package with this vq3d version")
    defaults = Vq3dModelConfig()
    values: Dict[str, Any] = {"canonical_camera": camera}
    for name, value in fields.items():
        if name == "quantizer":
            value = _quantizer_from_json(value, path)
        elif name == "adversarial" and not isinstance(value, AdversarialConfig):  # else: built from flat fields
            value = _component_from_json(AdversarialConfig, value, path, "adversarial", "the adversarial options")
        elif isinstance(getattr(defaults, name), tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        config = Vq3dModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise PackageError(f"{path}: 'model' is not a valid model config ({err}); remake the package") from None
    problem = config_type_problem(config, ("model",))
    if problem is not None:
        raise PackageError(f"{path}: {problem}; remake the package")
    return config


def _quantizer_from_json(value: Any, path: Path):
    kinds = ", ".join(QUANTIZER_COMMANDS)
    if not isinstance(value, dict) or value.get("type") not in QUANTIZER_COMMANDS:
        raise PackageError(f"{path}: 'model.quantizer' needs a 'type' of {kinds}; remake the package")
    cls = QUANTIZER_COMMANDS[value["type"]]
    return _component_from_json(cls, {k: v for k, v in value.items() if k != "type"}, path, "quantizer", value["type"])


def _component_from_json(cls: type, fields: Any, path: Path, name: str, kind: str):
    """The nested config ``cls`` of ``config.json``'s ``model.<name>`` object ``fields`` (renamed
    options under their old names too); other fields than ``cls``'s are a :class:`PackageError`."""
    if not isinstance(fields, dict):
        raise PackageError(f"{path}: 'model.{name}' is not an object; remake the package")
    fields = under_current_names(cls, fields)
    known = {f.name for f in dataclasses.fields(cls) if f.name not in SKIPPED_FIELDS}
    if set(fields) != known:
        raise PackageError(f"{path}: 'model.{name}' fields {sorted(fields)} do not fit {kind} ({sorted(known)}); remake the package")
    default = cls()
    fields = {k: tuple(v) if isinstance(getattr(default, k), tuple) and isinstance(v, list) else v for k, v in fields.items()}
    return cls(**fields)


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else (missing, truncated, a pickle) is one
    :class:`PackageError`. safetensors parses a JSON header and raw bytes: it never runs code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PackageError(f"{path}: missing; copy the whole package folder, or remake it with vq3d package")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PackageError(f"{path}: not a complete safetensors file ({reason}); copy the package again or remake it with vq3d package") from None


def build_model(config: Vq3dModelConfig, data: Dict[str, Any], device: str = "cpu") -> Vq3dModel:
    """A :class:`Vq3dModel` for inference from its config (the canonical camera included) and the
    dataparser values it reads (``data``'s depth kind and class names), without a dataparser: no
    discriminator, no training data."""
    config = dataclasses.replace(config, adversarial=dataclasses.replace(config.adversarial, loss_mult=0.0))
    metadata = {key: data[key] for key in DATA_KEYS if key not in camera_to_data(config.canonical_camera)}
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1, metadata=metadata)
    return model.to(device).eval()


def load_package(folder: Path, device: str = "cpu") -> Tuple[Vq3dModel, Dict[str, Any]]:
    """``(model in eval mode, config.json contents)`` of a package folder. Every problem - missing or
    truncated files, another version, unknown or missing fields, tensors that do not fit - is one
    :class:`PackageError` naming the file and the fix."""
    info = read_package_config(folder)
    config = config_from_json(info["model"], folder / CONFIG_FILE, camera_from_data(info["data"]))
    state = read_weights(folder / WEIGHTS_FILE)
    try:
        model = build_model(config, info["data"], "cpu")
    except (ValueError, AssertionError) as err:
        raise PackageError(f"{folder / CONFIG_FILE}: the model cannot be built from it ({err}); remake the package") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unknown or wrong:
        said = "; ".join(
            f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unknown", unknown), ("wrong shape", wrong))
            if names
        )
        raise PackageError(f"{folder / WEIGHTS_FILE}: tensors do not fit {CONFIG_FILE} ({said}); the files come from different packages")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), info
