"""Benchmark: parameters and FLOPs per image of `vq3d` (paper scale) and `vq3d-tiny`.

Counts parameters per component and, with `torch.utils.flop_counter.FlopCounterMode` on randomly
initialised models, the FLOPs of
- one image -> NeRF (encode + quantize + tri-plane decode, batch of one);
- one training image: that forward, plus rendering the preset's rays per image (coarse + fine
  samples), plus the backward pass of the loss (counted, not estimated);
- rendering one full input-size frame from the tri-planes.
The counter sees matrix multiplies, convolutions and attention; grid sampling and elementwise ops
are not counted (they are memory-bound and small here). Also times image -> NeRF on this CPU. GPU
images/s and memory are `benchmarks/gpu.py`'s.

    .venv/bin/python benchmarks/model_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch
from common import git_revision, machine, update_section
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn) -> int:
    """FLOPs ``fn`` runs, attention included: scaled-dot-product attention is counted on its math
    path (its matrix products), since the counter has no formula for the fused CPU kernel and would
    leave attention out on a CPU while counting it on a GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def build(name: str):
    from nerfstudio.data.scene_box import SceneBox

    from vq3d_nerfstudio.ns.method_configs import PRESETS, build_trainer_config

    torch.manual_seed(0)
    cfg = build_trainer_config(name).pipeline.model
    model = cfg.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1, metadata={})
    return model, PRESETS[name]


def rays_for(model, count: int):
    from vq3d_nerfstudio.geometry.cameras import canonical_cameras

    size = model.config.image_size
    rays = canonical_cameras(1, size, 2.0, 50.0).generate_rays(camera_indices=0, keep_shape=True).flatten()
    return rays[:count] if count else rays


def train_image_flops(model, rays_per_image: int) -> int:
    """FLOPs of one training image: encode, quantize, decode to a tri-plane, render ``rays_per_image``
    canonical rays (coarse + fine), and the backward pass of a loss on them (counted, not estimated).
    Leaves the model in training mode; runs on the model's device."""
    model.train()
    device = next(model.parameters()).device
    size = model.config.image_size
    image = torch.rand(1, 3, size, size, device=device)
    train_rays = rays_for(model, rays_per_image).to(device)
    batch_idx = torch.zeros(len(train_rays), dtype=torch.long, device=device)

    def train_image():
        quantized, _, vq = model.encode(image)
        out = model.render_rays(train_rays, model.decoder(quantized), batch_idx, keep_samples=True)
        (out["rgb"].square().mean() + out["rgb_coarse"].square().mean() + vq["codebook"] + vq["commitment"]).backward()

    flops = count_flops(train_image)
    model.zero_grad(set_to_none=True)
    return flops


def measure(name: str) -> dict:
    model, preset = build(name)
    size = model.config.image_size
    image = torch.rand(1, 3, size, size)
    params = {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "quantizer": sum(p.numel() for p in model.quantizer.parameters()),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
        "field": sum(p.numel() for p in model.field.parameters()),
    }

    def to_nerf():
        quantized, _, _ = model.encode(image)
        return model.decoder(quantized)

    model.eval()
    with torch.no_grad():
        encode_decode = count_flops(to_nerf)
        planes = to_nerf()
        frame_rays = rays_for(model, 0)
        zeros = torch.zeros(len(frame_rays), dtype=torch.long)
        render_frame = count_flops(lambda: model.render_rays(frame_rays, planes, zeros, keep_samples=False))
        to_nerf()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            to_nerf()
            times.append(time.perf_counter() - start)

    train = train_image_flops(model, preset["data"]["rays_per_image"])
    return {
        "params": params,
        "encode_decode": encode_decode,
        "render_frame": render_frame,
        "train_image": train,
        "cpu_to_nerf_ms": 1000 * statistics.median(times),
        "size": size,
        "tokens": model.grid_size,
        "rays_per_image": preset["data"]["rays_per_image"],
        "coarse": model.config.coarse_samples_per_ray,
        # the fine pass evaluates the coarse samples again with the PDF ones (include_original)
        "fine": model.config.coarse_samples_per_ray + model.config.fine_samples_per_ray,
    }


def main() -> None:
    results = {name: measure(name) for name in ("vq3d", "vq3d-tiny")}
    m = lambda x: f"{x / 1e6:.2f} M"  # noqa: E731
    g = lambda x: f"{x / 1e9:.2f} GFLOP"  # noqa: E731
    rows = [
        ("input / tokens", lambda r: f"{r['size']} px / {r['tokens']}x{r['tokens']}"),
        ("parameters: encoder", lambda r: m(r["params"]["encoder"])),
        ("parameters: quantizer (codebook + projections)", lambda r: m(r["params"]["quantizer"])),
        ("parameters: tri-plane decoder", lambda r: m(r["params"]["decoder"])),
        ("parameters: field MLP", lambda r: f"{r['params']['field']:,}"),
        ("parameters: total", lambda r: m(sum(r["params"].values()))),
        ("FLOPs: one image -> NeRF (encode + decode)", lambda r: g(r["encode_decode"])),
        ("FLOPs: render one input-size frame", lambda r: g(r["render_frame"])),
        ("FLOPs: one training image (forward + backward)", lambda r: g(r["train_image"])),
        ("rays x field evaluations per ray (coarse + fine)",
         lambda r: f"{r['rays_per_image']} x ({r['coarse']} + {r['fine']})"),
        ("CPU time: one image -> NeRF (median of 5)", lambda r: f"{r['cpu_to_nerf_ms']:.1f} ms"),
        ("GPU images/s and memory (training)", lambda r: "BENCHMARKS.md, On a GPU (`benchmarks/gpu.py`)"),
    ]
    table = "| measure | `vq3d` | `vq3d-tiny` |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {fn(results['vq3d'])} | {fn(results['vq3d-tiny'])} |" for name, fn in rows
    )
    body = (
        "## Model cost: parameters and FLOPs per image\n\n"
        f"{table}\n\n"
        "FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; "
        "grid sampling and elementwise ops not included) on randomly initialised models, batch of one; "
        "rendering includes the coarse and fine passes and the normals output (a density gradient per ray). "
        "A training step processes `images-per-batch` (8) such images.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        "Command: `.venv/bin/python benchmarks/model_cost.py`\n"
    )
    print(body)
    update_section("model-cost", body)


if __name__ == "__main__":
    main()
