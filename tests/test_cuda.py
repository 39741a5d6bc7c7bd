"""What only a CUDA GPU runs: mixed-precision training steps, the data path onto the GPU, the GPU
render against the CPU one, stage 2 on the GPU, and gsplat's CUDA rasterizer and refinement.

Marked ``cuda``: skipped where no GPU is visible (``conftest.py``); ``benchmarks/gpu.py`` runs them
with ``pytest -m cuda``. Everything here is in-process (no console scripts): on a bare GPU machine
the project runs from its checkout with the wheels on PYTHONPATH.
"""

import math

import pytest
import torch
from helpers import tiny_model

from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig

pytestmark = pytest.mark.cuda

GAN_MODEL = dict(adversarial=AdversarialConfig(loss_mult=0.1, start_step=0, ramp_steps=1, resolution=8, images_per_batch=2,
                                               discriminator_channels=8, r1_interval=1))


def tiny_config(data, out, mixed_precision=True, steps=30, **model):
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.machine.device_type = "cuda"
    config.mixed_precision = mixed_precision
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.images_per_batch = 2
    config.pipeline.datamanager.rays_per_image = 64
    config.pipeline.datamanager.num_workers = 1
    for key, value in model.items():
        setattr(config.pipeline.model, key, value)
    config.vis, config.output_dir, config.experiment_name, config.timestamp = "tensorboard", out, "cuda", "t"
    config.max_num_iterations = steps
    config.steps_per_save = steps
    return config


@pytest.fixture(scope="module")
def cuda_run(synth_dir, tmp_path_factory):
    """vq3d-tiny trained 30 steps on the GPU with mixed precision and the GAN on: ``(config.yml, weights
    before, weights after, trainer)``. Not fewer: the fp16 grad scaler starts at 2^16 and skips the
    steps whose scaled gradients overflow until it has halved enough (a group whose gradients
    overflow does not move; on an H200 the encoder had not moved after 4 steps)."""
    config = tiny_config(synth_dir, tmp_path_factory.mktemp("cuda_run"), **GAN_MODEL)
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.pipeline.model.state_dict().items()}
    trainer.train()
    after = {k: v.detach().clone() for k, v in trainer.pipeline.model.state_dict().items()}
    return config.get_base_dir() / "config.yml", before, after, trainer


def test_mixed_precision_steps_train_every_player_in_float32(cuda_run):
    _, before, after, trainer = cuda_run
    assert trainer.mixed_precision and trainer.grad_scaler.is_enabled()
    assert trainer.skipped_steps == {"generator": 0, "discriminator": 0}
    for name in ("encoder", "decoder", "field", "adversarial.discriminator"):
        keys = [k for k in after if k.startswith(name + ".") and after[k].is_floating_point()]
        assert keys, name
        assert all(after[k].dtype == torch.float32 and bool(torch.isfinite(after[k]).all()) for k in keys), name
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"{name} did not move"
    assert math.isfinite(trainer.grad_scaler.get_scale())


def test_gpu_render_matches_the_cpu_render():
    """The same weights and image rendered on the GPU and on the CPU: PSNR between them above 40 dB
    (float32 everywhere; cuDNN may use TF32 convolutions) and depth within 1%."""
    model = tiny_model(size=16, triplane_resolution=8).eval()
    image = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0))
    from vq3d_nerfstudio.geometry.cameras import orbit_cameras

    camera = orbit_cameras([(10.0, 5.0)], 16, model.camera_distance, model.fov_deg)
    outputs = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with torch.no_grad():
            model.set_scene_images(image.to(device))
            out = model.get_outputs_for_camera(camera.to(device))
        outputs[device] = {k: out[k].float().cpu() for k in ("rgb", "depth")}
    mse = (outputs["cpu"]["rgb"] - outputs["cuda"]["rgb"]).square().mean()
    assert -10 * math.log10(float(mse) + 1e-20) > 40
    torch.testing.assert_close(outputs["cuda"]["depth"], outputs["cpu"]["depth"], rtol=1e-2, atol=1e-4)


def test_cuda_data_path_delivers_the_cpu_batches_on_the_gpu(synth_dir, tmp_path):
    """The streaming datamanager on the GPU (pinned loader memory) hands over the same images as on the
    CPU, every ray and target on the GPU, each ray's ``batch_idx`` naming its image."""
    batches = {}
    for device in ("cpu", "cuda"):
        config = tiny_config(synth_dir, tmp_path / device)
        config.machine.device_type = device
        datamanager = config.pipeline.datamanager.setup(device=device, test_mode="val")
        rays, batch = datamanager.next_train(0)
        batches[device] = (rays, batch)
    rays, batch = batches["cuda"]
    assert rays.origins.device.type == "cuda" and batch["image"].device.type == "cuda"
    assert batch["input_images"].device.type == "cuda" and batch["disparity"].device.type == "cuda"
    torch.testing.assert_close(batch["input_images"].cpu(), batches["cpu"][1]["input_images"], rtol=0, atol=0)
    batch_idx = rays.metadata["batch_idx"][:, 0]
    assert torch.equal(batch_idx.cpu(), torch.arange(2).repeat_interleave(64))


