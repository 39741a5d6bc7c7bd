"""Scene edits: interpolation between two images' NeRFs and object insertion."""

import math

import numpy as np
import pytest
import torch
from helpers import cli, run
from nerfstudio.field_components.field_heads import FieldHeadNames

from vq3d_nerfstudio.geometry.cameras import orbit_cameras
from vq3d_nerfstudio.stage1.edits import ComposedField, Placement, composite, encode_image, interpolate, slerp
from vq3d_nerfstudio.stage1.quantizer import FSQConfig, VQConfig


@pytest.fixture(scope="module", params=["vq", "fsq"])
def model(synth_dir, request):
    """The tiny model with either quantizer: edits snap latents with the quantizer's own rounding."""
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny").pipeline
    config.datamanager.data = synth_dir
    config.datamanager.num_workers = 0
    config.model.quantizer = VQConfig() if request.param == "vq" else FSQConfig(levels=(8, 8, 8, 6, 5))
    torch.manual_seed(0)
    return config.setup(device="cpu", test_mode="val").eval().model


def photo(seed, size=64):
    return torch.from_numpy(np.random.default_rng(seed).random((size, size, 3), dtype=np.float32))


def canonical(model, size=16):
    return orbit_cameras([(0.0, 0.0)], size, 2.0, 50.0)


def test_slerp_by_hand():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    half = math.sqrt(0.5)
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([[half, half]]))
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # identical vectors: no division by sin(0)


@pytest.mark.parametrize("space", ["latent", "triplane", "codes"])
def test_interpolation_ends_reproduce_each_endpoint_render(model, space):
    a_img, b_img = photo(1), photo(2)
    a, b = encode_image(model, a_img), encode_image(model, b_img)
    camera = canonical(model)
    renders = {}
    for name, image in (("a", a_img), ("b", b_img)):
        model.set_scene_images(image)
        renders[name] = model.get_outputs_for_camera(camera)["rgb"]
    for t, name in ((0.0, "a"), (1.0, "b")):
        model.set_scene_planes(interpolate(model, a, b, t, space))
        torch.testing.assert_close(model.get_outputs_for_camera(camera)["rgb"], renders[name], rtol=1e-5, atol=1e-5)
    middle = interpolate(model, a, b, 0.5, space)
    assert not torch.allclose(middle, a.planes, atol=1e-4) and not torch.allclose(middle, b.planes, atol=1e-4)


def test_latent_interpolation_moves_smoothly_where_codes_jump(model):
    a, b = encode_image(model, photo(3)), encode_image(model, photo(4))
    ts = torch.linspace(0, 1, 21).tolist()
    steps = {}
    for space in ("latent", "codes"):
        planes = [interpolate(model, a, b, t, space) for t in ts]
        steps[space] = torch.stack([(q - p).abs().max() for p, q in zip(planes, planes[1:])])
    # the largest step of the snapped path is a jump; the continuous path spreads the change evenly
    assert steps["latent"].max() < steps["codes"].max()
    assert (steps["latent"] > 0).all()  # and it moves at every step


def test_composite_by_hand():
    red, blue = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    density, rgb = composite(torch.tensor([[1.0]]), red, torch.tensor([[3.0]]), blue)
    torch.testing.assert_close(density, torch.tensor([[4.0]]))
    torch.testing.assert_close(rgb, torch.tensor([[0.25, 0.0, 0.75]]))
    density, rgb = composite(torch.tensor([[2.0]]), red, torch.tensor([[0.0]]), blue)
    assert torch.equal(rgb, red) and torch.equal(density, torch.tensor([[2.0]]))
    density, rgb = composite(torch.tensor([[0.0]]), red, torch.tensor([[0.0]]), blue)  # empty space stays finite
    assert torch.isfinite(rgb).all()


def test_an_empty_object_leaves_the_scene_render_unchanged(model):
    scene, obj = encode_image(model, photo(5)), encode_image(model, photo(6))
    camera = canonical(model)
    model.set_scene_planes(scene.planes)
    alone = model.get_outputs_for_camera(camera)
    empty = Placement(obj.planes, (0.0, 0.0, 0.5), 0.5, mask=torch.zeros(16, 16, dtype=torch.bool))
    model.set_scene_planes(scene.planes, composition=empty)
    with_empty = model.get_outputs_for_camera(camera)
    for key in ("rgb", "depth", "accumulation"):
        assert torch.equal(with_empty[key], alone[key]), key
    model.set_scene_planes(scene.planes, composition=Placement(obj.planes, (0.0, 0.0, 0.5), 0.5))
    assert not torch.equal(model.get_outputs_for_camera(camera)["rgb"], alone["rgb"])


