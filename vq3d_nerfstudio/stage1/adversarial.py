"""3D-aware adversarial training as one component of the model, the way nerfacto holds its camera
optimizer: :class:`AdversarialConfig` is the model config's ``adversarial`` (``--pipeline.model.adversarial.*``)
and its ``setup`` gives :class:`Adversarial`, which owns the discriminator, builds the whole-view
cameras it judges (the canonical camera and random novel ones), adds its param group and computes
its losses. The networks and loss functions are :mod:`vq3d_nerfstudio.stage1.gan`'s; the model
renders the views, the trainer (``ns/trainer.py``) runs the discriminator's own step.

The options were flat fields of the model config (``--pipeline.model.adversarial-loss-mult``, ...):
those flags still set them (:func:`~vq3d_nerfstudio.checks.renamed`), and a ``config.yml`` or model
package saved with them loads (:func:`legacy_adversarial_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.configs.base_config import InstantiateConfig
from torch import nn
from torch.nn import Parameter

from vq3d_nerfstudio.checks import (
    ElevationRange,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    YawRange,
    pop_renamed_fields,
    ranged,
    renamed,
)
from vq3d_nerfstudio.geometry.cameras import (
    canonical_camera_to_world,
    ray_generator,
    sample_novel_poses,
    square_pinhole_cameras,
)
from vq3d_nerfstudio.geometry.poses import CanonicalCamera
from vq3d_nerfstudio.stage1 import gan

OLD = "--pipeline.model."
"""The prefix of the old flat flags (tyro takes aliases verbatim, so each alias is the whole flag)."""

DISCRIMINATOR = "discriminator"
"""The discriminator's param group (and optimizer) name; the trainer steps it on its own."""


@dataclass
class AdversarialConfig(InstantiateConfig):
    """3D-aware adversarial training: novel views have no ground truth, only the discriminator."""

    _target: Type = field(default_factory=lambda: Adversarial)
    loss_mult: renamed(NonNegativeFloat, OLD + "adversarial-loss-mult") = 0.0
    """Weight of the generator's adversarial loss; 0 turns the discriminator off entirely."""
    discriminator: renamed(Literal["resnet", "patch"], OLD + "discriminator") = "resnet"
    """'resnet': StyleGAN2's residual discriminator (one logit per image, judges global layout; the
    default, as in ViT-VQGAN); 'patch': pix2pix's PatchGAN (one logit per patch, local texture)."""
    discriminator_channels: renamed(PositiveInt, OLD + "discriminator-channels") = 64
    """Width of the discriminator's first layer (doubling per level, up to 256)."""
    objective: renamed(gan.GanLoss, OLD + "gan-loss") = "non-saturating"
    """GAN objective for both players."""
    start_step: renamed(NonNegativeInt, OLD + "adversarial-start-step") = 0
    """Step at which the adversarial loss (and the discriminator's training) starts."""
    ramp_steps: renamed(NonNegativeInt, OLD + "adversarial-ramp-steps") = 1000
    """The adversarial weight ramps linearly from 0 to 1 over this many steps after the start."""
    use_adaptive_weight: renamed(bool, OLD + "adaptive-adversarial-weight") = False
    """VQGAN's adaptive weight: scale the adversarial loss so its gradient at the decoder's last
    layer matches the reconstruction loss's (costs two extra backward passes per step)."""
    r1_gamma: renamed(NonNegativeFloat, OLD + "r1-gamma") = 1.0
    """R1 penalty weight on real images (the loss is gamma / 2 * E||grad D(real)||^2)."""
    r1_interval: renamed(PositiveInt, OLD + "r1-interval") = 4
    """Apply R1 every this many discriminator steps, scaled up to match (StyleGAN2's lazy R1)."""
    resolution: renamed(PositiveInt, OLD + "gan-resolution") = 32
    """Side of the images the discriminator sees: renders of the whole view at this resolution,
    and the input images downsampled to it (a power of two). The perceptual loss compares its
    canonical renders at this size too (also with the discriminator off)."""
    images_per_batch: renamed(PositiveInt, OLD + "gan-images-per-batch") = 4
    """How many of the batch's images get a canonical and a novel-view render for the discriminator
    (and a canonical one for the perceptual loss)."""
    novel_view_max_yaw_deg: renamed(YawRange, OLD + "novel-view-max-yaw-deg") = 30.0
    """Novel-view cameras orbit the pivot with yaw uniform in +-this (degrees). The views the model
    is trained for: the viewer's "Supported views" says these ranges."""
    novel_view_max_elevation_deg: renamed(ElevationRange, OLD + "novel-view-max-elevation-deg") = 15.0
    """... and elevation uniform in +-this (degrees)."""
    novel_view_radius_jitter: renamed(ranged(float, 0, 1, high_open=True), OLD + "novel-view-radius-jitter") = 0.0
    """... at the canonical distance times 1 +- this (0: exactly the canonical distance)."""
    use_disparity: renamed(bool, OLD + "discriminator-sees-disparity") = False
    """Also give the discriminator the disparity channel (render vs pseudo-GT, each normalised per
    image); needs depth in the data."""


