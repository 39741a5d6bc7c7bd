"""Benchmark: one image -> NeRF by VQ3D's forward pass vs nerfstudio's per-scene optimisation.

For held-out single images (frame 0 of unseen `vq3d synth --seed 1` scenes):
- VQ3D (`vq3d-tiny`, a trained run): time to a NeRF = encode + quantize + decode to tri-planes
  (median of repeated runs), then its canonical-view PSNR and novel-view PSNR (`vq3d eval`'s
  protocol);
- nerfstudio's own `nerfacto` and `vanilla-nerf` models, with their method configs' optimisers,
  trained on that one image at the same canonical camera on the same CPU until their canonical-view
  PSNR reaches VQ3D's (checked every few steps; checking time not counted) or a time cap; then their
  novel-view PSNR by the same protocol.
The figure is the ratio of times. Changes from the stock configs, all for a single known view:
nerfacto's camera optimiser is off (the pose is exact) and it trains on all 4096 pixels per step
(its default batch); vanilla-nerf keeps 1024 rays per step and gets a near/far of 0.3/8 around
this scene (its Blender default is 2/6). Both build an LPIPS metric at construction, whose AlexNet
download fails offline: when torch hub has no AlexNet weights, a randomly initialised one is put in
a temporary hub folder (their LPIPS is then meaningless; it is not used here, PSNR is unaffected).

    .venv/bin/python benchmarks/feedforward_vs_per_scene.py [--load-config outputs/bench_tiny/bench/vq3d-tiny/run/config.yml]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import git_revision, machine, update_section
from quality_over_budget import novel_mean


def ensure_alexnet_for_nerfstudio() -> str:
    """Make nerfstudio's LPIPS constructible offline; returns a note for the report."""
    import torchvision

    from vq3d_nerfstudio.stage1.perceptual import default_weights_path

    if default_weights_path("alex").is_file():
        return "torch hub's AlexNet weights were present"
    hub = Path(tempfile.mkdtemp(prefix="vq3d_hub_"))
    torch.hub.set_dir(str(hub))
    path = default_weights_path("alex")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return "a random AlexNet stood in for nerfstudio's LPIPS weights (LPIPS unused; PSNR unaffected)"


def psnr_of(rgb: torch.Tensor, gt: torch.Tensor) -> float:
    from vq3d_nerfstudio.evaluation.metrics import psnr

    return psnr(rgb.clamp(0, 1), gt)


