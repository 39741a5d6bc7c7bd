"""``vq3d prepare``: a folder (or list) of images -> WebDataset-layout tar shards + ``index.json``
(the work is :func:`vq3d_nerfstudio.data.prepare.prepare_shards`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

from vq3d_nerfstudio.checks import OutputDir, PositiveInt, ranged
from vq3d_nerfstudio.data.folders import DepthKind


@dataclass
class Prepare:
    """Prepare images for training: decode, centre-crop and resize every image once, add pseudo
    ground-truth disparity, and write WebDataset-layout tar shards (shard-000000.tar ...: <key>.png,
    <key>.depth.npy, <key>.cls, <key>.source.txt) with index.json and bad_files.txt. Unreadable
    files are skipped and listed (or stop the run with --strict). Rerunning with the same options
    resumes: finished shards are kept, the rest are written to be byte-identical to an
    uninterrupted run."""

    output: OutputDir
    """Folder for the shards, index.json and bad_files.txt (created if needed)."""
    input: Optional[Path] = None
    """A folder of images (flat, ImageNet-style class subfolders, or `vq3d synth` scenes), or a text
    file listing image paths, one a line, optionally followed by a TAB and a class name (relative
    paths are relative to the list file). Required, except with --verify."""
    resolution: ranged(int, 8) = 256
    """Images are centre-cropped to a square and resized to this size (pixels)."""
    depth_model: Optional[str] = None
    """A transformers monocular depth model (DPT or Depth Anything; a folder written by save_pretrained,
    or a hub name such as depth-anything/Depth-Anything-V2-Small-hf when online) to estimate relative
    disparity for images without a depth file. Needs `pip install transformers`; runs on the GPU when
    there is one. Without it and without depth files, the shards hold no depth."""
    depth_kind: DepthKind = "auto"
    """Existing depth files beside the images (<image stem>.npy), carried over instead of running a
    model: 'z-depth' (world units), 'disparity' (larger = nearer), 'none' (ignore them), or 'auto'
    (the kind in vq3d_meta.json or the scenes' transforms.json). Stored as disparity."""
    depth_batch_size: PositiveInt = 16
    """Images per batch through the depth model."""
    shard_size: PositiveInt = 1000
    """Input images per shard (fewer samples where files are bad). Around 1000 at 256 px with depth
    gives ~400 MB shards; the last shard holds the remainder."""
    strict: bool = False
    """Stop at the first unreadable file instead of skipping it and listing it in bad_files.txt."""
    num_workers: ranged(Optional[int], 0) = None
    """Decoding processes (default: min(4, number of CPUs)); 0 decodes in this process."""
    verify: bool = False
    """Write nothing: check every shard of --output against index.json (its size and sha256, reading
    every byte), list the shards that differ and exit with status 1 if any do."""

    def main(self) -> None:
        from vq3d_nerfstudio.data.prepare import prepare_shards, verify_prepared

        if self.verify:
            try:
                checked, problems = verify_prepared(self.output)
            except ValueError as err:  # PrepareError, ShardError
                raise SystemExit(f"vq3d prepare: error: {err}") from None
            for problem in problems:
                print(problem)
            if problems:
                raise SystemExit(
                    f"vq3d prepare: error: {len(problems)} of {checked} shards in {self.output} do not match index.json "
                    "(listed above); delete them and rerun `vq3d prepare` with the options they were prepared with "
                    "to rewrite them"
                )
            print(f"All {checked} shards in {self.output} match index.json (sizes and sha256)")
            return
        if self.input is None:
            raise SystemExit("vq3d prepare: error: pass --input <folder of images or list file> (or --verify to check --output)")
        num_workers = self.num_workers if self.num_workers is not None else min(4, os.cpu_count() or 1)
        try:
            index = prepare_shards(
                self.input, self.output, resolution=self.resolution, depth_model=self.depth_model,
                depth_kind=self.depth_kind, shard_size=self.shard_size, strict=self.strict,
                num_workers=num_workers, depth_batch_size=self.depth_batch_size, progress=True,
            )
        except ValueError as err:  # PrepareError, DatasetError
            raise SystemExit(f"vq3d prepare: error: {err}") from None
        depth = {"none": "no depth"}.get(index["depth_kind"], f"disparity from {index['depth_source']}")
        print(
            f"Wrote {index['num_samples']} images ({index['resolution']} px, {depth}) in {len(index['shards'])} "
            f"shard(s) to {self.output}; skipped {index['num_skipped']}"
            + (f" (listed in {self.output / 'bad_files.txt'})" if index["num_skipped"] else "")
        )


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Prepare), "prepare")
