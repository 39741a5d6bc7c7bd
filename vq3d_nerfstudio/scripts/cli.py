"""The ``vq3d`` console script: one entry point, a subcommand per job."""

from __future__ import annotations

from typing import Union

import tyro
from typing_extensions import Annotated

from vq3d_nerfstudio.scripts.common import run
from vq3d_nerfstudio.scripts.compose import Compose
from vq3d_nerfstudio.scripts.evaluate import Evaluate
from vq3d_nerfstudio.scripts.export_splats import ExportSplats
from vq3d_nerfstudio.scripts.fid import Fid
from vq3d_nerfstudio.scripts.interpolate import Interpolate
from vq3d_nerfstudio.scripts.package import Models, Package
from vq3d_nerfstudio.scripts.prepare import Prepare
from vq3d_nerfstudio.scripts.reconstruct import Reconstruct
from vq3d_nerfstudio.scripts.render_orbit import RenderOrbit
from vq3d_nerfstudio.scripts.sample import Sample
from vq3d_nerfstudio.scripts.synth import Synth
from vq3d_nerfstudio.scripts.view import View

SUBCOMMANDS = {
    "synth": Synth, "reconstruct": Reconstruct, "render-orbit": RenderOrbit, "eval": Evaluate, "prepare": Prepare,
    "sample": Sample, "fid": Fid, "interpolate": Interpolate, "compose": Compose, "export-splats": ExportSplats,
    "package": Package, "models": Models, "view": View,
}
Commands = Union[tuple(Annotated[cls, tyro.conf.subcommand(name)] for name, cls in SUBCOMMANDS.items())]  # type: ignore[misc]

#: subcommand names by class name (a script run as ``python -m`` has its class under ``__main__``)
NAMES = {cls.__name__: name for name, cls in SUBCOMMANDS.items()}


def entrypoint() -> None:
    """Parse ``vq3d <subcommand> ...`` and run it."""
    command = tyro.cli(Commands, description="VQ3D for nerfstudio: data generation, reconstruction of photos, rendering and evaluation tools.")
    run(command, NAMES[type(command).__name__])


if __name__ == "__main__":
    entrypoint()
