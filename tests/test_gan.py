"""3D-aware adversarial training: cameras, losses by hand, and the trainer's two separate steps."""

import math
import subprocess

import numpy as np
import pytest
import torch
from helpers import FAST, cli
from torch import nn

from vq3d_nerfstudio.geometry import cameras
from vq3d_nerfstudio.stage1 import gan
from vq3d_nerfstudio.stage1.quantizer import VQConfig


# ---- pure pieces, against hand computations --------------------------------------------------------
def test_novel_cameras_orbit_the_pivot_within_the_ranges():
    poses = cameras.sample_novel_poses(500, 2.0, 30.0, 15.0, radius_jitter=0.1, generator=torch.Generator().manual_seed(0))
    assert poses.shape == (500, 3, 4)
    pos = poses[:, :, 3].double()
    radius = pos.norm(dim=1)
    assert radius.min() >= 2.0 * 0.9 - 1e-5 and radius.max() <= 2.0 * 1.1 + 1e-5
    yaw = torch.rad2deg(torch.atan2(pos[:, 0], pos[:, 2]))
    elevation = torch.rad2deg(torch.asin(pos[:, 1] / radius))
    assert yaw.abs().max() <= 30.0 + 1e-4 and elevation.abs().max() <= 15.0 + 1e-4
    assert yaw.abs().max() > 25 and elevation.abs().max() > 12  # the ranges are actually used
    # every camera looks at the pivot: its -z axis points from the camera to the origin
    forward = -poses[:, :, 2].double()
    assert torch.allclose(forward, -pos / radius[:, None], atol=1e-5)
    # rotation is orthonormal with world +y up (no roll): the camera x axis is horizontal
    rot = poses[:, :, :3].double()
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(500, 3, 3), atol=1e-5)
    assert rot[:, 1, 0].abs().max() < 1e-5
    exact = cameras.sample_novel_poses(64, 2.0, 30.0, 15.0)
    assert torch.allclose(exact[:, :, 3].norm(dim=1), torch.full((64,), 2.0), atol=1e-5)


