"""The registered methods, `vq3d` (paper scale, GPU) and `vq3d-tiny` (a 2-core CPU, minutes).

Both come from one builder reading the preset table, so the variants cannot drift apart. This
module is named by the ``nerfstudio.method_configs`` entry point: every ``ns-*`` command imports it
at start-up, so it builds configs only (no data, no weights).
"""

from __future__ import annotations

import copy
from typing import Dict

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.ns.pipeline import Vq3dPipelineConfig
from vq3d_nerfstudio.ns.schedulers import WarmupCosineSchedulerConfig
from vq3d_nerfstudio.ns.trainer import AdamConfig, AdamWithBetasConfig, Vq3dTrainerConfig
from vq3d_nerfstudio.stage1.adversarial import DISCRIMINATOR, AdversarialConfig
from vq3d_nerfstudio.stage1.model import Vq3dModelConfig
from vq3d_nerfstudio.stage1.quantizer import FSQConfig

PRESETS: Dict[str, Dict[str, Dict]] = {
    # ViT-VQGAN scale (Yu et al. 2022; VQ3D builds on it): 256 px, 8 px patches -> 32x32 tokens.
    # Codes: FSQ (8, 8, 8, 6, 5) = 15,360 codes (~2^14, the FSQ paper's levels for that size)
    # instead of ViT-VQGAN's 8192 learned codes: at vq3d-tiny scale FSQ beat the learned codebook by
    # 1.5-2.3 dB held-out at the same budget (BENCHMARKS.md, quality levers). Tri-plane 128^2 x 32
    # channels over the input image (EG3D uses 256^2 x 32; halved for memory at 8 images per GPU)
    # in the canonical frustum, + 4 margin texels. Samples: 48 + 48 per ray, 1024 rays per image.
    "vq3d": dict(
        model=dict(
            image_size=256, patch_size=8, hidden_dim=512, num_encoder_layers=8, num_decoder_layers=8, num_heads=8,
            quantizer=FSQConfig(levels=(8, 8, 8, 6, 5)),
            triplane_resolution=128, triplane_margin=4, triplane_channels=32, field_hidden_dim=64,
            coarse_samples_per_ray=48, fine_samples_per_ray=48,
            # 3D-aware GAN: D sees 64 px renders of canonical and novel views (full 256 px renders
            # of 8 images x 2 views would be 1M rays a step); adversarial loss after the
            # reconstruction has formed (VQGAN starts its discriminator late too); LPIPS-VGG.
            adversarial=AdversarialConfig(loss_mult=0.1, start_step=20_000, ramp_steps=5_000, resolution=64, images_per_batch=8),
            perceptual_loss_mult=0.1,
        ),
        data=dict(images_per_batch=8, rays_per_image=1024, num_workers=8),
        train=dict(lr=1e-4, d_lr=2e-4, max_steps=500_000, warmup=5_000, device_type="cuda", steps_per_save=2_000, steps_per_eval=1_000),
    ),
    # A CPU model that learns something visible in minutes: 64 px, 4 px patches -> 16x16 tokens of
    # FSQ (8, 8, 8, 6, 5) = 15,360 codes (the vq3d preset's); 1650 steps take 13-19 minutes on 2
    # cores. Chosen by the ablation in BENCHMARKS.md (quality levers): frustum planes + depth input +
    # FSQ + 16x16 tokens + 14-bit codes (the tokens, not the 3D part, bound its canonical PSNR: token
    # capacity); the convolutional upsampler lost there, so the decoder keeps its linear head.
    # One code a token (groups 1): 4 codes buy +1.2 dB canonical for 4x the bits stage 2 must model
    # and 5x its step time (BENCHMARKS.md, more bits per token in 3D); not worth it on a CPU.
    "vq3d-tiny": dict(
        model=dict(
            image_size=64, patch_size=4, hidden_dim=128, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
            quantizer=FSQConfig(levels=(8, 8, 8, 6, 5)),
            triplane_resolution=64, triplane_margin=3, triplane_channels=16, field_hidden_dim=64,
            coarse_samples_per_ray=24, fine_samples_per_ray=24,
            # GAN off by default (turn on with --pipeline.model.adversarial.loss-mult 0.1): on 2
            # cores it costs steps (BENCHMARKS.md). When on: 32 px views of 4 images, from step 500.
            adversarial=AdversarialConfig(loss_mult=0.0, start_step=500, ramp_steps=500, resolution=32, images_per_batch=4),
            perceptual_loss_mult=0.0,
        ),
        data=dict(images_per_batch=8, rays_per_image=256, num_workers=1),
        train=dict(lr=1e-3, d_lr=1e-3, max_steps=1_650, warmup=200, device_type="cpu", steps_per_save=250, steps_per_eval=250),
    ),
}


