"""``vq3d sample``: new 3D scenes of a class, from a stage-2 checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

from vq3d_nerfstudio.checks import OutputDir, PositiveInt
from vq3d_nerfstudio.scripts.common import (
    Flat,
    GuidanceScale,
    OrbitLoop,
    Temperature,
    TopK,
    TopP,
    load_stage2,
    reworded,
)

SampleOrbit = reworded(OrbitLoop, resolution="Render size in pixels; 0 uses the stage-1 model's image size.")


@dataclass
class Sample:
    """Sample token grids from a trained stage-2 transformer, decode each with its stage-1 model into
    a NeRF, and write per sample into the output folder: <name>_canonical.png, <name>_orbit.mp4,
    <name>_disparity.mp4 and <name>_disparity.png (turbo colours, near = warm), <name>_codes.npy (the
    code grid), plus samples.png (all canonical views in a row)."""

    stage2_checkpoint: Optional[Path] = None
    """A vq3d-train-stage2 run folder (its latest checkpoint) or one of its checkpoints/step-* folders;
    default with --model: the package's stage2/ folder."""
    model: Optional[str] = None
    """The stage-1 model that decodes the samples: a model package (with a stage2/ folder it needs
    no --stage2-checkpoint), a shipped model's name, or a run's config.yml; default: --stage1-config."""
    class_label: str = "0"
    """Class id, class name (a folder name of the training data), or 'none' for unconditional samples."""
    num_samples: PositiveInt = 4
    """How many scenes."""
    batch_size: PositiveInt = 16
    """Scenes whose tokens are sampled together; more are sampled in batches of this many. A scene's
    attention cache is layers x 2 x positions x width floats (1 MB for the tiny preset on a 16x16 grid,
    200 MB for the paper preset on 32x32; twice with guidance), held for the whole batch at once."""
    output_dir: OutputDir = Path("samples")
    """Where the outputs go (created if missing)."""
    temperature: Temperature = 1.0
    """Divides the logits: below 1 is more conservative, 0 always takes the most likely code."""
    top_k: TopK = None
    """Sample only among the k most likely codes at each position."""
    top_p: TopP = None
    """Nucleus sampling: only among the most likely codes whose probabilities sum to p (1: all codes)."""
    cfg_scale: GuidanceScale = 1.0
    """Classifier-free guidance weight: 0 is unconditional, 1 plain conditioning, larger follows the
    class more closely (each step then also runs the unconditional model)."""
    seed: int = 0
    """Random seed: the same seed and settings (--batch-size included) give the same scenes."""
    use_kv_cache: bool = True
    """Keep attention keys/values between steps (much faster; --no-use-kv-cache recomputes the prefix)."""
    stage1_config: Optional[Path] = None
    """The stage-1 run's config.yml; default: the one recorded in the stage-2 checkpoint."""
    orbit: Flat[SampleOrbit] = field(default_factory=SampleOrbit)

    def main(self) -> None:
        import numpy as np
        import torch
        from rich.progress import Progress

        from vq3d_nerfstudio.export.video import colorize_disparity, render_frames, to_uint8, write_image, write_video
        from vq3d_nerfstudio.files import atomic_path
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras
        from vq3d_nerfstudio.stage2.sample import (
            SampleError,
            SamplingSettings,
            SceneSampler,
            class_file_name,
            class_label_name,
            resolve_class,
        )

        transformer, info, folder, loaded = load_stage2(
            "sample", self.stage2_checkpoint, self.model, self.stage1_config,
            check_classes=lambda names, num: resolve_class(self.class_label, names, num),
        )
        model = loaded.model
        try:
            sampler = SceneSampler(transformer, info, model)
            class_id = sampler.resolve(self.class_label)
        except SampleError as err:
            raise SystemExit(f"vq3d sample: error: {err}") from None
        label = class_label_name(class_id, sampler.class_names, sampler.num_classes)
        file_label = class_file_name(class_id, sampler.class_names, sampler.num_classes)  # a name from a file: made safe
        settings = SamplingSettings(self.temperature, self.top_k, self.top_p, self.cfg_scale, self.use_kv_cache)
        generator = torch.Generator().manual_seed(self.seed)
        size = self.orbit.size(model)
        poses = [(0.0, 0.0)] + self.orbit.loop()
        cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        print(f"Sampling {self.num_samples} scene(s) of {label} from {folder}")
        with Progress() as progress:
            task = progress.add_task("Sampling tokens", total=self.num_samples)
            codes = sampler.sample(class_id, self.num_samples, settings, generator, batch_size=self.batch_size,
                                   on_batch=lambda count: progress.advance(task, count))
            task = progress.add_task("Rendering scenes", total=self.num_samples * len(poses))
            canonical = []
            for i in range(self.num_samples):
                stem = self.output_dir / f"{file_label}_{i:03d}"
                model.set_scene_indices(codes[i], key=("sample", i))
                rgb, disp = render_frames(model, cameras, on_frame=lambda: progress.advance(task))
                disp_rgb = colorize_disparity(disp)
                with atomic_path(Path(f"{stem}_codes.npy")) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, codes[i].numpy().astype(np.int32), allow_pickle=False)
                write_image(f"{stem}_canonical.png", to_uint8(rgb[0]))
                write_image(f"{stem}_disparity.png", to_uint8(disp_rgb[0]))
                write_video(f"{stem}_orbit.mp4", rgb[1:], self.orbit.fps)
                write_video(f"{stem}_disparity.mp4", disp_rgb[1:], self.orbit.fps)
                canonical.append(to_uint8(rgb[0]))
        write_image(self.output_dir / "samples.png", np.concatenate(canonical, axis=1))
        print(f"Wrote {self.num_samples} sample(s) of {label} to {self.output_dir} as {file_label}_NNN_* "
              "(samples.png shows them side by side)")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Sample), "sample")
