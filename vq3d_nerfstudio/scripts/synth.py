"""Command wrapper for the procedural scene generator (``vq3d synth``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import tyro

from vq3d_nerfstudio.checks import NonNegativeInt, OutputDir, PositiveInt, ranged
from vq3d_nerfstudio.data.synth import VIEW_OFFSETS_DEG, scene_dir_name, write_scenes


@dataclass
class Synth:
    """Write procedural scenes with exact depth (nerfstudio-format scene folders)."""

    output_dir: tyro.conf.Positional[OutputDir]
    """Directory to write scene_XXXXX/ folders and synth_meta.json into (created if needed;
    existing complete scenes are kept, so an interrupted run can be resumed)."""
    num_scenes: PositiveInt = 200
    """Number of scenes to write."""
    resolution: ranged(int, 8) = 64
    """Square image size R in pixels."""
    num_views: ranged(int, 1, len(VIEW_OFFSETS_DEG)) = 7
    """Views per scene: canonical, yaw -20/-10/+10/+20, elevation +10/-10; the first K are used."""
    seed: NonNegativeInt = 0
    """Random seed; scene i depends only on (seed, i)."""
    num_workers: ranged(Optional[int], 1) = None
    """Worker processes (default: min(2, number of CPUs))."""

    def main(self) -> None:
        already = sum(
            (self.output_dir / scene_dir_name(i) / "transforms.json").is_file() for i in range(self.num_scenes)
        )
        try:
            paths = write_scenes(
                self.output_dir,
                num_scenes=self.num_scenes,
                resolution=self.resolution,
                num_views=self.num_views,
                seed=self.seed,
                num_workers=self.num_workers,
                progress=True,
            )
        except ValueError as exc:
            raise SystemExit(f"vq3d synth: error: {exc}") from None
        print(
            f"Wrote {len(paths) - already} new scenes ({len(paths)} in total, {already} already present) x "
            f"{self.num_views} views at {self.resolution}x{self.resolution} px (seed {self.seed}) to {self.output_dir}"
        )


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Synth), "synth")
