"""Shared fixtures: tiny data made on the fly, and the environment for the real CLI commands
(plain helpers are in ``helpers.py``)."""

import os
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, cli_environment, run

from vq3d_nerfstudio.data.synth import write_scenes

# The viewer compiles its density passes in the background (ns/viewer_controls.py): not in the tests,
# where a pass turning compiled mid-test would change renders by float rounding (test_baked.py tests
# the compiled pass on its own).
os.environ.setdefault("VQ3D_NO_COMPILE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: skipped, with the reason, where none is visible
    (``benchmarks/gpu.py`` runs them on one with ``pytest -m cuda``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on one by benchmarks/gpu.py: pytest -m cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def cli_env():
    """Environment for subprocesses: this venv's bin first on PATH (ns-* and ffmpeg), quiet warnings."""
    return cli_environment()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """24 `vq3d synth` scenes at 32 px with 3 views."""
    out = tmp_path_factory.mktemp("synth")
    write_scenes(out, num_scenes=24, resolution=32, num_views=3, seed=0, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(synth_dir, tmp_path_factory):
    """A 6-step `ns-train vq3d-tiny` run through the real CLI: ``(config.yml, env)``."""
    out = tmp_path_factory.mktemp("runs")
    env = cli_environment()
    run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(out),
         "--experiment-name", "cli", "--max-num-iterations", "6", *FAST], env)
    configs = list(out.glob("cli/vq3d-tiny/*/config.yml"))
    assert len(configs) == 1
    assert list(configs[0].parent.glob("nerfstudio_models/step-000000005.ckpt"))
    return configs[0], env
