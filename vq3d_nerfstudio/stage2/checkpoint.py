"""Stage-2 checkpoints in a safe format: safetensors for tensors, JSON for everything else.

Loading one never executes code (unlike a pickled ``.ckpt``). Layout::

    <run>/checkpoints/step-000001000/
        model.safetensors       transformer weights
        optimizer.safetensors   AdamW moments, keyed "<param index>.<name>"
        state.json              step, optimizer hyper-parameters per group, training config
        config.json             everything sampling needs: network sizes, classes, stage-1 run

A checkpoint is written into a temporary folder that is renamed when complete, so an interrupted
save never leaves a broken ``step-*`` folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import disk_full_as_error
from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig

STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(Vq3dError, ValueError):
    """A stage-2 checkpoint that is missing, truncated, tampered with or does not fit."""


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Finished checkpoints under ``run_dir/checkpoints``, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resolve_checkpoint(path: Path) -> Path:
    """A ``step-*`` folder as given, or the latest one of a run folder."""
    if (path / "model.safetensors").exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path}: no stage-2 checkpoint (expected <run>/checkpoints/step-*/model.safetensors); "
            "pass a run folder of vq3d-train-stage2 or one of its step folders"
        )
    return found[-1]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: TokenTransformer,
    optimizer: torch.optim.Optimizer,
    train_state: Dict,
    info: Dict,
    keep: int = 3,
) -> Path:
    """Write ``run_dir/checkpoints/step-<step>`` atomically and keep the newest ``keep``. A failed
    save (a full disk: :class:`~vq3d_nerfstudio.files.DiskFullError`) removes its temporary folder
    and leaves the checkpoints before it as they were."""
    final = run_dir / "checkpoints" / f"step-{step:09d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with disk_full_as_error(final):
            _write_checkpoint_folder(tmp, step, model, optimizer, train_state, info)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_folder(
    tmp: Path, step: int, model: TokenTransformer, optimizer: torch.optim.Optimizer, train_state: Dict, info: Dict
) -> None:
    """The files of a checkpoint, written and fsync'ed in the fresh folder ``tmp``."""
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "vq3d-stage2"})
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in opt_state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "param_groups": opt_state["param_groups"], "scalars": scalars, **train_state}, indent=1)
    )
    (tmp / "config.json").write_text(json.dumps({**info, "step": step}, indent=1))
    for path in (tmp / "model.safetensors", tmp / "optimizer.safetensors"):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _read_json(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is incomplete or corrupt") from err


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is truncated or corrupt") from err


def read_info(path: Path) -> Tuple[Dict, Path]:
    """``(config.json contents, checkpoint folder)`` of a run or step folder, without reading the weights:
    enough to check a class label or a grid before anything slow is loaded."""
    folder = resolve_checkpoint(path)
    return _read_json(folder / "config.json"), folder


def load_model(path: Path, device: str = "cpu") -> Tuple[TokenTransformer, Dict, Path]:
    """``(model in eval mode, config.json contents, checkpoint folder)`` of a run or step folder."""
    info, folder = read_info(path)
    try:
        model_config = TokenTransformerConfig(**info["model"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: no valid 'model' entry ({err!r})") from err
    model = TokenTransformer(model_config)
    state = _read_tensors(folder / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{folder / 'model.safetensors'}: weights do not fit config.json ({str(err).splitlines()[0]})") from err
    return model.to(device).eval(), info, folder


def load_training_state(folder: Path, model: TokenTransformer, optimizer: torch.optim.Optimizer) -> Dict:
    """Load weights and optimizer state for resuming; returns ``state.json``."""
    state = _read_json(folder / "state.json")
    step = state.get("step") if isinstance(state, dict) else None
    problem = None
    if not isinstance(state, dict):
        problem = f"holds a {type(state).__name__}, not a JSON object"
    elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problem = "has no 'step'" if step is None else f"'step' is {step!r}, not a step number"
    elif not isinstance(state.get("param_groups"), list):
        problem = "has no 'param_groups' list"
    elif not isinstance(state.get("train_time_s", 0.0), (int, float)):
        problem = f"'train_time_s' is {state['train_time_s']!r}, not a number"
    if problem is not None:
        raise CheckpointError(
            f"{folder / 'state.json'}: {problem}; the checkpoint is damaged: delete {folder} to resume from the "
            "checkpoint before it, or pass a new --output-dir"
        )
    weights = _read_tensors(folder / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{folder}: the saved network does not match this run's settings ({str(err).splitlines()[0]}); "
            "use the same --model, or a new --output-dir"
        ) from err
    tensors = _read_tensors(folder / "optimizer.safetensors")
    entries: Dict[int, Dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    for key, value in state.get("scalars", {}).items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{folder / 'optimizer.safetensors'}: does not fit this optimizer ({err})") from err
    return state


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
