"""``vq3d fid``: FID between two folders of images, and the Inception Score of the generated one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

from vq3d_nerfstudio.checks import OutputDir, OutputFile, PositiveInt, ranged
from vq3d_nerfstudio.scripts.common import GuidanceScale, Temperature, TopK, TopP, load_stage2


@dataclass
class Fid:
    """FID (the FID Inception-v3 as torch-fidelity runs it, 2048-d pool features, images resized to 299
    like TensorFlow 1.x; scores by torchmetrics) of a folder of generated images against a folder of
    real ones, and the Inception Score of the generated images. Both folders are read recursively
    (png, jpg, jpeg, webp). Numbers are comparable with papers only at equal image counts (FID from few
    images is biased upwards; papers use 10k-50k), and are close to, not equal to, pytorch-fid's (it
    resizes and scales pixels slightly differently).

    With --stage2-checkpoint instead of --fake, scenes are sampled from a stage-2 model, rendered from
    the canonical camera and from a novel camera, and each view set is scored against --real (VQ3D
    reports both: a 3D generator must look right away from the input view too)."""

    real: Path
    """Folder of real images."""
    fake: Optional[Path] = None
    """Folder of generated images."""
    stage2_checkpoint: Optional[Path] = None
    """Score samples of this vq3d-train-stage2 run (or step folder) instead of --fake (default with
    --model: the package's stage2/ folder)."""
    model: Optional[str] = None
    """The stage-1 model that decodes the samples: a package (whose stage2/ is then the default
    --stage2-checkpoint), a shipped model's name, or a run's config.yml; default: --stage1-config."""
    num_samples: ranged(int, 2) = 1000
    """With --stage2-checkpoint: scenes to sample (each rendered at every view; FID needs a covariance, so
    at least 2)."""
    class_label: str = "all"
    """With --stage2-checkpoint: 'all' cycles through the classes (class-balanced), or one class id /
    name, or 'none' (unconditional)."""
    novel_yaw_deg: float = 15.0
    """With --stage2-checkpoint: the novel view looks from this yaw (degrees, alternating left/right
    per sample) at the canonical elevation."""
    temperature: Temperature = 1.0
    """Sampling temperature (see vq3d sample)."""
    top_k: TopK = None
    """Top-k sampling (see vq3d sample)."""
    top_p: TopP = None
    """Nucleus sampling (see vq3d sample)."""
    cfg_scale: GuidanceScale = 1.0
    """Classifier-free guidance weight (see vq3d sample)."""
    seed: int = 0
    """Sampling seed."""
    stage1_config: Optional[Path] = None
    """The stage-1 run's config.yml; default: the one recorded in the stage-2 checkpoint."""
    samples_dir: Optional[OutputDir] = None
    """Keep the rendered samples here (<dir>/canonical, <dir>/novel); default: a temporary folder."""
    inception_weights: Optional[Path] = None
    """The FID Inception weights, pt_inception-2015-12-05-6726825d.pth or torch-fidelity's copy (default:
    the torch hub cache, ~/.cache/torch/hub/checkpoints/, where pytorch-fid and torch-fidelity keep
    them), or a .safetensors file of the same tensors. Read as tensors only: a file holding other
    pickled objects is refused, never run."""
    download: bool = False
    """Download the weights (~91 MB) from pytorch-fid's release into the torch hub cache if missing."""
    feature_dim: Literal[64, 192, 768, 2048] = 2048
    """Inception pool whose features are compared (pytorch-fid's --dims). 2048 is the standard FID,
    the only one comparable with papers, and the only one that also gives the Inception Score."""
    batch_size: PositiveInt = 50
    """Images per forward pass."""
    num_splits: PositiveInt = 10
    """Chunks the Inception Score is averaged over (its std is across them, the unbiased one). The
    images are shuffled in a fixed order before they are split, so a folder always gets one score."""
    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    output: OutputFile = Path("fid_results.json")
    """Where to write the scores (JSON)."""

    def main(self) -> None:
        import torch
        from rich.console import Console
        from rich.table import Table

        from vq3d_nerfstudio.evaluation.fid import (
            ImageFolderError,
            InceptionUnavailable,
            fid_between_folders,
            find_weights,
            folder_statistics,
            list_images,
            load_inception,
        )
        from vq3d_nerfstudio.files import write_atomic

        def fail(message: str) -> SystemExit:
            return SystemExit(f"vq3d fid: error: {message}")

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise fail(f"--device {self.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise fail(f"--device {self.device}: CUDA is not available here; use --device cpu")
        if (self.fake is None) == (self.stage2_checkpoint is None and self.model is None):
            raise fail("pass either --fake <folder of generated images> or --stage2-checkpoint <stage-2 run> (or --model <package with stage2/>)")
        try:
            network = load_inception(self.inception_weights, download=self.download, feature_dim=self.feature_dim)
            for folder in (self.real, self.fake) if self.fake is not None else (self.real,):
                list_images(folder)  # empty or missing folders fail here, before any long work
        except InceptionUnavailable as err:
            missing = self.inception_weights is None and not self.download and find_weights() is None
            raise fail(f"{err}{'; or run with --download' if missing else ''}") from None
        except ImageFolderError as err:
            raise fail(str(err)) from None
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vq3d_fid_") as tmp:
            fake_sets = {"fake": self.fake} if self.fake is not None else self._render_samples(Path(tmp), fail)
            results = {}
            network = network.to(device)
            try:
                real_statistics = folder_statistics(self.real, network, self.batch_size)
                for name, folder in fake_sets.items():
                    results[name] = fid_between_folders(
                        None, folder, network, batch_size=self.batch_size, num_splits=self.num_splits,
                        real_statistics=real_statistics,
                    )
            except (ImageFolderError, ValueError) as err:
                raise fail(str(err)) from None
        num_real = len(list_images(self.real))
        for result in results.values():
            result["num_real"] = num_real
        output = dict(results["fake"]) if self.fake is not None else {"views": results}
        output.update(
            feature_dim=self.feature_dim, real=str(self.real), fake=str(self.fake) if self.fake else None,
            stage2_checkpoint=str(self.stage2_checkpoint) if self.stage2_checkpoint else None, model=self.model,
            inception_weights=str(find_weights(self.inception_weights)),
        )
        self.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output, json.dumps(output, indent=1).encode("utf-8"))
        table = Table(title=f"{self.fake or self.stage2_checkpoint or self.model} vs {self.real}")
        for column in ("set", f"FID ({self.feature_dim}-d)", "IS", "IS std", "real images", "fake images"):
            table.add_column(column)
        for name, result in results.items():
            table.add_row(
                name, f"{result['fid']:.3f}",
                *[f"{result[key]:.3f}" if key in result else "-" for key in ("inception_score", "inception_score_std")],
                str(result["num_real"]), str(result["num_fake"]),
            )
        console = Console()
        console.print(table)
        if min(num_real, *[r["num_fake"] for r in results.values()]) < 2048:
            console.print("[yellow]note: under 2048 images in a set: FID is biased upwards; compare at equal counts")
        print(f"Wrote {self.output}")

    def _render_samples(self, tmp: Path, fail) -> dict:
        """Sample scenes and render them at the canonical and a novel view: ``{view: folder}``."""
        from rich.progress import Progress

        from vq3d_nerfstudio.geometry.cameras import orbit_cameras
        from vq3d_nerfstudio.stage2.sample import (
            SampleError,
            SamplingSettings,
            SceneSampler,
            balanced_classes,
            render_sample_views,
        )

        transformer, info, _, loaded = load_stage2(
            "fid", self.stage2_checkpoint, self.model, self.stage1_config,
            check_classes=lambda names, num: balanced_classes(1, self.class_label, names, num),
        )
        model = loaded.model
        try:
            sampler = SceneSampler(transformer, info, model)
            classes = balanced_classes(self.num_samples, self.class_label, sampler.class_names, sampler.num_classes)
        except SampleError as err:
            raise fail(str(err)) from None
        root = self.samples_dir or tmp
        dirs = {"canonical": root / "canonical", "novel": root / "novel"}
        size = model.config.image_size
        settings = SamplingSettings(self.temperature, self.top_k, self.top_p, self.cfg_scale)
        with Progress() as progress:
            task = progress.add_task("Sampling and rendering scenes", total=self.num_samples)
            half = self.num_samples // 2
            for sign, part in ((1.0, classes[:half]), (-1.0, classes[half:])):
                poses = [(0.0, 0.0), (sign * self.novel_yaw_deg, 0.0)]
                cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
                render_sample_views(
                    sampler, cameras, ["canonical", "novel"], dirs, part, settings, seed=self.seed + (sign < 0),
                    prefix="left" if sign > 0 else "right", on_sample=lambda: progress.advance(task),
                )
        return dirs


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Fid), "fid")
