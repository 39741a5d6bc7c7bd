"""The stage-1 model: shapes, the stage-2 interface, scene selection, gradients."""

import helpers
import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vq3d_nerfstudio.geometry.cameras import orbit_cameras
from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig
from vq3d_nerfstudio.stage1.model import Vq3dModelConfig
from vq3d_nerfstudio.stage1.quantizer import FSQConfig, NoQuantizerConfig

SIZE = 16


def tiny_model(**overrides):
    return helpers.tiny_model(SIZE, metadata={"depth_kind": "z-depth"}, **overrides)


def train_batch(model, num_images=2, rays=10):
    cameras = orbit_cameras([(0.0, 0.0)] * num_images, SIZE, 2.0, 50.0)
    bundle = cameras.generate_rays(camera_indices=torch.arange(num_images).repeat_interleave(rays)[:, None],
                                   coords=torch.rand(num_images * rays, 2) * SIZE)
    bundle.metadata["batch_idx"] = torch.arange(num_images).repeat_interleave(rays)[:, None]
    batch = {
        "input_images": torch.rand(num_images, 3, SIZE, SIZE),
        "image": torch.rand(num_images * rays, 3),
        "disparity": torch.full((num_images * rays, 1), 0.5),
        "disparity_mask": torch.ones(num_images * rays, 1, dtype=torch.bool),
    }
    return bundle, batch


def test_indices_round_trip_gives_the_same_triplanes():
    model = tiny_model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    indices = model.encode_to_indices(images)
    assert indices.shape == (2, 4, 4)
    quantized, _, _ = model.encode(images)
    assert torch.allclose(model.decode_from_indices(indices), model.decoder(quantized), atol=1e-5)
    assert model.decode_from_indices(indices).shape == (2, 3, 4, 8 + 2 * 3, 8 + 2 * 3)  # inner texels + margin


def test_training_forward_outputs_and_losses():
    model = tiny_model().train()
    bundle, batch = train_batch(model)
    outputs = model(bundle, batch)
    assert outputs["rgb"].shape == (20, 3) and outputs["depth"].shape == (20, 1)
    assert outputs["disparity"].shape == (20, 1) and outputs["accumulation"].shape == (20, 1)
    losses = model.get_loss_dict(outputs, batch, model.get_metrics_dict(outputs, batch))
    assert set(losses) == {"rgb_loss", "rgb_loss_coarse", "vq_loss", "depth_loss"}
    sum(losses.values()).backward()
    # the straight-through estimator lets photometric gradients reach the encoder
    assert model.encoder.patchify.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.grad.abs().sum() > 0


def test_each_ray_uses_its_own_images_triplane():
    model = tiny_model().eval()
    bundle, batch = train_batch(model, num_images=2, rays=6)
    with torch.no_grad():
        both = model(bundle, batch)["rgb"]
        first_only = model(bundle[:6], {**batch, "input_images": batch["input_images"][:1]})["rgb"]
    assert torch.allclose(both[:6], first_only, atol=1e-5)


def test_cam_idx_picks_a_training_image_and_default_is_eval_zero():
    model = tiny_model().eval()
    images = {("train", i): torch.rand(SIZE, SIZE, 3) for i in range(3)}
    images[("eval", 0)] = torch.rand(SIZE, SIZE, 3)
    requested = []

    def loader(split, index):
        requested.append((split, index))
        return images[(split, index)]

    model.image_loader = loader
    camera = orbit_cameras([(10.0, 0.0)], SIZE, 2.0, 50.0)
    default = model.get_outputs_for_camera(camera)["rgb"]
    assert requested == [("eval", 0)]
    camera.metadata = {"cam_idx": 2}
    picked = model.get_outputs_for_camera(camera)["rgb"]
    assert requested[-1] == ("train", 2)
    model.set_scene_images(images[("train", 2)])
    camera.metadata = None
    assert torch.allclose(model.get_outputs_for_camera(camera)["rgb"], picked, atol=1e-6)
    assert not torch.allclose(default, picked)
    # a scene chosen another way stays while the camera keeps sending the same cam_idx
    model.set_scene_images(images[("eval", 0)])
    camera.metadata = {"cam_idx": 2}
    assert torch.allclose(model.get_outputs_for_camera(camera)["rgb"], default, atol=1e-6)
    camera.metadata = {"cam_idx": 1}
    model.get_outputs_for_camera(camera)
    assert requested[-1] == ("train", 1)


def test_accumulated_depth_loss_option():
    model = tiny_model(depth_loss_type="accumulated").train()
    bundle, batch = train_batch(model)
    outputs = model(bundle, batch)
    assert "depth_loss" in model.get_loss_dict(outputs, batch)


