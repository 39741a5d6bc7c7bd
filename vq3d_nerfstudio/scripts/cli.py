"""The ``vq3d`` console script: one entry point, a subcommand per job."""

from __future__ import annotations

from typing import Union

import tyro
from typing_extensions import Annotated

from vq3d_nerfstudio.scripts.compose import Compose
from vq3d_nerfstudio.scripts.evaluate import Evaluate
from vq3d_nerfstudio.scripts.export_splats import ExportSplats
from vq3d_nerfstudio.scripts.fid import Fid
from vq3d_nerfstudio.scripts.interpolate import Interpolate
from vq3d_nerfstudio.scripts.prepare import Prepare
from vq3d_nerfstudio.scripts.reconstruct import Reconstruct
from vq3d_nerfstudio.scripts.render_orbit import RenderOrbit
from vq3d_nerfstudio.scripts.sample import Sample
from vq3d_nerfstudio.scripts.synth import Synth

Commands = Union[
    Annotated[Synth, tyro.conf.subcommand("synth")],
    Annotated[Reconstruct, tyro.conf.subcommand("reconstruct")],
    Annotated[RenderOrbit, tyro.conf.subcommand("render-orbit")],
    Annotated[Evaluate, tyro.conf.subcommand("eval")],
    Annotated[Prepare, tyro.conf.subcommand("prepare")],
    Annotated[Sample, tyro.conf.subcommand("sample")],
    Annotated[Fid, tyro.conf.subcommand("fid")],
    Annotated[Interpolate, tyro.conf.subcommand("interpolate")],
    Annotated[Compose, tyro.conf.subcommand("compose")],
    Annotated[ExportSplats, tyro.conf.subcommand("export-splats")],
]


def entrypoint() -> None:
    """Parse ``vq3d <subcommand> ...`` and run it."""
    tyro.cli(Commands, description="VQ3D for nerfstudio: data generation, reconstruction of photos, rendering and evaluation tools.").main()


if __name__ == "__main__":
    entrypoint()
