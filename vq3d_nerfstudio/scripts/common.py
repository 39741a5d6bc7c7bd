"""What every ``vq3d`` subcommand shares. Commands import this module, never each other or ``cli``.

The commands import torch, nerfstudio and the model inside ``main()``: ``vq3d --help`` and option
errors then answer in a fraction of a second instead of after the ~3 s those imports take.

Options that several commands take are declared once here, as small dataclasses a command embeds
as one field annotated :data:`Flat` (their flags keep their plain names: ``--fps``, not
``--orbit.fps``). A command that says what an option does for it in its own words embeds a
:func:`reworded` copy; name, type and default stay the shared ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional, Tuple, TypeVar

import tyro
from typing_extensions import Annotated

from vq3d_nerfstudio.checks import (
    UNPREFIXED,
    ElevationRange,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    YawRange,
    check_options,
    config_type_problem,
    ranged,
)
from vq3d_nerfstudio.geometry.poses import orbit_path

Group = TypeVar("Group")

Flat = Annotated[Group, UNPREFIXED, tyro.conf.OmitArgPrefixes, tyro.conf.arg(help="")]
"""A command's field holding an option group: tyro and the option checks spell its options without
the field's name (``--max-yaw-deg``, the flag the README and users' scripts use), and the group's
docstring stays out of ``--help``, which lists the options under the field's name."""


def reworded(group: type, **help_texts: str) -> type:
    """A subclass of option group ``group`` in which the named options have the given help texts.
    An option's help says what it does in that command (which views a yaw also sets, what a frame
    count counts), so commands share the option and word its help themselves."""
    hints = typing.get_type_hints(group, include_extras=True)
    defaults = {f.name: f for f in dataclasses.fields(group)}
    fields = [
        (name, Annotated[hints[name], tyro.conf.arg(help=text)], dataclasses.field(default=defaults[name].default))
        for name, text in help_texts.items()
    ]
    return dataclasses.make_dataclass(group.__name__, fields, bases=(group,))


Temperature = NonNegativeFloat
"""Sampling temperature; 0 takes the most likely code."""
TopK = ranged(Optional[int], 1)
"""Top-k sampling: None samples among all codes."""
TopP = ranged(Optional[float], 0, 1, low_open=True)
"""Nucleus sampling: the smallest set of codes whose probability reaches p; 1 (or None) is every code."""
GuidanceScale = NonNegativeFloat
"""Classifier-free guidance weight: 0 unconditional, 1 plain conditioning, larger follows the class more."""


@dataclass
class Orbit:
    """Video of the camera orbiting the input view (yaw swings, elevation bobs): its range, frame rate
    and size."""

    max_yaw_deg: YawRange = 20.0
    """Largest yaw of the orbit (degrees)."""
    max_elevation_deg: ElevationRange = 8.0
    """Largest elevation of the orbit (degrees)."""
    fps: PositiveInt = 24
    """Video frame rate."""
    resolution: NonNegativeInt = 0
    """Render size in pixels; 0 uses the model's image size."""

    def path(self, num_frames: int) -> List[Tuple[float, float]]:
        """``num_frames`` (yaw, elevation) poses of one closed loop of the orbit."""
        return orbit_path(num_frames, self.max_yaw_deg, self.max_elevation_deg)

    def size(self, model: Any) -> int:
        """Render size in pixels: ``--resolution``, or the model's own image size."""
        return self.resolution or model.config.image_size


@dataclass
class OrbitLoop(Orbit):
    """An :class:`Orbit` video with its own frame count (commands whose frames are not tied to
    other steps, as interpolation's are)."""

    num_frames: PositiveInt = 48
    """Frames in the orbit loop."""

    def loop(self) -> List[Tuple[float, float]]:
        """The ``--num-frames`` poses of the loop."""
        return self.path(self.num_frames)