class Quadratic(nn.Module):
    """D(x) = a * sum(x^2) per image: grad = 2 a x, so R1 = mean_b 4 a^2 ||x_b||^2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.a * x.square().flatten(1).sum(1)


def test_r1_matches_hand_computation():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -3.0]]]])  # two 1x1x2 "images"
    disc = Quadratic()
    r1 = gan.r1_penalty(disc, x)
    # a = 0.5: grad = x; ||x_0||^2 = 5, ||x_1||^2 = 9 -> mean 7
    assert float(r1) == pytest.approx(7.0)
    (grad,) = torch.autograd.grad(r1, disc.a)  # differentiable in D's parameters: d/da 4 a^2 * 7 = 56 a
    assert float(grad) == pytest.approx(28.0)
    linear = nn.Linear(4, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0]]))
    flat = lambda t: linear(t.flatten(1)).reshape(-1)  # noqa: E731 grad = w for every image: R1 = ||w||^2
    assert float(gan.r1_penalty(flat, torch.randn(3, 1, 2, 2))) == pytest.approx(1 + 4 + 0.25)


def test_gan_losses_by_hand():
    zero = torch.zeros(4)
    assert float(gan.discriminator_loss(zero, zero, "non-saturating")) == pytest.approx(2 * math.log(2))
    assert float(gan.generator_loss(zero, "non-saturating")) == pytest.approx(math.log(2))
    assert float(gan.discriminator_loss(torch.full((2,), 2.0), torch.full((2,), -2.0), "hinge")) == 0.0
    assert float(gan.discriminator_loss(torch.tensor([0.5]), torch.tensor([0.5]), "hinge")) == pytest.approx(2.0)
    assert float(gan.generator_loss(torch.tensor([1.0, 3.0]), "hinge")) == pytest.approx(-2.0)


def test_ramp_and_adaptive_weight():
    assert [gan.ramp_weight(s, 10, 4) for s in (0, 9, 10, 11, 13, 100)] == [0, 0, 0.25, 0.5, 1, 1]
    assert gan.ramp_weight(5, 5, 0) == 1.0
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    rec, adv = (w @ x) ** 2, 3 * (w @ x)  # grads: 2 (w.x) x and 3 x  -> ratio 2 |w.x| / 3 = 22 / 3
    assert float(gan.adaptive_weight(rec, adv, w)) == pytest.approx(22 / 3, rel=1e-4)


@pytest.mark.parametrize("kind", ["resnet", "patch"])
def test_discriminators_take_images_and_disparity(kind):
    disc = gan.build_discriminator(kind, 16, 4, 16)
    logits = disc(torch.randn(6, 4, 16, 16))
    assert logits.shape[0] == 6 and torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        gan.build_discriminator("resnet", 12, 3, 16)


# ---- the trainer ----------------------------------------------------------------------------------
GAN = dict(loss_mult=0.1, start_step=0, ramp_steps=1, resolution=8, images_per_batch=2, discriminator_channels=8, r1_interval=1)
"""A small GAN from the first step (``--pipeline.model.adversarial.*``)."""


def make_trainer(data, out, load_dir=None, adversarial=None, **model):
    """A vq3d-tiny trainer on ``data`` with :data:`GAN` updated by ``adversarial``, and ``model`` options."""
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.data = data
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.images_per_batch = 2
    config.pipeline.datamanager.rays_per_image = 16
    config.pipeline.datamanager.num_workers = 0
    for target, options in ((config.pipeline.model.adversarial, {**GAN, **(adversarial or {})}), (config.pipeline.model, model)):
        for key, value in options.items():
            assert hasattr(target, key), key  # setattr would add an attribute nothing reads
            setattr(target, key, value)
    config.vis = "tensorboard"
    config.output_dir = out
    config.experiment_name = "gan"
    config.timestamp = "t"
    config.load_dir = load_dir
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def generator_state(model):
    return {k: v for k, v in snapshot(model).items() if not k.startswith("adversarial.discriminator.")}


def test_generator_and_discriminator_steps_leave_each_other_bit_identical(synth_dir, tmp_path):
    trainer = make_trainer(synth_dir, tmp_path)
    model = trainer.pipeline.model
    assert "discriminator" in trainer.optimizers.parameters
    disc = model.adversarial.discriminator
    disc_ids = {id(p) for p in disc.parameters()}
    assert not any(id(p) in disc_ids for g, ps in trainer.optimizers.parameters.items() if g != "discriminator" for p in ps)
    # step 0 runs at the warm-up's learning rate 0 (with FSQ nothing moves at all): test the next step
    trainer.train_iteration(0)
    before_d, before_g = snapshot(disc), generator_state(model)
    seen = {}
    original = model.adversarial.get_discriminator_loss_dict

    def spy(step, inputs):  # runs between the generator step and the discriminator step
        seen["d"], seen["g"] = snapshot(disc), generator_state(model)
        return original(step, inputs)

    model.adversarial.get_discriminator_loss_dict = spy
    _, loss_dict, metrics = trainer.train_iteration(1)
    assert "adversarial_loss" in loss_dict and "gan/discriminator_loss" in metrics and "gan/r1" in metrics
    assert same(seen["d"], before_d), "the generator step moved a discriminator parameter"
    assert not same(seen["g"], before_g), "the generator step did not train the generator"
    after_d, after_g = snapshot(disc), generator_state(model)
    assert same(after_g, seen["g"]), "the discriminator step moved a generator parameter"
    assert not same(after_d, seen["d"]), "the discriminator step did not train the discriminator"


def test_nan_loss_is_skipped_without_touching_weights(synth_dir, tmp_path):
    trainer = make_trainer(synth_dir, tmp_path)
    model = trainer.pipeline.model
    trainer.train_iteration(0)  # optimizer states exist now
    before = snapshot(model)
    opt_before = {k: {i: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for i, s in v.state_dict()["state"].items()}
                  for k, v in trainer.optimizers.optimizers.items()}
    original = model.get_loss_dict

    def poisoned(outputs, batch, metrics_dict=None):
        losses = original(outputs, batch, metrics_dict)
        losses["rgb_loss"] = losses["rgb_loss"] * float("nan")
        return losses

    model.get_loss_dict = poisoned
    _, _, metrics = trainer.train_iteration(1)
    after = snapshot(model)
    changed = [k for k in before if not torch.equal(before[k], after[k]) and "code_usage" not in k]
    assert not changed, f"weights changed by a skipped step: {changed}"
    for group, states in opt_before.items():
        now = trainer.optimizers.optimizers[group].state_dict()["state"]
        for i, tensors in states.items():
            assert all(torch.equal(t, now[i][n]) for n, t in tensors.items()), f"optimizer state of {group} changed"
    assert float(metrics["skipped_steps/generator"]) == 1.0
    model.get_loss_dict = original
    trainer.train_iteration(2)  # training goes on
    assert all(torch.isfinite(v).all() for v in snapshot(model).values() if v.is_floating_point())


def test_checkpoint_mid_gan_resumes_the_same_discriminator(synth_dir, tmp_path):
    trainer = make_trainer(synth_dir, tmp_path / "a")
    for step in range(2):
        trainer.train_iteration(step)
    trainer.save_checkpoint(1)
    ckpt_dir = trainer.checkpoint_dir
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000000001.ckpt"]  # no temporary file left
    resumed = make_trainer(synth_dir, tmp_path / "b", load_dir=ckpt_dir)
    assert resumed._start_step == 2
    assert same(snapshot(trainer.pipeline.model.adversarial.discriminator), snapshot(resumed.pipeline.model.adversarial.discriminator))
    old = trainer.optimizers.optimizers["discriminator"].state_dict()
    new = resumed.optimizers.optimizers["discriminator"].state_dict()
    assert old["state"].keys() == new["state"].keys() and len(old["state"]) > 0
    for i in old["state"]:
        for name, value in old["state"][i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(new["state"][i][name])), name
    assert new["param_groups"][0]["betas"] == (0.0, 0.99)


def test_discriminator_can_see_disparity(synth_dir, tmp_path):
    trainer = make_trainer(synth_dir, tmp_path, adversarial=dict(use_disparity=True, discriminator="patch"))
    _, loss_dict, _ = trainer.train_iteration(0)
    cache = trainer.gan_inputs
    assert cache["fake"].shape == (4, 4, 8, 8) and cache["real"].shape == (2, 4, 8, 8)
    # both disparity channels are normalised per image
    assert torch.allclose(cache["real"][:, 3].flatten(1).mean(1), torch.zeros(2), atol=1e-4)
    assert torch.isfinite(loss_dict["adversarial_loss"])


# ---- through the real CLI -------------------------------------------------------------------------
def test_ns_train_with_adversarial_losses(synth_dir, tmp_path, cli_env):
    result = subprocess.run(
        [cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--experiment-name", "g",
         "--max-num-iterations", "4", *FAST, "--pipeline.model.adversarial.loss-mult", "0.1",
         "--pipeline.model.adversarial.start-step", "1", "--pipeline.model.adversarial.resolution", "16",
         "--pipeline.model.adversarial.images-per-batch", "2", "--logging.steps-per-log", "1",
         "--steps-per-eval-image", "2"],  # the GAN image is logged at step 2: D renders nothing before step 1
        env=cli_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = tmp_path.glob("g/vq3d-tiny/*/nerfstudio_models/step-000000003.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert any(k.startswith("_model.adversarial.discriminator.") for k in state["pipeline"])
    assert "discriminator" in state["optimizers"] and len(state["optimizers"]["discriminator"]["state"]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = tmp_path.glob("g/vq3d-tiny/*/events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert any(t.startswith("GAN/") for t in tags["images"]), tags["images"]
    logged = set(tags["scalars"])
    for name in ("Train Loss Dict/adversarial_loss", "Train Metrics Dict/gan/discriminator_loss",
                 "Train Metrics Dict/gan/d_real", "Train Metrics Dict/gan/d_fake", "Train Metrics Dict/skipped_steps/generator"):
        assert name in logged, sorted(logged)


def test_missing_perceptual_weights_is_one_line_or_a_warning(synth_dir, tmp_path, cli_env):
    base = [cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--max-num-iterations", "2",
            *FAST, "--pipeline.model.perceptual-loss-mult", "0.1", "--pipeline.model.perceptual-weights",
            str(tmp_path / "no_vgg.pth"), "--pipeline.model.adversarial.resolution", "16"]
    failed = subprocess.run(base, env=cli_env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0
    assert "no_vgg.pth" in failed.stderr and "Traceback" not in failed.stderr
    assert "perceptual-loss-mult 0" in failed.stderr
    skipped = subprocess.run([*base, "--pipeline.model.perceptual-if-missing", "skip"], env=cli_env, capture_output=True,
                             text=True, timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "training without the perceptual loss" in skipped.stdout


def test_perceptual_loss_with_local_vgg_weights(synth_dir, tmp_path):
    import torchvision

    weights = tmp_path / "vgg16-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), weights)
    trainer = make_trainer(synth_dir, tmp_path, adversarial=dict(loss_mult=0.0, resolution=16), perceptual_loss_mult=0.1,
                           perceptual_weights=weights)
    _, loss_dict, _ = trainer.train_iteration(0)
    assert float(loss_dict["perceptual_loss"]) > 0
    assert not any("lpips" in k or "perceptual" in k for k in trainer.pipeline.model.state_dict())  # not in checkpoints
    np.testing.assert_equal(trainer.pipeline.model.adversarial.discriminator, None)


def test_ctrl_c_finishes_the_step_and_saves_a_checkpoint(synth_dir, tmp_path, cli_env):
    import signal
    import time

    proc = subprocess.Popen(
        [cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--experiment-name", "i",
         "--max-num-iterations", "100000", "--steps-per-save", "100000", *FAST[:-2], "--pipeline.datamanager.num-workers", "1"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("i/vq3d-tiny/*/events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(8)  # some steps
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "saving a checkpoint" in stdout
    (ckpt,) = tmp_path.glob("i/vq3d-tiny/*/nerfstudio_models/step-*.ckpt")
    step = int(ckpt.stem.split("-")[1])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert 0 < step < 100000 - 1 and state["step"] == step


def test_adaptive_weight_and_hinge_train(synth_dir, tmp_path):
    trainer = make_trainer(synth_dir, tmp_path, adversarial=dict(use_adaptive_weight=True, objective="hinge"))
    trainer.train_iteration(0)  # at the warm-up's learning rate 0
    before = generator_state(trainer.pipeline.model)
    _, loss_dict, metrics = trainer.train_iteration(1)
    assert torch.isfinite(loss_dict["adversarial_loss"]) and torch.isfinite(metrics["gan/discriminator_loss"])
    assert not same(before, generator_state(trainer.pipeline.model))


def test_restarted_codes_start_with_fresh_adam_moments(synth_dir, tmp_path):
    """The trainer zeroes the Adam moments of codes the quantizer restarted, before the step, and
    leaves every other code's moments as they were."""
    trainer = make_trainer(synth_dir, tmp_path, adversarial=dict(loss_mult=0.0), quantizer=VQConfig())
    model = trainer.pipeline.model
    codebook = model.quantizer.codebook
    trainer.train_iteration(0)  # optimizer state exists now
    group = next(name for name, params in trainer.optimizers.parameters.items() if any(p is codebook for p in params))
    state = trainer.optimizers.optimizers[group].state[codebook]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    model.quantizer.dead_code_threshold = 1e-3
    model.quantizer.code_usage[:16] = 0.0  # unpicked this step, these codes die
    seen = {}
    original = trainer.optimizers.optimizer_scaler_step_some

    def spy(*args, **kwargs):
        seen.update({k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")})
        return original(*args, **kwargs)

    trainer.optimizers.optimizer_scaler_step_some = spy
    trainer.train_iteration(1)
    restarted = model.quantizer.last_restarted
    assert 0 < int(restarted.sum()) <= 16 and not bool(restarted[16:].any())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(seen[key][restarted], torch.zeros_like(seen[key][restarted]))
        assert torch.equal(seen[key][~restarted], before[key][~restarted])
    assert bool((before["exp_avg_sq"][restarted] != 0).any())  # there was something to reset