def test_a_trained_gpu_run_scores_with_vq3d_eval_on_the_gpu(cuda_run, synth_dir):
    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    config_path = cuda_run[0]
    summary, results = evaluate_run(config_path, synth_dir / "scene_00000")
    assert len(results) == 1 and set(summary) >= {"0"}
    assert all(math.isfinite(row["psnr"]) for row in summary.values())


def test_stage2_on_the_gpu_samples_like_full_recomputation_and_trains_with_bf16():
    from vq3d_nerfstudio.stage2.train import Stage2TrainConfig, make_optimizer, train_step
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig, sample_tokens

    torch.manual_seed(0)
    config = TokenTransformerConfig(vocab_size=16, num_classes=3, block_size=12, num_layers=2, num_heads=2, embed_dim=32)
    model = TokenTransformer(config).cuda()
    classes = torch.tensor([0, 1, 2, 0], device="cuda")
    cached = sample_tokens(model, classes, generator=torch.Generator("cuda").manual_seed(7), use_kv_cache=True)
    full = sample_tokens(model, classes, generator=torch.Generator("cuda").manual_seed(7), use_kv_cache=False)
    assert torch.equal(cached, full)
    # one batch, repeated: bf16 autocast steps drive its loss down
    codes = torch.randint(0, 16, (8, 12), device="cuda")
    labels = torch.randint(0, 3, (8,), device="cuda")
    optimizer = make_optimizer(model, Stage2TrainConfig(learning_rate=3e-3))
    losses = [float(train_step(model, model, optimizer, codes, labels, True, 1.0)[0]) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


# ---- gsplat (its CUDA kernels are compiled on first use) ------------------------------------------
def _splat_scene():
    from vq3d_nerfstudio.export.gaussians import Gaussians
    from vq3d_nerfstudio.export.rasterize import cameras_to_viewmats
    from vq3d_nerfstudio.geometry.cameras import orbit_cameras

    gen = torch.Generator().manual_seed(5)
    num = 200
    means = (torch.rand(num, 3, generator=gen) - 0.5) * 0.8
    truth = Gaussians(
        means=means, scales=0.02 + 0.06 * torch.rand(num, 3, generator=gen), quats=torch.randn(num, 4, generator=gen),
        opacities=0.2 + 0.7 * torch.rand(num, generator=gen), colors=torch.rand(num, 3, generator=gen),
    )
    truth.quats = torch.nn.functional.normalize(truth.quats, dim=-1)
    viewmats, Ks = cameras_to_viewmats(orbit_cameras([(0.0, 0.0), (15.0, 5.0), (-15.0, -5.0)], 48, 2.0, 50.0))
    return truth, viewmats, Ks


def test_gsplat_cuda_rasterizer_matches_the_pure_torch_twin():
    """gsplat's CUDA rasterization against this project's pure-torch rasterizer on the same splats and
    cameras: above 35 dB (gsplat culls at 3 sigma per 16 px tile, the twin evaluates down to alpha 1/255)."""
    from vq3d_nerfstudio.export.rasterize import gsplat_rasterize, rasterize, render_gaussians

    truth, viewmats, Ks = _splat_scene()
    ref, _ = render_gaussians(truth, viewmats, Ks, 48, 48, rasterize)
    g = truth.to("cuda")
    fast, _ = render_gaussians(g, viewmats.cuda(), Ks.cuda(), 48, 48, gsplat_rasterize)
    mse = (fast.cpu() - ref).square().mean()
    assert -10 * math.log10(float(mse) + 1e-20) > 35


def test_gsplat_refinement_brings_splats_closer_to_their_targets():
    from vq3d_nerfstudio.export.rasterize import gsplat_rasterize, render_gaussians
    from vq3d_nerfstudio.export.refine import refine_gaussians

    truth, viewmats, Ks = _splat_scene()
    viewmats, Ks = viewmats.cuda(), Ks.cuda()
    targets, _ = render_gaussians(truth.to("cuda"), viewmats, Ks, 48, 48, gsplat_rasterize)
    start = truth.to("cuda")
    start.colors = torch.full_like(start.colors, 0.5)
    start.opacities = torch.full_like(start.opacities, 0.3)
    losses = []
    refined = refine_gaussians(start, targets, viewmats, Ks, steps=60, colors_lr=0.05,
                               on_step=lambda step, loss: losses.append(loss))
    final, _ = render_gaussians(refined, viewmats, Ks, 48, 48, gsplat_rasterize)
    assert (final - targets).abs().mean() < 0.5 * (losses[0] + losses[1] + losses[2]) / 3


def test_export_splats_refines_with_gsplat_on_a_gpu_run(cuda_run, tmp_path, capsys):
    from plyfile import PlyData

    from vq3d_nerfstudio.scripts.common import ModelSource
    from vq3d_nerfstudio.scripts.export_splats import ExportSplats

    output = tmp_path / "splats.ply"
    ExportSplats(source=ModelSource(load_config=cuda_run[0]), output=output, num_gaussians=2000, num_cameras=3,
                 ray_resolution=32, refine_steps=20, report_resolution=32, timing_repeats=1).main()
    printed = capsys.readouterr().out
    assert "Refined the splats for 20 steps with gsplat" in printed and "gsplat (CUDA)" in printed
    assert 0 < PlyData.read(str(output))["vertex"].count <= 2000