@dataclass
class LoadedModel:
    """A stage-1 model ready for inference, from a model package or a training run."""

    model: Any
    """The :class:`~vq3d_nerfstudio.stage1.model.Vq3dModel`, in eval mode."""
    pipeline: Any = None
    """A run's pipeline (its dataset images, its datamanager); None for a package."""
    package: Optional[dict] = None
    """A package's config.json; None for a run."""
    folder: Optional[Path] = None
    """A package's folder; None for a run."""

    def dataset_image(self, split: str, index: int, command: str) -> Any:
        """Image ``index`` of a run's ``split``; a package has no dataset: one line saying so."""
        if self.pipeline is None:
            raise SystemExit(f"vq3d {command}: error: a model package holds no dataset images; pass --image PHOTO")
        return self.pipeline.load_image(split, index)

    def orbit_rays(self, num_rays: int) -> Any:
        """Rays of random cameras orbiting the pivot within ns-export's range (the run's datamanager
        settings; a package uses their defaults)."""
        if self.pipeline is not None:
            return self.pipeline.datamanager.orbit_rays(num_rays)
        from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
        from vq3d_nerfstudio.geometry.cameras import orbit_rays

        model, defaults = self.model, Vq3dDataManagerConfig()
        return orbit_rays(
            num_rays, model.config.image_size, model.camera_distance, model.fov_deg,
            defaults.export_max_yaw_deg, defaults.export_max_elevation_deg, model.device,
        )


@dataclass
class ModelSource:
    """Which trained stage-1 model a command runs: a model package or a training run."""

    model: Optional[str] = None
    """A model package folder (vq3d package writes one), the name of a shipped model (vq3d models
    lists them) or of one in $VQ3D_HOME/models, a hub id org/name (needs huggingface_hub), or a
    training run's config.yml or folder."""
    load_config: Optional[Path] = None
    """A training run's config.yml (outputs/<experiment>/vq3d-tiny/<timestamp>/config.yml); the same
    as --model with that path."""

    def resolve(self, command: str) -> Path:
        """A package folder or a run's ``config.yml``; a missing choice or an unknown name stops with
        one line."""
        from vq3d_nerfstudio.errors import PackageError
        from vq3d_nerfstudio.model_index import resolve_model

        if (self.model is None) == (self.load_config is None):
            raise SystemExit(
                f"vq3d {command}: error: pass one of --model NAME_OR_PATH (a package, a shipped model: see vq3d models) "
                "or --load-config RUN/config.yml"
            )
        if self.load_config is not None:
            return self.load_config
        try:
            return resolve_model(self.model)
        except PackageError as err:
            raise SystemExit(f"vq3d {command}: error: {err}") from None

    def load(self, command: str, load_step: Optional[int] = None) -> LoadedModel:
        """The model, built from a package alone (JSON and safetensors: no dataparser, no pickle) or
        from a run's pipeline. A missing choice or a bad package stops with one line."""
        from vq3d_nerfstudio.errors import PackageError
        from vq3d_nerfstudio.model_index import is_package
        from vq3d_nerfstudio.stage1.package import load_package

        path = self.resolve(command)
        try:
            if not is_package(path):
                pipeline = load_run(path, command, load_step)
                return LoadedModel(pipeline.model.eval(), pipeline=pipeline)
            if load_step is not None:
                raise SystemExit(f"vq3d {command}: error: --load-step picks a checkpoint of a run; {path} is a package of one step")
            import torch

            model, info = load_package(path, "cuda" if torch.cuda.is_available() else "cpu")
        except PackageError as err:
            raise SystemExit(f"vq3d {command}: error: {err}") from None
        return LoadedModel(model, package=info, folder=path)


def load_stage2(command: str, stage2_checkpoint: Optional[Path], model: Optional[str], stage1_config: Optional[Path],
                check_classes: Optional[Callable[[List[str], int], Any]] = None):
    """``(transformer, its config.json, checkpoint folder, LoadedModel)`` for sampling: the stage-2
    model of ``--stage2-checkpoint`` (default: the ``stage2/`` of a ``--model`` package) and the
    stage-1 model of ``--model``, else ``--stage1-config``, else the run the stage-2 checkpoint
    records. ``check_classes(class names, number of classes)`` checks a ``--class-label`` against
    the stage-2 model's config.json first, before any model loads (raising ``SampleError``). Every
    problem stops with one line."""
    from vq3d_nerfstudio.model_index import STAGE2_DIR, is_package
    from vq3d_nerfstudio.stage2.checkpoint import CheckpointError, load_model, read_info
    from vq3d_nerfstudio.stage2.sample import SampleError, stage1_config_of

    source = ModelSource(model=model).resolve(command) if model is not None else None
    if stage2_checkpoint is None:
        if source is None or not is_package(source) or not (source / STAGE2_DIR).is_dir():
            raise SystemExit(
                f"vq3d {command}: error: pass --stage2-checkpoint (a vq3d-train-stage2 run), or --model a package "
                f"with a {STAGE2_DIR}/ folder (vq3d package --stage2-checkpoint writes one)"
            )
        stage2_checkpoint = source / STAGE2_DIR
    try:
        info, _ = read_info(stage2_checkpoint)
        num_classes = (info.get("model") or {}).get("num_classes")
        if check_classes is not None and isinstance(num_classes, int) and num_classes > 0:  # else load_model says what is wrong
            check_classes(list(info.get("class_names") or []), num_classes)
        transformer, info, folder = load_model(stage2_checkpoint)
        if source is None:
            stage1_config = stage1_config_of(info, stage1_config, folder / "config.json")  # a recorded config.yml: checked
    except (CheckpointError, SampleError) as err:
        raise SystemExit(f"vq3d {command}: error: {err}") from None
    if source is not None:
        loaded = ModelSource(model=str(source)).load(command)
    else:
        loaded = ModelSource(load_config=stage1_config).load(command)
    return transformer, info, folder, loaded