def test_image_size_mismatch_is_refused():
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.model.image_size = 32
    # the pipeline is the error boundary of nerfstudio's commands: one line, no traceback
    with pytest.raises(SystemExit, match="^vq3d: error: .*image size"):
        config.pipeline.setup(device="cpu", test_mode="inference")


def test_paper_scale_preset_shapes():
    """`vq3d` follows ViT-VQGAN: 256 px, 8 px patches -> 32x32 tokens, here of FSQ (8, 8, 8, 6, 5) codes."""
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d").pipeline.model
    model = config.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1,
                         metadata={}).eval()
    assert (config.image_size, config.patch_size, config.quantizer.codebook_size) == (256, 8, 8 * 8 * 8 * 6 * 5)
    indices = model.encode_to_indices(torch.rand(1, 3, 256, 256))
    assert indices.shape == (1, 32, 32) and int(indices.max()) < 15360
    with torch.no_grad():
        assert model.decode_from_indices(indices).shape == (1, 3, 32, 128 + 2 * 4, 128 + 2 * 4)  # + margin


def test_rendering_the_shown_scene_never_touches_the_codebook():
    """Viewer renders happen while the model is in training mode: they must not restart codes."""
    model = tiny_model().train()
    model.quantizer.dead_code_threshold = 2.0  # every code would count as dead in a training step
    model.set_scene_images(torch.rand(SIZE, SIZE, 3))
    before = model.quantizer.codebook.detach().clone()
    usage = model.quantizer.code_usage.clone()
    model.get_outputs_for_camera(orbit_cameras([(0.0, 0.0)], SIZE, 2.0, 50.0))
    model.encode_to_indices(torch.rand(1, 3, SIZE, SIZE))
    assert torch.equal(model.quantizer.codebook, before) and torch.equal(model.quantizer.code_usage, usage)


def test_viewer_camera_renders_the_clicked_training_image():
    """nerfstudio's viewer builds cameras with get_camera (any aspect, times, cam_idx metadata)."""
    import numpy as np
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.viewer.utils import CameraState, get_camera

    model = tiny_model().train()  # the viewer renders while training runs
    model.image_loader = lambda split, index: torch.full((SIZE, SIZE, 3), index / 10)
    c2w = torch.tensor([[1.0, 0, 0, 0.3], [0, 1, 0, 0.1], [0, 0, 1, 2.0]])
    state = CameraState(fov=np.radians(50), aspect=1.5, c2w=c2w, camera_type=CameraType.PERSPECTIVE, idx=3)
    outputs = model.get_outputs_for_camera(get_camera(state, 12, 18))
    assert outputs["rgb"].shape == (12, 18, 3) and outputs["disparity"].shape == (12, 18, 1)
    assert model.scene.key == ("train", 3)


def test_fsq_model_round_trip_and_codebook_size():
    model = tiny_model(quantizer=FSQConfig(levels=(3, 2, 2))).eval()
    assert model.config.quantizer.codebook_size == 12 and model.quantizer.codebook_size == 12
    images = torch.rand(2, 3, SIZE, SIZE)
    indices = model.encode_to_indices(images)
    assert int(indices.min()) >= 0 and int(indices.max()) < 12
    quantized, _, losses = model.encode(images)
    assert torch.allclose(model.decode_from_indices(indices), model.decoder(quantized), atol=1e-5)
    assert float(losses["codebook"]) == 0 and float(losses["commitment"]) == 0


def test_a_model_without_quantizer_trains_renders_and_refuses_codes():
    from vq3d_nerfstudio.stage1.edits import encode_image, interpolate
    from vq3d_nerfstudio.stage1.quantizer import NoCodesError

    model = tiny_model(quantizer=NoQuantizerConfig()).train()
    assert model.config.quantizer.codebook_size == 0
    bundle, batch = train_batch(model)
    outputs = model(bundle, batch)
    losses = model.get_loss_dict(outputs, batch, model.get_metrics_dict(outputs, batch))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()
    assert model.encoder.patchify.weight.grad.abs().sum() > 0  # the photometric gradient reaches the encoder
    assert "code_indices" not in outputs and "code_perplexity" not in model.get_metrics_dict(outputs, batch)
    model.eval()
    with pytest.raises(NoCodesError, match="no-quantizer"):
        model.encode_to_indices(torch.rand(1, 3, SIZE, SIZE))
    image = torch.rand(SIZE, SIZE, 3)
    model.set_scene_images(image)
    expected = model.decoder(model.encoder(image.permute(2, 0, 1)[None]))  # the encoder's tokens, unquantized
    assert torch.allclose(model.current_planes(), expected)
    a, b = encode_image(model, image), encode_image(model, torch.rand(SIZE, SIZE, 3))
    assert torch.allclose(interpolate(model, a, b, 0.0), expected, atol=1e-6)  # latent blends end on the image
    with pytest.raises(NoCodesError):
        interpolate(model, a, b, 0.5, "codes")


