"""Shared fixtures: tiny data made on the fly, and the environment for the real CLI commands."""

import os
import subprocess
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


#: ns-train options that keep CLI runs to seconds on a CPU.
FAST = [
    "--vis", "tensorboard",
    "--pipeline.datamanager.images-per-batch", "2",
    "--pipeline.datamanager.rays-per-image", "32",
    "--pipeline.datamanager.num-workers", "0",
    "--steps-per-eval-batch", "3",
    "--steps-per-eval-image", "3",
]


def run(args, env, timeout=300):
    """Run a console script; fail the test with its output when it fails."""
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def trained_run(synth_dir, tmp_path_factory):
    """A 6-step `ns-train vq3d-tiny` run through the real CLI: ``(config.yml, env)``."""
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(out),
         "--experiment-name", "cli", "--max-num-iterations", "6", *FAST], env)
    configs = list(out.glob("cli/vq3d-tiny/*/config.yml"))
    assert len(configs) == 1
    assert list(configs[0].parent.glob("nerfstudio_models/step-000000005.ckpt"))
    return configs[0], env
