"""Pipeline that hands the batch (the input images) to the model.

nerfstudio's ``VanillaPipeline`` calls ``model(ray_bundle)`` without the batch and renders eval
cameras without their image; VQ3D needs the image to build the NeRF, so this subclass passes it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from time import time
from typing import Dict, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils import profiler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.cuda.amp.grad_scaler import GradScaler

from vq3d_nerfstudio.checks import check_nerfstudio_command_line, config_type_problem, pop_renamed_fields
from vq3d_nerfstudio.data.datamanager import Vq3dDataManager, Vq3dDataManagerConfig, data_canonical_camera
from vq3d_nerfstudio.data.dataset import RelativeDisparityConfig, load_image
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.ns.viewer_controls import EditControls, SampleControls, SceneControls, SplatControls, ViewerSetup
from vq3d_nerfstudio.stage1.model import Vq3dModel, Vq3dModelConfig


@dataclass
class Vq3dPipelineConfig(VanillaPipelineConfig):
    """VQ3D pipeline: streaming image datamanager + the stage-1 model."""

    _target: Type = field(default_factory=lambda: Vq3dPipeline)
    datamanager: Vq3dDataManagerConfig = field(default_factory=Vq3dDataManagerConfig)
    """Image-collection datamanager."""
    model: Vq3dModelConfig = field(default_factory=Vq3dModelConfig)
    """Stage-1 model."""
    stage2_checkpoint: Optional[Path] = None
    """A vq3d-train-stage2 run (or checkpoint) trained on this stage-1 model: the viewer then gets a
    class box and a "Sample a scene" button. The environment variable VQ3D_STAGE2 sets it for
    ns-viewer on an existing run."""

    def __setstate__(self, state: dict) -> None:
        """A run's ``config.yml`` written when the model read its canonical camera from the data (its
        model config has none): the model's is the data's, as it was then. Removal: at version 0.2.0,
        when runs saved before the canonical camera was one object (issue 28) no longer need to load.
        So does one written when the relative-depth target's options were the model's
        (``relative_disparity_percentiles`` / ``_range``): their values move to the datamanager's
        ``relative_disparity``. Removal: with their old flags, at version 0.2.0."""
        self.__dict__.update(state)
        model, datamanager = state.get("model"), state.get("datamanager")
        if model is not None and "canonical_camera" not in vars(model) and datamanager is not None:
            model.canonical_camera = data_canonical_camera(datamanager.dataparser)
        if model is not None and isinstance(datamanager, Vq3dDataManagerConfig):
            moved = pop_renamed_fields(RelativeDisparityConfig, vars(model))
            if moved:
                datamanager.relative_disparity = RelativeDisparityConfig(**{**vars(datamanager.relative_disparity), **moved})


def check_canonical_cameras(config: Vq3dPipelineConfig) -> None:
    """``Vq3dError`` when the data's canonical camera (:func:`data_canonical_camera`: vq3d-images'
    own, the default one for other dataparsers) is not the model's: the data's cameras and the
    model's tri-plane frustum and novel views must be the same camera."""
    data_camera = data_canonical_camera(config.datamanager.dataparser)
    model_camera = config.model.canonical_camera
    if data_camera != model_camera:
        raise Vq3dError(
            f"the dataparser's canonical camera ({data_camera.describe()}) is not the model's "
            f"({model_camera.describe()}); set both the same (vq3d-images --canonical-camera.distance / "
            "--canonical-camera.fov-deg and --pipeline.model.canonical-camera.distance / .fov-deg)"
        )


def check_image_sizes(config: Vq3dPipelineConfig) -> None:
    """``Vq3dError`` when the data and the model disagree on the image size. The data's size is
    vq3d-images' own --image-size, else the datamanager's image_size (any other nerfstudio
    dataparser), else none is set (the model's is used)."""
    data_size = getattr(config.datamanager.dataparser, "image_size", None) or config.datamanager.image_size
    if data_size is not None and data_size != config.model.image_size:
        raise Vq3dError(
            f"dataparser image size {data_size} != model image size {config.model.image_size}; "
            "set both (vq3d-images --image-size / --pipeline.model.image-size)"
        )


def parse_scene_choice(
    choice: str, split_sizes: Optional[Dict[str, int]] = None
) -> Optional[Tuple[str, Union[int, Path]]]:
    """``VQ3D_SCENE`` (which scene ns-render / ns-export / the viewer show first) as ``None`` (unset),
    ``("train" | "eval", N)`` or ``("file", path)``. A one-line ``Vq3dError`` if it is none of ``eval:N``,
    ``train:N`` (``N`` below that split's size, when ``split_sizes`` gives it) or an existing image file."""
    choice = choice.strip()
    split, _, index = choice.partition(":")
    if split in ("train", "eval") and index.isdigit():
        size = (split_sizes or {}).get(split)
        if size is not None and int(index) >= size:
            valid = {0: "none", 1: f"only {split}:0"}.get(size, f"{split}:0 to {split}:{size - 1}")
            raise Vq3dError(
                f"VQ3D_SCENE={choice}: the {split} split has {size} image{'s' if size != 1 else ''} "
                f"({valid}); give an index in range, or a photo's path"
            )
        return split, int(index)
    if not choice:
        return None
    if Path(choice).is_file():
        return "file", Path(choice)
    raise Vq3dError(f"VQ3D_SCENE={choice}: no such image file; give eval:N, train:N or a photo's path")


