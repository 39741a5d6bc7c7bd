"""Plain helpers shared by the tests (fixtures live in ``conftest.py``, which imports these): the
console scripts beside this Python, the environment and fast options for running them, tiny inputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from nerfstudio.data.scene_box import SceneBox
from PIL import Image

from vq3d_nerfstudio.stage1.model import Vq3dModelConfig
from vq3d_nerfstudio.stage1.quantizer import VQConfig

BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """Path of a console script installed beside this Python (ns-train, vq3d, ...)."""
    return str(BIN / name)


def cli_environment() -> dict:
    """Environment for subprocesses: this venv's bin first on PATH (ns-* and ffmpeg), quiet warnings."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore")


def write_image(path: Path, size=(20, 12), color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)
    return path


#: ns-train options that keep CLI runs to seconds on a CPU.
FAST = [
    "--vis", "tensorboard",
    "--pipeline.datamanager.images-per-batch", "2",
    "--pipeline.datamanager.rays-per-image", "32",
    "--pipeline.datamanager.num-workers", "0",
    "--steps-per-eval-batch", "3",
    "--steps-per-eval-image", "3",
]


def random_inception_state(seed: int = 0) -> dict:
    """A randomly initialised FID Inception-v3 state dict, keyed as pytorch-fid's and torch-fidelity's
    weights files are (torchvision's Inception3 uses the same names; no AuxLogits, 1008 classes).
    He-normal convolutions and identity batch norms keep the features O(1) through the depth."""
    import torchvision

    torch.manual_seed(seed)
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network.state_dict()


def run(args, env, timeout=300):
    """Run a console script; fail the test with its output when it fails."""
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def tiny_model(size: int = 16, triplane_resolution: int = 8, samples_per_ray: int = 8, num_train_data: int = 4,
               metadata=None, **overrides):
    """A stage-1 model small enough for unit tests (seeded weights), built as nerfstudio builds it."""
    overrides.setdefault("quantizer", VQConfig(size=32, code_dim=8))
    config = Vq3dModelConfig(
        image_size=size, patch_size=4, hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
        triplane_resolution=triplane_resolution, triplane_channels=4,
        field_hidden_dim=16, coarse_samples_per_ray=samples_per_ray, fine_samples_per_ray=samples_per_ray, **overrides,
    )
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=num_train_data,
                        metadata=metadata if metadata is not None else {})