def legacy_adversarial_config(state: Dict) -> AdversarialConfig:
    """The nested config for a model config saved when these options were its flat fields
    (``adversarial_loss_mult``, ``gan_resolution``, ...), which it pops from ``state`` (a missing one
    takes its default). Removal: at version 0.2.0, with the old flags, when runs and packages saved
    before issue 28 (commit 20280c8) no longer need to load."""
    return AdversarialConfig(**pop_renamed_fields(AdversarialConfig, state))


RenderRays = Callable[[RayBundle, torch.Tensor], Dict[str, torch.Tensor]]
"""``(rays, index of each ray's image [R]) -> outputs``: the model's renderer of the batch's NeRFs."""


class Adversarial(nn.Module):
    """The adversarial component (see the module docstring). ``discriminator`` is None when
    ``loss_mult`` is 0; the whole-view canonical renders (:meth:`renders`) serve the perceptual loss too."""

    config: AdversarialConfig

    def __init__(self, config: AdversarialConfig, camera: CanonicalCamera) -> None:
        super().__init__()
        self.config = config
        self.camera = camera
        """The canonical camera: renders from it, novel cameras orbit the pivot at its distance."""
        self.discriminator: Optional[nn.Module] = None
        if config.loss_mult > 0:
            in_channels = 4 if config.use_disparity else 3
            self.discriminator = gan.build_discriminator(
                config.discriminator, config.resolution, in_channels, config.discriminator_channels
            )

    def get_param_groups(self, param_groups: Dict[str, List[Parameter]]) -> None:
        """Add the discriminator's parameters as the ``discriminator`` group (nerfstudio's
        ``CameraOptimizer.get_param_groups`` convention); never in the generator's groups."""
        if self.discriminator is not None:
            param_groups[DISCRIMINATOR] = list(self.discriminator.parameters())

    def active(self, step: int) -> bool:
        """Whether the discriminator judges (and trains) at ``step``: it exists and the ramp has started."""
        cfg = self.config
        return self.discriminator is not None and gan.ramp_weight(step, cfg.start_step, cfg.ramp_steps) > 0

    def renders(self, render_rays: RenderRays, num_images: int, batch: Dict, with_novel: bool,
                device: torch.device) -> Dict[str, torch.Tensor]:
        """Whole-view renders at ``resolution`` of the first images' NeRFs (``render_rays``) from the
        canonical camera (for LPIPS and the discriminator) and, ``with_novel``, from one random novel
        camera each (for the discriminator), plus the matching real images.

        Renders are point samples at pixel centres (one ray each), so the real images are point
        sampled at the same centres (bilinear at the low-resolution pixel centres, no area
        filtering): otherwise the discriminator could tell real from fake by the filtering alone.
        """
        cfg = self.config
        num, res = min(cfg.images_per_batch, num_images), cfg.resolution
        poses = canonical_camera_to_world(self.camera.distance)[None].expand(num, 3, 4)
        if with_novel:
            novel = sample_novel_poses(
                num, self.camera.distance, cfg.novel_view_max_yaw_deg, cfg.novel_view_max_elevation_deg,
                cfg.novel_view_radius_jitter,
            )
            poses = torch.cat([poses, novel])
        views = poses.shape[0]
        cameras = square_pinhole_cameras(poses, res, self.camera.fov_deg).to(device)
        cam = torch.arange(views, device=device).repeat_interleave(res * res)
        pix = torch.arange(res * res, device=device).repeat(views)
        rays = ray_generator(cameras)(torch.stack([cam, pix // res, pix % res], -1))
        out = render_rays(rays, cam % num)
        to_images = lambda x: x.reshape(views, res, res, -1).permute(0, 3, 1, 2)  # noqa: E731
        rgb, disparity = to_images(out["rgb"]), to_images(out["disparity"])
        point_sample = lambda x: F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)  # noqa: E731
        real = point_sample(batch["input_images"][:num])
        result = {"gan_canonical_rgb": rgb[:num], "gan_real_rgb": real}
        if not with_novel:
            return result
        fake_d, real_d = rgb * 2 - 1, real * 2 - 1
        if cfg.use_disparity:
            if "input_disparity" not in batch:
                raise ValueError(
                    "--pipeline.model.adversarial.use-disparity needs depth in the data (see vq3d-images --depth-kind)"
                )
            real_disp = point_sample(batch["input_disparity"][:num].float())
            fake_d = torch.cat([fake_d, gan.normalize_disparity(disparity)], 1)
            real_d = torch.cat([real_d, gan.normalize_disparity(real_disp)], 1)
        result.update(gan_fake=fake_d, gan_real=real_d, gan_fake_disparity=disparity.detach())
        return result

    def get_loss_dict(self, step: int, outputs: Dict[str, torch.Tensor], rec_loss: torch.Tensor,
                      last_layer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The generator's ``adversarial_loss`` on the novel and canonical renders of ``outputs``
        (none before the discriminator starts): ``loss_mult`` times the ramp times the generator loss,
        times VQGAN's adaptive weight of ``rec_loss`` against it at ``last_layer`` when
        ``use_adaptive_weight``."""
        cfg = self.config
        weight = gan.ramp_weight(step, cfg.start_step, cfg.ramp_steps)
        if "gan_fake" not in outputs or self.discriminator is None or weight <= 0:
            return {}
        adversarial = gan.generator_loss(self.discriminator(outputs["gan_fake"]), cfg.objective)
        if cfg.use_adaptive_weight:
            weight = weight * gan.adaptive_weight(rec_loss, adversarial, last_layer)
        return {"adversarial_loss": cfg.loss_mult * weight * adversarial}

    @staticmethod
    def discriminator_inputs(outputs: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """The discriminator's real and fake images of a training forward's ``outputs``, detached
        (``real``, ``fake``, and ``gan_fake_disparity`` for logging), or None when it rendered none."""
        if "gan_fake" not in outputs:
            return None
        return {
            "real": outputs["gan_real"].detach(),
            "fake": outputs["gan_fake"].detach(),
            "gan_fake_disparity": outputs["gan_fake_disparity"].detach(),
        }

    def get_discriminator_loss_dict(
        self, step: int, inputs: Optional[Dict[str, torch.Tensor]]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The discriminator's loss on :meth:`discriminator_inputs` (detached real and fake images),
        with R1 on its lazy schedule; and metrics (mean logits). The trainer logs both as ``gan/*``."""
        cfg, disc = self.config, self.discriminator
        if disc is None or inputs is None:
            return {}, {}
        real, fake = inputs["real"], inputs["fake"]
        real_logits, fake_logits = disc(real), disc(fake)
        loss_dict = {"discriminator_loss": gan.discriminator_loss(real_logits, fake_logits, cfg.objective)}
        metrics = {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        if cfg.r1_gamma > 0 and step % max(1, cfg.r1_interval) == 0:
            r1 = gan.r1_penalty(disc, real)
            loss_dict["r1_penalty"] = cfg.r1_gamma / 2 * max(1, cfg.r1_interval) * r1
            metrics["r1"] = r1.detach()
        return loss_dict, metrics
