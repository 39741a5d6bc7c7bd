"""``vq3d package``: a trained run -> a model package anyone can load; ``vq3d models``: the shipped ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

from vq3d_nerfstudio.checks import NonNegativeInt, ranged


@dataclass
class Package:
    """Write a trained stage-1 run as a model package: a folder with config.json (the model's
    settings, the camera it was trained for, its classes, where it came from), model.safetensors
    (the stage-1 weights only: no discriminator, no optimizer) and README.md (a model card), plus
    stage2/ with a stage-2 checkpoint's weights when given. Every command's --model loads it with
    JSON and safetensors only (no pickle, no training data), on any machine."""

    load_config: Path
    """The run's config.yml."""
    output: Path
    """The package folder to write (written in full or not at all)."""
    load_step: ranged(Optional[int], 0) = None
    """Package the checkpoint of this step (default: the latest)."""
    stage2_checkpoint: Optional[Path] = None
    """Also package a stage-2 model trained on this run's tokens (a vq3d-train-stage2 run folder or
    one of its checkpoints/step-* folders), so that vq3d sample --model works from the package."""
    eval_results: Optional[Path] = None
    """A `vq3d eval` output (eval_results.json) of this run, quoted in the model card."""
    examples: NonNegativeInt = 4
    """Held-out images of the run to keep in examples/ (the images vq3d view's panel picks from,
    and something to try the model on; 0: none)."""
    half: bool = False
    """Store the weights in float16 (half the size; they load back as float32)."""
    overwrite: bool = False
    """Replace an existing non-empty output folder."""
    description: str = ""
    """One line on what the model was trained on and is good for (the model card and vq3d models
    show it)."""

    def main(self) -> None:
        import json
        import os
        import shutil

        import torch

        from vq3d_nerfstudio.files import DiskFullError, disk_full_reason
        from vq3d_nerfstudio.model_index import CARD_FILE, STAGE2_DIR, eval_figures, model_card, run_provenance
        from vq3d_nerfstudio.scripts.common import load_run
        from vq3d_nerfstudio.stage1.package import write_package_files
        from vq3d_nerfstudio.stage2.checkpoint import CheckpointError, load_model, resolve_checkpoint
        from vq3d_nerfstudio.stage2.sample import SampleError, check_compatible

        fail = lambda why: SystemExit(f"vq3d package: error: {why}")  # noqa: E731
        out = self.output
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.overwrite:
            raise fail(f"{out} exists and is not an empty folder; pass --overwrite to replace it, or another --output")
        about = {"description": self.description}
        if self.eval_results is not None:
            try:
                about["eval"] = eval_figures(json.loads(self.eval_results.read_text())["summary_by_offset_deg"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise fail(f"{self.eval_results}: not a vq3d eval output ({type(err).__name__}); pass the eval_results.json vq3d eval wrote") from None
        stage2 = None
        if self.stage2_checkpoint is not None:
            try:
                stage2 = resolve_checkpoint(self.stage2_checkpoint)
                _, stage2_info, _ = load_model(stage2)
            except CheckpointError as err:
                raise fail(str(err)) from None
        pipeline = load_run(self.load_config, "package", self.load_step)
        model = pipeline.model.eval()
        if stage2 is not None:
            try:
                check_compatible(stage2_info, model)
            except SampleError as err:
                raise fail(f"{stage2}: {err}") from None
        provenance = run_provenance(self.load_config, self.load_step)
        dtype = torch.float16 if self.half else torch.float32
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = write_package_files(tmp, model, provenance, about, dtype)
            write_examples(tmp / "examples", pipeline, self.examples)
            if stage2 is not None:
                (tmp / STAGE2_DIR).mkdir()
                shutil.copyfile(stage2 / "model.safetensors", tmp / STAGE2_DIR / "model.safetensors")
                stage2_config = json.loads((stage2 / "config.json").read_text())
                stage2_config["stage1_config"] = None  # the package's own stage-1 model
                (tmp / STAGE2_DIR / "config.json").write_text(json.dumps(stage2_config, indent=1))
            (tmp / CARD_FILE).write_text(model_card(out.resolve().name, info, has_stage2=stage2 is not None))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = disk_full_reason(err) if isinstance(err, Exception) else None
            if reason is not None:  # name the package, not a file of its removed temporary folder
                raise DiskFullError(out, reason) from err
            raise
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"Wrote the model package {out} ({size / 2**20:.1f} MiB): use it with --model {out}")


def write_examples(folder: Path, pipeline, count: int) -> None:
    """The first ``count`` held-out images of a run (as the model sees them) as PNGs in ``folder``."""
    from vq3d_nerfstudio.export.video import to_uint8, write_image

    count = min(count, len(pipeline.datamanager.eval_dataset))
    if count <= 0:
        return
    folder.mkdir(parents=True)
    for i in range(count):
        write_image(folder / f"example_{i:02d}.png", to_uint8(pipeline.load_image("eval", i)))


@dataclass
class Models:
    """List the models that come with the install (use one with --model NAME), and those in
    $VQ3D_HOME/models (default ~/.cache/vq3d/models)."""

    def main(self) -> None:
        from vq3d_nerfstudio.errors import PackageError
        from vq3d_nerfstudio.model_index import package_summary, shipped_models, user_models_dir

        for title, folders in (("Shipped models", shipped_models()), (f"Models in {user_models_dir()}", user_models(user_models_dir()))):
            print(f"{title}:")
            if not folders:
                print("  (none)")
            for folder in folders:
                try:
                    print(f"  {folder.name}: {package_summary(folder)}")
                except PackageError as err:
                    print(f"  {folder.name}: unreadable ({err})")


def user_models(root: Path):
    from vq3d_nerfstudio.model_index import is_package

    return sorted(p for p in root.iterdir() if is_package(p)) if root.is_dir() else []


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Package), "package")