@dataclass
class ImageChoice:
    """Which image a command reconstructs: a photo (``--image``) or a dataset image of the run."""

    image: Optional[Path] = None
    """Any photo instead of a dataset image (centre-cropped and resized to the model's size);
    outputs are then named after the file."""
    split: Literal["eval", "train"] = "eval"
    """Which split the image comes from; eval images were held out of training (a run only: a
    package has no dataset, pass --image)."""
    image_index: NonNegativeInt = 0
    """Index of the image within the split."""

    def load(self, loaded: LoadedModel, command: str) -> Tuple[Any, str]:
        """``([S, S, 3] image, name)``: the photo and its file stem, or the dataset image and
        ``<split>_<index>``. A missing or unreadable image stops with one line."""
        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.errors import DatasetError

        try:
            if self.image is not None:
                return load_image(self.image, loaded.model.config.image_size), self.image.stem
            return loaded.dataset_image(self.split, self.image_index, command), f"{self.split}_{self.image_index:05d}"
        except (IndexError, DatasetError) as err:
            raise SystemExit(f"vq3d {command}: error: {err}") from None


def load_run(load_config: Path, command: str, load_step: Optional[int] = None) -> Any:
    """The pipeline of a trained stage-1 run, set up for inference from its ``config.yml`` and the
    checkpoint of ``load_step`` (default: the latest, also when the config names the step a resumed
    run started from). A missing file stops with one line naming it and the fix, before
    nerfstudio's slow set-up and its traceback."""
    if not load_config.exists():
        raise SystemExit(f"vq3d {command}: error: {load_config} does not exist; pass the run's config.yml or a model package")
    if load_step is not None:
        checkpoint = load_config.parent / "nerfstudio_models" / f"step-{load_step:09d}.ckpt"
        if not checkpoint.exists():
            raise SystemExit(f"vq3d {command}: error: {checkpoint} does not exist; pick a step saved in that folder")
    from nerfstudio.utils.eval_utils import eval_setup

    from vq3d_nerfstudio.checks import nerfstudio_checkpoint_problem

    def pick_step(config):
        problem = config_type_problem(config)  # a hand-edited config.yml: named before anything is built
        if problem is not None:
            raise SystemExit(f"vq3d {command}: error: {load_config}: {problem}; fix it in the file")
        config.load_step = load_step
        problem = nerfstudio_checkpoint_problem(config.get_checkpoint_dir(), load_step)  # empty, truncated
        if problem is not None:
            raise SystemExit(f"vq3d {command}: error: {problem}")
        return config

    _, pipeline, _, _ = eval_setup(load_config, test_mode="inference", update_config_callback=pick_step)
    return pipeline


def run(command, name: str) -> None:
    """Check a parsed subcommand's options (:func:`~vq3d_nerfstudio.checks.check_options`: finite
    floats, positive counts, writable outputs), then run it. ``name``: the subcommand, for messages.
    The error boundary of the ``vq3d`` subcommands: a :class:`~vq3d_nerfstudio.errors.Vq3dError`
    (a bad option, a full disk: :class:`~vq3d_nerfstudio.files.DiskFullError`, ...) stops it with
    ``"vq3d <name>: error: <its message>"`` and exit status 1."""
    from vq3d_nerfstudio.errors import Vq3dError
    from vq3d_nerfstudio.files import disk_full_as_error

    try:
        check_options(command)
        with disk_full_as_error():
            command.main()
    except Vq3dError as err:
        raise SystemExit(f"vq3d {name}: error: {err}") from None