def test_fsq_groups_model_indices_have_a_group_axis_and_round_trip():
    model = tiny_model(quantizer=FSQConfig(levels=(3, 2, 2), groups=2)).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    indices = model.encode_to_indices(images)
    assert indices.shape == (2, 4, 4, 2) and model.index_shape == (4, 4, 2)
    quantized, _, _ = model.encode(images)
    assert torch.allclose(model.decode_from_indices(indices), model.decoder(quantized), atol=1e-5)
    model.set_scene_indices(indices[1])  # a sample's [h, w, G] grid
    assert torch.allclose(model.current_planes(), model.decoder(quantized[1:]), atol=1e-5)


def test_extra_renders_only_when_a_loss_uses_them():
    """Before the discriminator starts nothing extra is rendered; then canonical + novel views."""
    model = tiny_model(adversarial=AdversarialConfig(loss_mult=0.1, start_step=100, resolution=8, images_per_batch=2)).train()
    bundle, batch = train_batch(model)
    model.step = 0
    assert not any(k.startswith("gan_") for k in model(bundle, batch))
    model.step = 100
    outputs = model(bundle, batch)
    assert outputs["gan_fake"].shape == (4, 3, 8, 8) and outputs["gan_real"].shape == (2, 3, 8, 8)


def test_real_images_are_point_sampled_like_the_renders():
    """A 16 px image seen at 4 px: each low-resolution pixel centre lies between high-resolution
    pixels 4k+1 and 4k+2, so bilinear point sampling averages that 2x2 block (area filtering would
    average the whole 4x4 block, which a one-ray-per-pixel render cannot match)."""
    model = tiny_model(adversarial=AdversarialConfig(resolution=4)).train()
    bundle, batch = train_batch(model)
    renders = model.whole_view_renders(model.decoder(model.encode(batch["input_images"])[0]), batch, with_novel=False)
    image = batch["input_images"]
    expected = image.reshape(2, 3, 4, 4, 4, 4)[:, :, :, 1:3, :, 1:3].mean(dim=(3, 5))
    assert torch.allclose(renders["gan_real_rgb"], expected, atol=1e-6)
    assert "gan_fake" not in renders and renders["gan_canonical_rgb"].shape == (2, 3, 4, 4)


def test_the_adversarial_component_gives_the_models_param_group_and_losses():
    """The model's param groups and loss names are what the trainer and logs rely on ('discriminator',
    'adversarial_loss', the discriminator's 'discriminator_loss' / 'r1_penalty' and 'd_real' /
    'd_fake' / 'r1'); the values are gan.py's formulas with the config's weights: loss_mult 0.1 x
    ramp (step 1 of 4 after the start: 0.5) x the hinge generator loss; the discriminator's hinge
    loss and, on the lazy R1 steps (every 2nd), gamma / 2 x interval x R1."""
    from vq3d_nerfstudio.stage1 import gan

    config = AdversarialConfig(loss_mult=0.1, start_step=0, ramp_steps=4, objective="hinge", resolution=8,
                               images_per_batch=2, discriminator_channels=8, r1_gamma=0.5, r1_interval=2)
    model = tiny_model(adversarial=config).train()
    disc = model.adversarial.discriminator
    groups = model.get_param_groups()
    assert set(groups) == {"autoencoder", "field", "discriminator"}
    assert [id(p) for p in groups["discriminator"]] == [id(p) for p in disc.parameters()]
    assert not {id(p) for p in disc.parameters()} & {id(p) for g in ("autoencoder", "field") for p in groups[g]}
    bundle, batch = train_batch(model)
    model.step = 1
    torch.manual_seed(3)
    outputs = model(bundle, batch)
    losses = model.get_loss_dict(outputs, batch)
    assert list(losses) == ["rgb_loss", "rgb_loss_coarse", "vq_loss", "depth_loss", "adversarial_loss"]
    expected = 0.1 * 0.5 * gan.generator_loss(disc(outputs["gan_fake"]), "hinge")
    assert torch.allclose(losses["adversarial_loss"], expected)
    inputs = model.adversarial.discriminator_inputs(outputs)
    real_logits, fake_logits = disc(inputs["real"]), disc(inputs["fake"])
    d_losses, d_metrics = model.adversarial.get_discriminator_loss_dict(1, inputs)  # not an R1 step
    assert set(d_losses) == {"discriminator_loss"} and set(d_metrics) == {"d_real", "d_fake"}
    assert torch.allclose(d_losses["discriminator_loss"], gan.discriminator_loss(real_logits, fake_logits, "hinge"))
    assert torch.allclose(d_metrics["d_fake"], fake_logits.mean())
    d_losses, d_metrics = model.adversarial.get_discriminator_loss_dict(2, inputs)
    assert set(d_losses) == {"discriminator_loss", "r1_penalty"} and set(d_metrics) == {"d_real", "d_fake", "r1"}
    assert torch.allclose(d_losses["r1_penalty"], 0.5 / 2 * 2 * gan.r1_penalty(disc, inputs["real"]))
    off = tiny_model(adversarial=AdversarialConfig(loss_mult=0.0, start_step=0)).train()
    assert off.adversarial.discriminator is None and "discriminator" not in off.get_param_groups()
    assert "adversarial_loss" not in off.get_loss_dict(off(*train_batch(off)), train_batch(off)[1])


