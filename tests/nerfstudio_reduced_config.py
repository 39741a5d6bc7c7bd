"""``set_reduced_config`` from nerfstudio 1.1.5's ``tests/test_train.py``, copied verbatim (Apache-2.0,
(c) the Nerfstudio Team) from its sdist ``nerfstudio-1.1.5.tar.gz`` (sha256 c3d8fd27208565e2...),
which pip does not install. It reads the Blender scene at ``tests/data/lego_test`` relative to the
working directory. The file name does not start with ``test_`` so pytest collects nothing here."""

from __future__ import annotations

from pathlib import Path

from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.models.vanilla_nerf import VanillaModelConfig


def set_reduced_config(config: TrainerConfig, tmp_path: Path):
    """Reducing the config settings to speedup test"""
    config.machine.device_type = "cpu"
    if hasattr(config.pipeline.model, "implementation"):
        setattr(config.pipeline.model, "implementation", "torch")
    config.mixed_precision = False
    config.use_grad_scaler = False
    config.max_num_iterations = 2
    # reduce dataset factors; set dataset to test
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig(data=Path("tests/data/lego_test"))
    config.pipeline.datamanager.train_num_images_to_sample_from = 1
    config.pipeline.datamanager.train_num_rays_per_batch = 4

    # use tensorboard logging instead of wandb
    config.vis = "tensorboard"
    config.logging.relative_log_dir = Path("/tmp/")

    # reduce model factors
    if hasattr(config.pipeline.model, "num_coarse_samples"):
        assert isinstance(config.pipeline.model, VanillaModelConfig)
        config.pipeline.model.num_coarse_samples = 4
    if hasattr(config.pipeline.model, "num_importance_samples"):
        assert isinstance(config.pipeline.model, VanillaModelConfig)
        config.pipeline.model.num_importance_samples = 4
    # remove viewer
    config.viewer.quit_on_train_completion = True

    # timestamp & output directory
    config.set_timestamp()
    config.output_dir = tmp_path / "outputs"

    return config