class AnalyticField:
    """Tri-plane value [0,0,0,0,0] picks the field: 0 = a blue wall filling z < -0.3, 1 = a red ball of
    radius 0.2 at the origin (both density 200)."""

    def query(self, positions, planes, batch_idx):
        kind = planes[batch_idx, 0, 0, 0, 0]
        wall = (positions[:, 2] < -0.3) & (kind == 0)
        ball = (positions.norm(dim=-1) < 0.2) & (kind == 1)
        density = 200.0 * (wall | ball).float()[:, None]
        rgb = torch.where(ball[:, None], torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
        return density, rgb

    def normals_at(self, positions, planes, batch_idx):
        return torch.zeros_like(positions)

    def __call__(self, ray_samples, planes, batch_idx):
        positions = ray_samples.frustums.get_positions()
        r, s = positions.shape[:2]
        d, c = self.query(positions.reshape(-1, 3), planes, batch_idx[:, None].expand(r, s).reshape(-1))
        return {FieldHeadNames.DENSITY: d.reshape(r, s, 1), FieldHeadNames.RGB: c.reshape(r, s, 3)}


def test_an_object_in_front_of_the_camera_occludes_what_is_behind_it(model):
    camera = canonical(model, size=9)
    rays = camera.generate_rays(0).flatten()
    scene_planes, object_planes = torch.zeros(1, 3, 1, 2, 2), torch.ones(1, 3, 1, 2, 2)
    batch = torch.zeros(len(rays), dtype=torch.long)
    alone = model.render_rays(rays, scene_planes, batch, keep_samples=False, field=AnalyticField())
    placed = Placement(object_planes, position=(0.0, 0.0, 1.0), scale=1.0)
    both = model.render_rays(rays, scene_planes, batch, keep_samples=False, field=ComposedField(AnalyticField(), placed))
    centre, corner = 4 * 9 + 4, 0
    # without the ball the centre ray sees the wall at z = -0.3 (2.3 from the camera), blue
    torch.testing.assert_close(alone["rgb"][centre], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)
    assert abs(float(alone["depth"][centre]) - 2.3) < 0.05
    # the ball at z = 1 (radius 0.2) hides the wall: red, at 2 - 1 - 0.2 = 0.8
    torch.testing.assert_close(both["rgb"][centre], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    assert abs(float(both["depth"][centre]) - 0.8) < 0.05
    # a ray that misses the ball still sees the wall
    torch.testing.assert_close(both["rgb"][corner], alone["rgb"][corner])
    # a box that leaves out the ball's lower half (y < 0 in its frame): the centre ray (y = 0) grazes
    # its equator; a ray through the lower half now sees the wall, one through the upper half the ball
    cut = Placement(object_planes, position=(0.0, 0.0, 1.0), scale=1.0, box=(-0.5, 0.0, -0.5, 0.5, 0.5, 0.5))
    halved = model.render_rays(rays, scene_planes, batch, keep_samples=False, field=ComposedField(AnalyticField(), cut))
    above, below = 3 * 9 + 4, 5 * 9 + 4  # one pixel row up / down from the centre (about 0.1 off axis at the ball)
    torch.testing.assert_close(halved["rgb"][above], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(halved["rgb"][below], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)


def test_interpolate_and_compose_commands(trained_run, tmp_path):
    import imageio.v3 as iio
    from PIL import Image
    from skimage import data

    config, env = trained_run
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.jpg")
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    out = tmp_path / "interp"
    run([cli("vq3d"), "interpolate", "--load-config", str(config), "--images", str(tmp_path / "astronaut.jpg"),
         str(tmp_path / "cat.jpg"), "--steps", "3", "--output-dir", str(out)], env)
    assert iio.imread(out / "interpolation.mp4", plugin="pyav").shape == (6, 64, 64, 3)
    assert iio.imread(out / "interpolation_strip.png").shape == (64, 5 * 64, 3)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "comp"
    run([cli("vq3d"), "compose", "--load-config", str(config), "--scene", str(tmp_path / "astronaut.jpg"), "--object",
         str(tmp_path / "cat.jpg"), "--object-mask", str(tmp_path / "mask.png"), "--num-frames", "4", "--output-dir", str(out)], env)
    assert iio.imread(out / "composite_orbit.mp4", plugin="pyav").shape == (4, 64, 64, 3)
    assert iio.imread(out / "composite_views.png").shape == (64, 6 * 64, 3)


def test_the_interpolate_command_offers_exactly_the_interpolation_spaces():
    from typing import get_args, get_type_hints

    from vq3d_nerfstudio.scripts.interpolate import Interpolate
    from vq3d_nerfstudio.stage1.edits import InterpolationSpace

    assert get_args(get_type_hints(Interpolate)["space"]) == get_args(InterpolationSpace)
