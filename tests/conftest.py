"""Shared fixtures: tiny data made on the fly, and the environment for the real CLI commands."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vq3d_nerfstudio.data.synth import write_scenes

BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """Path of a console script installed beside this Python (ns-train, vq3d, ...)."""
    return str(BIN / name)


@pytest.fixture
def cli_env():
    """Environment for subprocesses: this venv's bin first on PATH (ns-* and ffmpeg), quiet warnings."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """24 `vq3d synth` scenes at 32 px with 3 views."""
    out = tmp_path_factory.mktemp("synth")
    write_scenes(out, num_scenes=24, resolution=32, num_views=3, seed=0, num_workers=1, progress=False)
    return out


def write_image(path: Path, size=(20, 12), color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)
    return path
