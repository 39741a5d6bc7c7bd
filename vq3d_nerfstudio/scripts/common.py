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
from typing import Any, List, Literal, Optional, Tuple, TypeVar

import tyro
from typing_extensions import Annotated

from vq3d_nerfstudio.checks import UNPREFIXED, PositiveInt, check_options
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


@dataclass
class Orbit:
    """Video of the camera orbiting the input view (yaw swings, elevation bobs): its range, frame rate
    and size."""

    max_yaw_deg: float = 20.0
    """Largest yaw of the orbit (degrees)."""
    max_elevation_deg: float = 8.0
    """Largest elevation of the orbit (degrees)."""
    fps: PositiveInt = 24
    """Video frame rate."""
    resolution: int = 0
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
class ImageChoice:
    """Which image a command reconstructs: a photo (``--image``) or a dataset image of the run."""

    image: Optional[Path] = None
    """Any photo instead of a dataset image (centre-cropped and resized to the model's size);
    outputs are then named after the file."""
    split: Literal["eval", "train"] = "eval"
    """Which split the image comes from; eval images were held out of training."""
    image_index: int = 0
    """Index of the image within the split."""

    def load(self, pipeline: Any, command: str) -> Tuple[Any, str]:
        """``([S, S, 3] image, name)``: the photo and its file stem, or the dataset image and
        ``<split>_<index>``. A missing or unreadable image stops with one line."""
        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.errors import DatasetError

        try:
            if self.image is not None:
                return load_image(self.image, pipeline.model.config.image_size), self.image.stem
            return pipeline.load_image(self.split, self.image_index), f"{self.split}_{self.image_index:05d}"
        except (IndexError, DatasetError) as err:
            raise SystemExit(f"vq3d {command}: error: {err}") from None


def load_run(load_config: Path, command: str, load_step: Optional[int] = None) -> Any:
    """The pipeline of a trained stage-1 run, set up for inference from its ``config.yml`` and the
    checkpoint of ``load_step`` (default: the latest, also when the config names the step a resumed
    run started from). A missing file stops with one line naming it and the fix, before
    nerfstudio's slow set-up and its traceback."""
    if not load_config.exists():
        raise SystemExit(f"vq3d {command}: error: {load_config} does not exist; pass the run's config.yml")
    if load_step is not None:
        checkpoint = load_config.parent / "nerfstudio_models" / f"step-{load_step:09d}.ckpt"
        if not checkpoint.exists():
            raise SystemExit(f"vq3d {command}: error: {checkpoint} does not exist; pick a step saved in that folder")
    from nerfstudio.utils.eval_utils import eval_setup

    def pick_step(config):
        config.load_step = load_step
        return config

    _, pipeline, _, _ = eval_setup(load_config, test_mode="inference", update_config_callback=pick_step)
    return pipeline


def run(command, name: str) -> None:
    """Check a parsed subcommand's options (:func:`~vq3d_nerfstudio.checks.check_options`: finite
    floats, positive counts, writable outputs), then run it. ``name``: the subcommand, for messages."""
    check_options(command, f"vq3d {name}")
    command.main()
