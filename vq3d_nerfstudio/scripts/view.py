"""``vq3d view``: nerfstudio's web viewer on a model package (or a run), no training data needed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

from vq3d_nerfstudio.checks import ranged
from vq3d_nerfstudio.scripts.common import Flat, ModelSource


@dataclass
class View:
    """Open nerfstudio's web viewer (viser) on a model, with VQ3D's controls: pick an image, upload
    any photo to see its NeRF, blend and place scenes, and sample scenes when the model has a
    stage-2 part. A package needs no training data: the panel's images are the package's examples/
    (or --images). With --load-config it is ns-viewer on that run."""

    source: Flat[ModelSource] = field(default_factory=ModelSource)
    images: Optional[Path] = None
    """A folder of photos the panel's image index picks from (default: the package's examples/)."""
    websocket_port: ranged(Optional[int], 1, 65535) = None
    """The viewer's port (default: nerfstudio's, 7007, or the next free one)."""

    def main(self) -> None:
        import tempfile

        from nerfstudio.scripts.viewer.run_viewer import RunViewer, ViewerConfigWithoutNumRays, _start_viewer

        from vq3d_nerfstudio.model_index import is_package

        path = self.source.resolve("view")
        if not is_package(path):  # a run: ns-viewer's own path
            if self.images is not None:
                raise SystemExit("vq3d view: error: --images is for a package; a run shows its own dataset")
            viewer = ViewerConfigWithoutNumRays()
            if self.websocket_port is not None:
                viewer.websocket_port = self.websocket_port
            RunViewer(load_config=path, viewer=viewer).main()
            return
        loaded = self.source.load("view")
        with tempfile.TemporaryDirectory(prefix="vq3d_view_") as tmp:
            config, pipeline = package_pipeline(loaded, self.images, Path(tmp))
            config.viewer.websocket_port = self.websocket_port
            _start_viewer(config, pipeline, step=0)


def package_pipeline(loaded, images: Optional[Path], workdir: Path):
    """``(trainer config, pipeline)`` for the viewer: the method preset of the package's image size
    with the package's model config, a vq3d-images dataparser over the example photos (copied into
    ``workdir``), and the package's weights."""
    import copy
    import dataclasses
    import shutil

    from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
    from vq3d_nerfstudio.data.folders import is_image_file
    from vq3d_nerfstudio.model_index import STAGE2_DIR
    from vq3d_nerfstudio.ns.method_configs import vq3d, vq3d_tiny

    model = loaded.model
    source = images if images is not None else loaded.folder / "examples"
    photos = sorted(p for p in source.iterdir() if is_image_file(p)) if source.is_dir() else []
    if not photos:
        raise SystemExit(
            f"vq3d view: error: no photos in {source}; pass --images FOLDER (any photos: the panel picks among them)"
        )
    data = workdir / "images"
    data.mkdir()
    for i, photo in enumerate(photos):
        shutil.copyfile(photo, data / f"{i:04d}_{photo.name}")
    preset = vq3d_tiny if model.config.image_size <= 64 else vq3d
    config = copy.deepcopy(preset.config)
    config.pipeline.model = dataclasses.replace(
        model.config, adversarial=dataclasses.replace(model.config.adversarial, loss_mult=0.0)
    )
    config.pipeline.datamanager.dataparser = Vq3dImagesDataParserConfig(
        data=data, image_size=model.config.image_size, canonical_camera=model.canonical_camera,
        depth_kind="none", eval_fraction=0.0,
    )
    config.pipeline.datamanager.num_workers = 0
    if (loaded.folder / STAGE2_DIR).is_dir():
        config.pipeline.stage2_checkpoint = loaded.folder / STAGE2_DIR
    config.output_dir = workdir / "outputs"
    config.set_timestamp()
    config.get_base_dir().mkdir(parents=True)  # the viewer keeps its log there
    config.machine.device_type = model.device.type
    config.vis = "viewer"
    pipeline = config.pipeline.setup(device=str(model.device), test_mode="inference")
    pipeline.model.load_state_dict(model.state_dict())
    pipeline.eval()
    return config, pipeline


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(View), "view")
