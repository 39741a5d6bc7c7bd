"""Refining 3D Gaussian splats against the NeRF's renders: gradient descent through a rasterizer
(gsplat's on a GPU, the pure-torch one anywhere), the second step of ``vq3d export-splats`` after
:func:`~vq3d_nerfstudio.export.splats.gaussians_from_nerf` placed them. An optimisation loop, apart
from the conversion (which only reads the NeRF) and from the renderer it differentiates through.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vq3d_nerfstudio.export.gaussians import Gaussians, rgb_to_sh_dc, sh_dc_to_rgb
from vq3d_nerfstudio.export.rasterize import RasterizeFn, gsplat_rasterize, render_gaussians


def refine_gaussians(
    gaussians: Gaussians,
    targets: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    steps: int,
    rasterize_fn: RasterizeFn = gsplat_rasterize,
    means_lr: float = 1.6e-4,
    scales_lr: float = 5e-3,
    quats_lr: float = 1e-3,
    opacities_lr: float = 5e-2,
    colors_lr: float = 2.5e-3,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> Gaussians:
    """Fit the splats to ``targets`` (``[C, H, W, 3]`` NeRF renders from the ``[C]`` cameras) with an
    L1 loss, one camera per step, Adam on the 3DGS parameterisation (means, log-scales, quaternions,
    logit-opacities, SH DC colours; the learning rates are gsplat's ``simple_trainer`` defaults,
    ``means_lr`` per unit of the scene's extent, here the cameras' distance to the pivot). No
    densification or pruning: the count stays as initialised. ``rasterize_fn`` is gsplat's CUDA
    rasterizer in ``vq3d export-splats``; :func:`~vq3d_nerfstudio.export.rasterize.rasterize` works
    too (slowly, on the CPU).
    """
    device = targets.device
    extent = float(torch.linalg.inv(viewmats)[:, :3, 3].norm(dim=-1).mean())
    opacity = gaussians.opacities.clamp(1e-4, 1 - 1e-4)
    params = {
        "means": gaussians.means.clone(),
        "log_scales": torch.log(gaussians.scales),
        "quats": gaussians.quats.clone(),
        "logit_opacities": torch.log(opacity / (1 - opacity)),
        "sh_dc": rgb_to_sh_dc(gaussians.colors),
    }
    params = {k: torch.nn.Parameter(v.detach().to(device).contiguous()) for k, v in params.items()}
    lrs = {"means": means_lr * extent, "log_scales": scales_lr, "quats": quats_lr, "logit_opacities": opacities_lr,
           "sh_dc": colors_lr}
    optimizer = torch.optim.Adam([{"params": [params[k]], "lr": lrs[k], "name": k} for k in params], eps=1e-15)

    def current() -> Gaussians:
        return Gaussians(
            means=params["means"],
            scales=torch.exp(params["log_scales"]),
            quats=F.normalize(params["quats"], dim=-1),
            opacities=torch.sigmoid(params["logit_opacities"]),
            colors=sh_dc_to_rgb(params["sh_dc"]).clamp_min(0),  # gsplat's SH activation
        )

    height, width = targets.shape[1:3]
    for step in range(steps):
        cam = step % viewmats.shape[0]
        rgb, _ = render_gaussians(current(), viewmats[cam : cam + 1], Ks[cam : cam + 1], width, height, rasterize_fn)
        loss = (rgb[0] - targets[cam]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss))
    out = current().detach()
    out.colors = out.colors.clamp(0, 1)
    return out