def check_checkpoint_fits(model: torch.nn.Module, loaded_state: Dict) -> None:
    """A one-line ``Vq3dError`` when a checkpoint's model tensors are missing, extra or shaped
    differently from ``model``'s (a config.yml that is not the one the checkpoint was trained with)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for key, value in loaded_state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("_model."):
            key = key[len("_model.") :]
            found[key[len("module.") :] if key.startswith("module.") else key] = tuple(getattr(value, "shape", ()))
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    resized = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or extra or resized):
        return
    if resized:
        key = resized[0]
        example = f"{key} is {list(found[key])} in the checkpoint but {list(expected[key])} in this config"
    else:
        example = f"{(missing or extra)[0]} is {'missing from' if missing else 'extra in'} the checkpoint"
    raise Vq3dError(
        f"the checkpoint does not fit this config.yml ({len(resized)} tensors differ in shape, "
        f"{len(missing)} missing, {len(extra)} extra; e.g. {example}); load it with the config.yml saved beside it"
    )


class Vq3dPipeline(VanillaPipeline):
    """Passes input images to the model in training, eval and image metrics."""

    config: Vq3dPipelineConfig
    datamanager: Vq3dDataManager

    def __init__(
        self,
        config: Vq3dPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Optional[GradScaler] = None,
    ):
        """The error boundary of nerfstudio's commands, which build the pipeline first (ns-render,
        ns-export, ns-viewer, ns-eval; ns-train and the vq3d subcommands too): a bad ns-render /
        ns-export option stops with ``"<that command>: error: ..."``, any other ``Vq3dError`` (a
        hand-edited config.yml, no images, a bad VQ3D_SCENE, ...) with ``"vq3d: error: ..."``."""
        try:
            check_nerfstudio_command_line(sys.argv)  # ns-render / ns-export options, before the model loads
        except Vq3dError as err:
            raise SystemExit(f"{Path(sys.argv[0]).name}: error: {err}") from None
        try:
            self._setup(config, device, test_mode, world_size, local_rank, grad_scaler)
        except Vq3dError as err:
            raise SystemExit(f"vq3d: error: {err}") from None

    def _setup(self, config, device, test_mode, world_size, local_rank, grad_scaler) -> None:
        problem = config_type_problem(config, ("pipeline",))  # a hand-edited config.yml (ns-render, ns-viewer, ...)
        if problem is not None:
            raise Vq3dError(f"the run's config.yml: {problem}; fix it in the file")
        check_image_sizes(config)
        check_canonical_cameras(config)
        if not hasattr(config.datamanager.dataparser, "image_size") and config.datamanager.image_size is None:
            config.datamanager.image_size = config.model.image_size  # a nerfstudio dataparser: the model's size
        parse_scene_choice(os.environ.get("VQ3D_SCENE", ""))
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        sizes = {"train": len(self.datamanager.train_dataset), "eval": len(self.datamanager.eval_dataset)}
        choice = parse_scene_choice(os.environ.get("VQ3D_SCENE", ""), sizes)
        self._scene_file: Optional[Path] = None
        if choice is not None and choice[0] == "file":
            self._scene_file, choice = choice[1], ("file", 0)
        self.model.image_loader = self.load_image
        if choice is not None:
            self.model.default_scene = choice
        # Viewer controls: the viewer installs the pipeline's ViewerElement attributes (in name order).
        self._scene_controls = SceneControls(self)
        self.scene_1_split = self._scene_controls.split
        self.scene_2_index = self._scene_controls.index
        self.scene_3_random = self._scene_controls.random
        self.scene_4_upload = self._scene_controls.upload
        self.scene_5_shown = self._scene_controls.shown
        self.scene_5_status = self._scene_controls.status
        self._splat_controls = SplatControls(self, self.scene_5_status)
        self.scene_viewer_setup = ViewerSetup(self, self.scene_5_status, self._splat_controls)
        self.view_1_reset, self.view_2_limits = self.scene_viewer_setup.reset, self.scene_viewer_setup.limits
        self.view_3_splats = self._splat_controls.toggle
        self._edit_controls = EditControls(self, self._scene_controls.shown)
        edits = self._edit_controls
        self.zedit_1_set_a, self.zedit_2_set_b, self.zedit_3_blend, self.zedit_4_space = edits.set_a, edits.set_b, edits.blend, edits.space
        self.zedit_5_place, self.zedit_6_position, self.zedit_7_scale = edits.place, edits.position, edits.scale
        stage2 = os.environ.get("VQ3D_STAGE2", "").strip() or config.stage2_checkpoint
        if stage2:
            if not Path(stage2).exists():
                raise Vq3dError(f"stage-2 checkpoint {stage2} does not exist; pass a vq3d-train-stage2 run folder")
            self._sample_controls = SampleControls(self, Path(stage2), self._scene_controls.shown)
            self.scene_6_sample_class = self._sample_controls.class_label
            self.scene_7_sample_guidance = self._sample_controls.guidance
            self.scene_8_sample_temperature = self._sample_controls.temperature
            self.scene_9_sample = self._sample_controls.button

    @property
    def model(self) -> Vq3dModel:
        return super().model  # type: ignore[return-value]

    def load_pipeline(self, loaded_state: Dict, step: int) -> None:
        """Load a checkpoint, refusing one that does not fit this config. (nerfstudio's own loader
        falls back to loading whatever matches, which would render noise from a mismatched config.)
        An error boundary (nerfstudio's eval_setup and ns-train --load-dir call it): a checkpoint that
        does not fit stops with ``"vq3d: error: ..."``."""
        try:
            check_checkpoint_fits(self.model, loaded_state)
        except Vq3dError as err:
            raise SystemExit(f"vq3d: error: {err}") from None
        super().load_pipeline(loaded_state, step)

    def load_image(self, split: str, index: int) -> torch.Tensor:
        """``[S, S, 3]`` image ``index`` of the 'train' or 'eval' split: that very image (never a
        replacement for a bad file: ``DatasetError`` names it instead); split 'file': the photo
        ``VQ3D_SCENE`` names."""
        if split == "file" and self._scene_file is not None:
            return load_image(self._scene_file, self.model.config.image_size)
        dataset = self.datamanager.train_dataset if split == "train" else self.datamanager.eval_dataset
        if not 0 <= index < len(dataset):
            raise IndexError(f"no {split} image {index}: the {split} split has {len(dataset)} images")
        return dataset.get_data(index)["image"]

    @profiler.time_function
    def get_train_loss_dict(self, step: int):
        ray_bundle, batch = self.datamanager.next_train(step)
        model_outputs = self._model(ray_bundle, batch)  # through _model so DDP syncs gradients
        metrics_dict = self.model.get_metrics_dict(model_outputs, batch)
        loss_dict = self.model.get_loss_dict(model_outputs, batch, metrics_dict)
        return model_outputs, loss_dict, metrics_dict

    @profiler.time_function
    def get_eval_loss_dict(self, step: int):
        self.eval()
        ray_bundle, batch = self.datamanager.next_eval(step)
        with torch.no_grad():
            model_outputs = self.model(ray_bundle, batch)
            metrics_dict = self.model.get_metrics_dict(model_outputs, batch)
            loss_dict = self.model.get_loss_dict(model_outputs, batch, metrics_dict)
        self.train()
        return model_outputs, loss_dict, metrics_dict

    @profiler.time_function
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        camera, batch = self.datamanager.next_eval_image(step)
        self.model.set_scene_images(batch["image"], key=("eval", int(batch["image_idx"])))
        with self.model.exact_field():  # metrics score the model, not its baked preview
            outputs = self.model.get_outputs_for_camera(camera)
        metrics_dict, images_dict = self.model.get_image_metrics_and_images(outputs, batch)
        metrics_dict["num_rays"] = (camera.height * camera.width * camera.size).item()
        self.train()
        return metrics_dict, images_dict

    @profiler.time_function
    def get_average_image_metrics(
        self,
        data_loader,
        image_prefix: str,
        step: Optional[int] = None,
        output_path: Optional[Path] = None,
        get_std: bool = False,
    ) -> Dict[str, float]:
        """Mean (and std) of the image metrics over ``data_loader``, each image rendered from its
        own NeRF (encoded from that image)."""
        import torchvision.utils as vutils

        self.eval()
        rows = []
        if output_path is not None:
            output_path.mkdir(exist_ok=True, parents=True)
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(), MofNCompleteColumn())
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("[green]Evaluating all images...", total=len(data_loader))
            for idx, (camera, batch) in enumerate(data_loader):
                self.datamanager.report_skipped(batch, step or 0)  # a bad file was replaced by the next image
                start = time()
                self.model.set_scene_images(batch["image"], key=("eval", int(batch["image_idx"])))
                with self.model.exact_field():
                    outputs = self.model.get_outputs_for_camera(camera=camera)
                metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
                metrics["fps"] = 1.0 / max(time() - start, 1e-9)
                if output_path is not None:
                    for key, image in images.items():
                        vutils.save_image(image.permute(2, 0, 1).cpu(), output_path / f"{image_prefix}_{key}_{idx:04d}.png")
                rows.append(metrics)
                progress.advance(task)
        self.train()
        result: Dict[str, float] = {}
        for key in rows[0]:
            values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
            result[key] = float(values.mean())
            if get_std:
                result[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
        return result