class PerScene:
    """A nerfstudio model optimised on one image at one camera, as its method config trains it."""

    def __init__(self, method: str, image: torch.Tensor, c2w: np.ndarray, intrinsics: dict) -> None:
        from nerfstudio.configs.method_configs import method_configs
        from nerfstudio.data.scene_box import SceneBox
        from nerfstudio.engine.callbacks import TrainingCallbackAttributes
        from nerfstudio.engine.optimizers import Optimizers

        from vq3d_nerfstudio.geometry.cameras import pinhole_cameras

        torch.manual_seed(0)
        config = copy.deepcopy(method_configs[method])
        model_config = config.pipeline.model
        if method == "nerfacto":
            model_config.camera_optimizer.mode = "off"
            self.rays_per_step = 4096
        else:
            model_config.collider_params = {"near_plane": 0.3, "far_plane": 8.0}
            self.rays_per_step = 1024
        self.model = model_config.setup(
            scene_box=SceneBox(torch.tensor([[-4.0] * 3, [4.0] * 3])), num_train_data=1, metadata={}
        )
        groups = {k: v for k, v in self.model.get_param_groups().items() if len(v)}
        self.optimizers = Optimizers({k: config.optimizers[k] for k in groups}, groups)
        self.callbacks = self.model.get_training_callbacks(
            TrainingCallbackAttributes(optimizers=self.optimizers, grad_scaler=None, pipeline=None, trainer=None)
        )
        self.camera = pinhole_cameras(
            torch.tensor(c2w[None, :3], dtype=torch.float32), *(intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"))
        )
        self.rays = self.camera.generate_rays(camera_indices=0, keep_shape=True).flatten()
        self.gt_image = image
        self.gt = image.reshape(-1, 3)
        self.step = 0

    def train_step(self) -> None:
        from nerfstudio.engine.callbacks import TrainingCallbackLocation

        self.model.train()
        for callback in self.callbacks:
            callback.run_callback_at_location(self.step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        n = len(self.rays)
        index = torch.randperm(n)[: self.rays_per_step] if self.rays_per_step < n else torch.arange(n)
        batch = {"image": self.gt[index]}
        outputs = self.model(self.rays[index])
        metrics = self.model.get_metrics_dict(outputs, batch)
        loss = sum(self.model.get_loss_dict(outputs, batch, metrics).values())
        self.optimizers.zero_grad_all()
        loss.backward()
        self.optimizers.optimizer_step_all()
        self.optimizers.scheduler_step_all(self.step)
        for callback in self.callbacks:
            callback.run_callback_at_location(self.step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        self.step += 1

    @torch.no_grad()
    def render(self, camera) -> dict:
        self.model.eval()
        out = self.model.get_outputs_for_camera(camera)
        norm = camera.generate_rays(camera_indices=0, keep_shape=True).metadata["directions_norm"]
        rgb, depth = (out["rgb"], out["depth"]) if "rgb" in out else (out["rgb_fine"], out["depth_fine"])  # vanilla-nerf
        return {"rgb": rgb.clamp(0, 1), "z_depth": (depth / norm)[..., 0]}

    def canonical_psnr(self) -> float:
        return psnr_of(self.render(self.camera)["rgb"], self.gt_image)


def optimise_until(method: str, image, c2w, intrinsics, target: float, cap_s: float, check_every: int):
    """Train until the canonical-view PSNR reaches ``target`` or the training time passes ``cap_s``."""
    scene = PerScene(method, image, c2w, intrinsics)
    trained, reached, psnr = 0.0, False, float("nan")
    while trained < cap_s:
        start = time.perf_counter()
        for _ in range(check_every):
            scene.train_step()
        trained += time.perf_counter() - start
        psnr = scene.canonical_psnr()
        print(f"  {method}: step {scene.step}, {trained:.1f} s, canonical PSNR {psnr:.2f} dB (target {target:.2f})", flush=True)
        if psnr >= target:
            reached = True
            break
    return scene, trained, reached, psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, default=Path("outputs/bench_tiny/bench/vq3d-tiny/run/config.yml"),
                        help="a trained vq3d-tiny run (benchmarks/train_tiny.py leaves one here)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--num-scenes", type=int, default=1, help="how many held-out images to compare on")
    parser.add_argument("--cap-min", type=float, default=5.0, help="training-time cap per per-scene method, minutes")
    parser.add_argument("--methods", nargs="+", default=["nerfacto", "vanilla-nerf"])
    args = parser.parse_args()
    if not args.load_config.exists():
        raise SystemExit(f"{args.load_config} does not exist: run benchmarks/train_tiny.py first, or pass --load-config")

    from nerfstudio.utils.eval_utils import eval_setup
    from PIL import Image

    from vq3d_nerfstudio.data.dataset import load_image
    from vq3d_nerfstudio.data.scenes import load_scene
    from vq3d_nerfstudio.data.synth import write_scenes
    from vq3d_nerfstudio.evaluation.protocol import evaluate_scene, summarize
    from vq3d_nerfstudio.geometry.poses import align_pose, canonical_alignment
    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    torch.set_num_threads(2)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    hub_note = ensure_alexnet_for_nerfstudio()
    scene_files = sorted(args.eval_scenes.glob("*/transforms.json"))[: args.num_scenes]

    # ---- VQ3D: time to a NeRF, and its scores
    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="inference")
    model = pipeline.model
    distance = pipeline.model.camera_distance

    def load_rgb(path):
        with Image.open(path) as pil:
            return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)

    rows = []
    for scene_file in scene_files:
        scene = load_scene(scene_file)
        image = load_image(scene.images[0], model.config.image_size)
        images = image.permute(2, 0, 1)[None]

        @torch.no_grad()
        def to_nerf():
            quantized, _, _ = model.encode(images)
            return model.decoder(quantized)

        @torch.no_grad()
        def encode_only():
            return model.encode(images)

        to_nerf()
        times, enc_times = [], []
        for _ in range(30):
            start = time.perf_counter()
            to_nerf()
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            encode_only()
            enc_times.append(time.perf_counter() - start)
        vq3d_s, enc_s = statistics.median(times), statistics.median(enc_times)
        summary, _ = evaluate_run(args.load_config, scene_file.parent)
        target = summary["0"]["psnr"]
        row = {"scene": scene.name, "vq3d": {"seconds": vq3d_s, "encode_seconds": enc_s, "canonical_psnr": target,
                                             "novel_psnr": novel_mean(summary, "psnr"),
                                             "still_psnr": novel_mean(summary, "still_psnr")}}
        print(f"{scene.name}: VQ3D {1000 * vq3d_s:.1f} ms to a NeRF, canonical {target:.2f} dB", flush=True)

        # ---- per-scene optimisation on the same single image, at the aligned canonical camera
        depth0 = np.load(scene.depths[0]) if scene.depths[0] is not None else None
        median = float(np.median(depth0[np.isfinite(depth0) & (depth0 > 0)])) if depth0 is not None else None
        world_to_cam0, scale = canonical_alignment(scene.camera_to_worlds[0], distance, scene.pivot, median)
        c2w0 = align_pose(scene.camera_to_worlds[0], world_to_cam0, scale, distance)
        gt0 = load_rgb(scene.images[0])
        for method in args.methods:
            trained, t_s, reached, psnr = optimise_until(
                method, gt0, c2w0, scene.intrinsics, target, args.cap_min * 60, 5 if method == "nerfacto" else 2
            )

            def render(_image, poses, intrinsics, trained=trained):
                from vq3d_nerfstudio.geometry.cameras import pinhole_cameras

                cams = pinhole_cameras(
                    torch.tensor(np.stack(poses)[:, :3], dtype=torch.float32),
                    *(intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")),
                )
                return [trained.render(cams[i : i + 1]) for i in range(len(poses))]

            result = evaluate_scene(scene, render, distance, load_rgb, load_rgb)
            per = summarize([result])
            row[method] = {"seconds": t_s, "reached": reached, "steps": trained.step, "canonical_psnr": per["0"]["psnr"],
                           "novel_psnr": novel_mean(per, "psnr")}
            print(f"  {method}: {row[method]}", flush=True)
        rows.append(row)

    out = Path(tempfile.mkdtemp(prefix="vq3d_ff_")) / "feedforward.json"
    out.write_text(json.dumps(rows, indent=1))
    lines = []
    for row in rows:
        v = row["vq3d"]
        lines.append(f"| {row['scene']} | VQ3D `vq3d-tiny` (encode + decode) | {1000 * v['seconds']:.1f} ms | - | "
                     f"{v['canonical_psnr']:.2f} | {v['novel_psnr']:.2f} | 1x |")
        for method in args.methods:
            m = row[method]
            time_text = f"{m['seconds']:.1f} s" if m["reached"] else f"> {m['seconds']:.0f} s (cap; not reached)"
            lines.append(f"| {row['scene']} | `{method}` optimised on the image | {time_text} | {m['steps']} | "
                         f"{m['canonical_psnr']:.2f} | {m['novel_psnr']:.2f} | "
                         f"{'' if m['reached'] else '> '}{m['seconds'] / v['seconds']:,.0f}x |")
    table = ("| image | method | time to a NeRF | steps | canonical PSNR (dB) | novel PSNR (dB) | time vs VQ3D |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    v = rows[0]["vq3d"]
    body = (
        "## One image to a NeRF: VQ3D's forward pass vs per-scene optimisation\n\n"
        f"{table}\n\n"
        f"- VQ3D's time splits into encode + quantize {1000 * v['encode_seconds']:.1f} ms and tri-plane decode "
        f"{1000 * (v['seconds'] - v['encode_seconds']):.1f} ms (median of 30, batch of one, after a warm-up). "
        "Goal: <= 50 ms; >= 1000x faster than `nerfacto` reaching the same canonical-view PSNR.\n"
        f"- Per-scene methods stop when their canonical-view PSNR reaches VQ3D's on that image (checked every "
        f"5 (nerfacto) or 2 (vanilla-nerf) steps, check time not counted) or after {args.cap_min:g} min of training; "
        "novel views (10 and 20 degrees away, `vq3d eval`'s protocol) are then scored for each. "
        f"'Nothing moves' floor on these novel views: {statistics.mean(r['vq3d']['still_psnr'] for r in rows):.2f} dB.\n"
        f"- {hub_note}.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. VQ3D run: `{args.load_config}`. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/feedforward_vs_per_scene.py --num-scenes {args.num_scenes} "
        f"--cap-min {args.cap_min:g}`\n"
    )
    print(body)
    update_section("feedforward-vs-per-scene", body)


if __name__ == "__main__":
    main()
