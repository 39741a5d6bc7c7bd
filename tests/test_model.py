"""The stage-1 model: shapes, the stage-2 interface, scene selection, gradients."""

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vq3d_nerfstudio.model import Vq3dModelConfig
from vq3d_nerfstudio.orbit import orbit_cameras

SIZE = 16


def tiny_model(**overrides):
    config = Vq3dModelConfig(
        image_size=SIZE, patch_size=4, hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
        codebook_size=32, code_dim=8, triplane_resolution=8, triplane_channels=4, field_hidden_dim=16,
        num_coarse_samples=8, num_fine_samples=8, **overrides,
    )
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=4,
                        metadata={"depth_kind": "z-depth"})


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
    assert model.decode_from_indices(indices).shape == (2, 3, 4, 8, 8)


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
    from vq3d_nerfstudio.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.model.image_size = 32
    with pytest.raises(ValueError, match="image size"):
        config.pipeline.setup(device="cpu", test_mode="inference")


def test_paper_scale_preset_shapes():
    """`vq3d` follows ViT-VQGAN: 256 px, 8 px patches -> 32x32 tokens from 8192 codes."""
    from vq3d_nerfstudio.method_configs import build_trainer_config

    config = build_trainer_config("vq3d").pipeline.model
    model = config.setup(scene_box=SceneBox(torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1,
                         metadata={}).eval()
    assert (config.image_size, config.patch_size, config.codebook_size) == (256, 8, 8192)
    indices = model.encode_to_indices(torch.rand(1, 3, 256, 256))
    assert indices.shape == (1, 32, 32) and int(indices.max()) < 8192
    with torch.no_grad():
        assert model.decode_from_indices(indices).shape == (1, 3, 32, 128, 128)


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
    assert model._scene_key == ("train", 3)
