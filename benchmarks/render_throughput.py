"""Benchmark: rendering throughput of the VQ3D tri-plane field on this CPU.

- rays/s and ms per 64x64 and 256x256 frame of `vq3d-tiny` through nerfstudio's samplers and
  renderers (coarse + PDF fine passes, as the model renders);
- the field alone vs nerfstudio's `vanilla-nerf` field (NeRFField with its positional encodings,
  8 x 256 MLP) at the same number of samples per ray;
- the floor from this machine's measured fp32 matmul rate and memory bandwidth for the FLOPs and
  bytes one field evaluation needs (the arithmetic is printed).

Weights are random: throughput does not depend on them. Prints a table and updates BENCHMARKS.md.

    .venv/bin/python benchmarks/render_throughput.py
"""

from __future__ import annotations

import statistics
import time

import torch
from common import git_revision, machine, update_section


def median_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_rates() -> tuple:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gflops = 2 * n**3 / median_time(lambda: a @ b) / 1e9
    src = torch.empty(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src)) / 1e9
    return gflops, gbps


@torch.no_grad()
def main() -> None:
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.field_components.encodings import NeRFEncoding
    from nerfstudio.fields.vanilla_nerf_field import NeRFField
    from nerfstudio.model_components.ray_samplers import UniformSampler

    from vq3d_nerfstudio.geometry.cameras import orbit_cameras
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    torch.manual_seed(0)
    cfg = build_trainer_config("vq3d-tiny").pipeline.model
    model = cfg.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1, metadata={}).eval()
    model.set_scene_images(torch.rand(cfg.image_size, cfg.image_size, 3))
    planes = model.current_planes()
    samples_per_ray = cfg.coarse_samples_per_ray + (cfg.coarse_samples_per_ray + cfg.fine_samples_per_ray + 1)

    rows = []
    for size in (64, 256):
        camera = orbit_cameras([(0.0, 0.0)], size, 2.0, 50.0)
        seconds = median_time(lambda: model.get_outputs_for_camera(camera), repeats=3 if size > 64 else 5)
        rows.append((f"vq3d-tiny full render, {size}x{size}", f"{seconds * 1e3:.1f} ms/frame", f"{size * size / seconds:,.0f}"))

    camera = orbit_cameras([(0.0, 0.0)], 64, 2.0, 50.0)
    bundle = model.renderer.collider(camera.generate_rays(camera_indices=0).flatten())
    samples = UniformSampler(num_samples=samples_per_ray)(bundle)
    num_rays = len(bundle)
    batch_idx = torch.zeros(num_rays, dtype=torch.long)
    vq3d_field = median_time(lambda: model.field(samples, planes, batch_idx))
    nerf_field = NeRFField(
        position_encoding=NeRFEncoding(in_dim=3, num_frequencies=10, min_freq_exp=0.0, max_freq_exp=8.0, include_input=True),
        direction_encoding=NeRFEncoding(in_dim=3, num_frequencies=4, min_freq_exp=0.0, max_freq_exp=4.0, include_input=True),
    ).eval()
    vanilla = median_time(lambda: nerf_field(samples), repeats=3)
    rows.append((f"VQ3D field only, {samples_per_ray} samples/ray", f"{vq3d_field * 1e3:.1f} ms / {num_rays} rays", f"{num_rays / vq3d_field:,.0f}"))
    rows.append((f"vanilla-nerf field, {samples_per_ray} samples/ray", f"{vanilla * 1e3:.1f} ms / {num_rays} rays", f"{num_rays / vanilla:,.0f}"))

    # Floor: FLOPs and bytes of one VQ3D field evaluation, from the config.
    c, h, g = cfg.triplane_channels, cfg.field_hidden_dim, 15
    mlp_flops = 2 * (3 * c * h + h * (1 + g)) + 2 * (g * h + h * 3)
    sample_flops = 3 * 4 * c * 2  # bilinear: 4 taps x C channels x (mul + add) per plane
    flops = mlp_flops + sample_flops
    activations = 3 + 3 * c + h + (1 + g) + h + 3  # floats written once and read once by torch ops
    texel_bytes = 3 * 4 * c * 4
    bytes_per_eval = 2 * 4 * activations + texel_bytes
    gflops, gbps = machine_rates()
    floor_s = num_rays * samples_per_ray * max(flops / (gflops * 1e9), bytes_per_eval / (gbps * 1e9))
    rows.append(("machine floor for the VQ3D field", f"{floor_s * 1e3:.1f} ms / {num_rays} rays", f"{num_rays / floor_s:,.0f}"))

    table = "| what | time | rays/s |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c_} |" for a, b, c_ in rows)
    ratio_nerf = vanilla / vq3d_field
    ratio_floor = vq3d_field / floor_s
    body = (
        "## Rendering throughput on 2 CPU cores\n\n"
        f"{table}\n\n"
        f"- VQ3D field vs vanilla-nerf field at equal samples per ray: **{ratio_nerf:.1f}x** the rays/s (goal >= 10x).\n"
        f"- VQ3D field vs the machine floor: **{ratio_floor:.1f}x** slower than the floor (goal within 3x).\n"
        f"- Floor arithmetic: measured {gflops:.1f} GFLOP/s (fp32 2048^2 matmul) and {gbps:.1f} GB/s (256 MiB copy). "
        f"One field evaluation = {mlp_flops} MLP FLOPs (density {3 * c}->{h}->{1 + g}, colour {g}->{h}->3) + "
        f"{sample_flops} bilinear FLOPs = {flops} FLOPs; bytes = 2 x 4 x {activations} activation floats + {texel_bytes} texel bytes "
        f"= {bytes_per_eval} B. Floor = rays x {samples_per_ray} samples x max(FLOPs / rate, bytes / bandwidth).\n"
        f"- Full renders add the coarse pass, PDF resampling and compositing: {samples_per_ray} field evaluations per ray "
        f"({cfg.coarse_samples_per_ray} coarse + {cfg.coarse_samples_per_ray + cfg.fine_samples_per_ray + 1} fine).\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Median of 5 (3 for the slow rows) after a warm-up. Run here (CPU).\n\n"
        "Command: `.venv/bin/python benchmarks/render_throughput.py`\n"
    )
    print(body)
    update_section("render-throughput", body)


if __name__ == "__main__":
    main()