def build_trainer_config(name: str) -> Vq3dTrainerConfig:
    """The full ``TrainerConfig`` for preset ``name`` (a key of :data:`PRESETS`)."""
    preset = PRESETS[name]
    p = preset["train"]
    model = Vq3dModelConfig(**copy.deepcopy(preset["model"]), eval_num_rays_per_chunk=4096)  # configs are mutable
    datamanager = Vq3dDataManagerConfig(
        dataparser=Vq3dImagesDataParserConfig(image_size=model.image_size), **preset["data"]
    )

    def schedule() -> Dict:
        return {
            "optimizer": AdamConfig(lr=p["lr"], eps=1e-8, weight_decay=0.0),
            # the cosine's length follows --max-num-iterations (max_steps None; see the scheduler)
            "scheduler": WarmupCosineSchedulerConfig(warm_up_end=p["warmup"], learning_rate_alpha=0.05),
        }

    config = Vq3dTrainerConfig(
        method_name=name,
        steps_per_eval_batch=p["steps_per_eval"],
        steps_per_eval_image=p["steps_per_eval"],
        steps_per_eval_all_images=10 * p["max_steps"],
        steps_per_save=p["steps_per_save"],
        max_num_iterations=p["max_steps"],
        mixed_precision=False,
        pipeline=Vq3dPipelineConfig(datamanager=datamanager, model=model),
        optimizers={
            "autoencoder": schedule(),
            "field": schedule(),
            # StyleGAN2's Adam for the discriminator (beta1 = 0), constant rate; used when
            # --pipeline.model.adversarial.loss-mult > 0.
            DISCRIMINATOR: {"optimizer": AdamWithBetasConfig(lr=p["d_lr"], eps=1e-8, betas=(0.0, 0.99)), "scheduler": None},
        },
        viewer=ViewerConfig(num_rays_per_chunk=4096, quit_on_train_completion=True),
        vis="viewer",
    )
    config.machine.device_type = p["device_type"]
    return config


def preset_summary(name: str) -> str:
    """Image size, token grid and codes of preset ``name``, read from :data:`PRESETS` (so the
    ``ns-train --help`` text cannot drift from the table), e.g. ``256 px, 32x32 tokens of 15,360 FSQ codes``."""
    model = PRESETS[name]["model"]
    side = model["image_size"] // model["patch_size"]
    quantizer = model["quantizer"]
    kind = type(quantizer).__name__.removesuffix("Config")
    codes = f"{quantizer.codebook_size:,} {kind} codes" if quantizer.has_codes else "continuous values"
    per_token = f"{quantizer.groups} x " if quantizer.groups > 1 else ""
    return f"{model['image_size']} px, {side}x{side} tokens of {per_token}{codes}"


vq3d = MethodSpecification(
    config=build_trainer_config("vq3d"),
    description=f"VQ3D stage 1 at paper scale ({preset_summary('vq3d')}): one image -> a NeRF. Needs a GPU.",
)
vq3d_tiny = MethodSpecification(
    config=build_trainer_config("vq3d-tiny"),
    description=f"VQ3D stage 1, small enough to train on a 2-core CPU in minutes ({preset_summary('vq3d-tiny')}).",
)