def test_a_checkpoint_with_the_discriminator_at_the_model_level_loads():
    """Checkpoints saved when the discriminator was the model's own submodule (``discriminator.*``)
    load into the adversarial component, weight for weight."""
    gan_on = AdversarialConfig(loss_mult=0.1, resolution=8, discriminator_channels=8)
    saved = tiny_model(adversarial=gan_on)
    old = {k.replace("adversarial.discriminator.", "discriminator.", 1): v for k, v in saved.state_dict().items()}
    assert any(k.startswith("discriminator.") for k in old)
    torch.manual_seed(5)
    loaded = tiny_model(adversarial=gan_on)
    for module in loaded.adversarial.discriminator.modules():  # other weights than the saved ones
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight)
    loaded.load_state_dict(old)
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_depth_target_is_the_batchs_whatever_the_render():
    """The depth loss's target is the batch's per-ray disparity and mask, metric or relative (the
    dataset maps relative pseudo-GT once per image, tests/test_data.py): a flat render does not move
    it, and the loss is the weighted pointwise loss of the fine and coarse weights against it."""
    from vq3d_nerfstudio.stage1.losses import pointwise_depth_loss

    model = tiny_model().train()
    bundle, batch = train_batch(model)
    target, mask = torch.rand(len(bundle), 1), torch.rand(len(bundle), 1) > 0.3
    batch.update(disparity=target, disparity_mask=mask)
    outputs = model(bundle, batch)
    got, got_mask = model._depth_target(dict(outputs, disparity=torch.zeros_like(outputs["disparity"])), batch)
    assert torch.equal(got, target) and torch.equal(got_mask, mask)
    expected = model.config.depth_loss_mult * (
        pointwise_depth_loss(outputs["weights_fine"], outputs["disp_fine"], target, mask)
        + pointwise_depth_loss(outputs["weights_coarse"], outputs["disp_coarse"], target, mask)
    )
    assert torch.allclose(model.get_loss_dict(outputs, batch)["depth_loss"], expected)


def test_config_saved_before_the_sample_fields_were_renamed_loads_their_values():
    """A run's config.yml from before the rename (num_coarse_samples / num_fine_samples) keeps its
    sample counts: nerfstudio loads config.yml with yaml.Loader, as here."""
    import yaml

    text = yaml.dump(Vq3dModelConfig(coarse_samples_per_ray=32, fine_samples_per_ray=32))
    assert "coarse_samples_per_ray: 32" in text and "fine_samples_per_ray: 32" in text
    old = text.replace("coarse_samples_per_ray: 32", "num_coarse_samples: 7").replace(
        "fine_samples_per_ray: 32", "num_fine_samples: 5")
    loaded = yaml.load(old, Loader=yaml.Loader)
    assert (loaded.coarse_samples_per_ray, loaded.fine_samples_per_ray) == (7, 5)
    assert not hasattr(loaded, "num_coarse_samples")


def test_inference_rays_start_at_the_near_plane_as_in_training():
    """nerfstudio's NearFarCollider moves the near plane to 0 outside training by default; ours must
    not: a render samples only [near_plane, far_plane] in eval mode as in training."""
    from nerfstudio.cameras.rays import RayBundle

    model = tiny_model(near_plane=0.3).eval()
    rays = RayBundle(origins=torch.zeros(4, 3), directions=torch.tensor([[0.0, 0.0, -1.0]]).repeat(4, 1),
                     pixel_area=torch.ones(4, 1))
    for training in (True, False):
        model.renderer.train(training)
        bundle = model.renderer.collider(RayBundle(origins=rays.origins, directions=rays.directions, pixel_area=rays.pixel_area))
        assert torch.allclose(bundle.nears, torch.full((4, 1), 0.3)), training
