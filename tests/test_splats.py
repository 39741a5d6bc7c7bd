"""Gaussian splats from a NeRF: the 3DGS .ply layout, the pure-torch rasterizer, the initialisation
from rendering weights, the refinement loop, and `vq3d export-splats` end to end."""

import math

import helpers
import numpy as np
import pytest
import torch
from helpers import cli, run
from nerfstudio.field_components.field_heads import FieldHeadNames
from plyfile import PlyData

from vq3d_nerfstudio.export.gaussians import SH_C0, Gaussians
from vq3d_nerfstudio.export.ply import read_splat_ply, write_splat_ply
from vq3d_nerfstudio.export.rasterize import (
    cameras_to_viewmats,
    covariances,
    project_gaussians,
    rasterize,
    render_gaussians,
)
from vq3d_nerfstudio.export.refine import refine_gaussians
from vq3d_nerfstudio.export.splats import export_cameras, export_poses, gaussians_from_samples, nerf_samples, view_cells
from vq3d_nerfstudio.geometry.cameras import orbit_cameras

STANDARD_NAMES = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(45)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def random_gaussians(num, seed=0, depth=(1.5, 3.0)):
    """Splats in front of an identity OpenCV camera (z forward)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(num, 3, generator=gen) - 0.5
    means[:, 2] = depth[0] + (depth[1] - depth[0]) * torch.rand(num, generator=gen)
    return Gaussians(
        means=means,
        scales=0.02 + 0.08 * torch.rand(num, 3, generator=gen),
        quats=torch.randn(num, 4, generator=gen),
        opacities=0.05 + 0.9 * torch.rand(num, generator=gen),
        colors=torch.rand(num, 3, generator=gen),
    )


def pinhole(focal, width, height, cx=None, cy=None):
    """One identity OpenCV camera: ``([1, 4, 4]`` viewmat, ``[1, 3, 3]`` K)."""
    K = torch.tensor([[focal, 0.0, width / 2 if cx is None else cx], [0.0, focal, height / 2 if cy is None else cy], [0, 0, 1]])
    return torch.eye(4)[None], K[None]


def one(mean, sigma, opacity, color):
    return Gaussians(
        means=torch.tensor([mean], dtype=torch.float32),
        scales=torch.full((1, 3), float(sigma)),
        quats=torch.tensor([[1.0, 0, 0, 0]]),
        opacities=torch.tensor([float(opacity)]),
        colors=torch.tensor([color], dtype=torch.float32),
    )


def cat(*gs):
    return Gaussians(*(torch.cat(parts) for parts in zip(*((g.means, g.scales, g.quats, g.opacities, g.colors) for g in gs))))


# ---- the .ply file -----------------------------------------------------------------------------
def test_ply_has_the_standard_3dgs_layout_and_round_trips(tmp_path):
    g = random_gaussians(57)
    path = tmp_path / "splats.ply"
    write_splat_ply(path, g)
    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    vertex = ply["vertex"]
    assert vertex.count == 57
    assert [p.name for p in vertex.properties] == STANDARD_NAMES  # 62: 45 f_rest
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in STANDARD_NAMES)
    assert not ply.text and ply.byte_order == "<"
    back = read_splat_ply(path)
    assert torch.allclose(back.means, g.means, atol=1e-6)
    assert torch.allclose(back.scales, g.scales, rtol=1e-5)
    assert torch.allclose(back.quats, torch.nn.functional.normalize(g.quats, dim=-1), atol=1e-6)
    assert torch.allclose(back.opacities, g.opacities, atol=1e-6)
    assert torch.allclose(back.colors, g.colors, atol=1e-6)


def test_ply_encodings_by_hand(tmp_path):
    g = Gaussians(
        means=torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]),
        scales=torch.tensor([[1.0, 1.0, 1.0], [math.e, 1.0, 1.0]]),
        quats=torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]),
        opacities=torch.tensor([0.5, 1 / (1 + math.exp(-2.0))]),
        colors=torch.tensor([[0.5, 0.5, 0.5], [0.5 + SH_C0, 0.5 - SH_C0, 0.5]]),
    )
    path = tmp_path / "hand.ply"
    write_splat_ply(path, g)
    v = PlyData.read(str(path))["vertex"].data
    row0 = {name: float(v[name][0]) for name in STANDARD_NAMES}
    assert (row0["x"], row0["y"], row0["z"]) == (1.0, 2.0, 3.0)
    assert row0["f_dc_0"] == pytest.approx(0.0, abs=1e-7)  # rgb 0.5 -> f_dc 0
    assert row0["opacity"] == pytest.approx(0.0, abs=1e-7)  # opacity 0.5 -> logit 0
    assert row0["scale_0"] == pytest.approx(0.0, abs=1e-7)  # scale 1 -> log 0
    assert [row0[f"rot_{i}"] for i in range(4)] == [1.0, 0.0, 0.0, 0.0]  # normalised, w first
    assert all(row0[n] == 0.0 for n in STANDARD_NAMES if n.startswith(("f_rest", "nx", "ny", "nz")))
    assert [float(v[f"f_dc_{i}"][1]) for i in range(3)] == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)
    assert float(v["opacity"][1]) == pytest.approx(2.0, abs=1e-5)
    assert float(v["scale_0"][1]) == pytest.approx(1.0, abs=1e-6)
    assert [float(v[f"rot_{i}"][1]) for i in range(4)] == [0.0, 0.0, 0.0, 1.0]


# ---- the rasterizer ----------------------------------------------------------------------------
def test_projection_matches_gsplats_torch_reference_forward_and_backward():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    g = random_gaussians(40, seed=1)
    cameras = orbit_cameras([(0.0, 0.0), (25.0, -10.0)], 24, 2.0, 50.0)
    viewmats, Ks = cameras_to_viewmats(cameras)
    g.means = (g.means - torch.tensor([0.0, 0.0, 2.0])).requires_grad_(True)  # around the origin: both cameras see them
    g.scales.requires_grad_(True)
    g.quats.requires_grad_(True)
    weights = torch.randn(2, 40, 3)

    means2d, covars2d, depths = project_gaussians(g.means, covariances(g.quats, g.scales), viewmats, Ks, 24, 24)
    det = covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] ** 2
    conics = torch.stack([covars2d[..., 1, 1] / det, -covars2d[..., 0, 1] / det, covars2d[..., 0, 0] / det], -1)
    ours = (means2d.sum(-1) * weights[..., 0] + (conics * weights).sum(-1)).sum()
    grads = torch.autograd.grad(ours, [g.means, g.scales, g.quats])

    covars, _ = _quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    _, ref_means2d, ref_depths, ref_conics, _ = _fully_fused_projection(g.means, covars, viewmats, Ks, 24, 24)
    ref = (ref_means2d.sum(-1) * weights[..., 0] + (ref_conics * weights).sum(-1)).sum()
    ref_grads = torch.autograd.grad(ref, [g.means, g.scales, g.quats])
    assert torch.allclose(means2d, ref_means2d, atol=1e-4)
    assert torch.allclose(depths, ref_depths, atol=1e-6)
    assert torch.allclose(conics, ref_conics, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_cameras_to_viewmats_sends_a_rays_points_to_its_pixel_centre():
    cameras = orbit_cameras([(20.0, 10.0)], 16, 2.0, 50.0)
    rays = cameras.generate_rays(camera_indices=0)  # (H, W) of nerfstudio's OpenGL rays
    points = rays.origins[5, 11] + rays.directions[5, 11] * 1.7  # pixel row 5, column 11
    viewmats, Ks = cameras_to_viewmats(cameras)
    means2d, _, depths = project_gaussians(points[None], torch.eye(3)[None] * 1e-4, viewmats, Ks, 16, 16)
    assert torch.allclose(means2d[0, 0], torch.tensor([11.5, 5.5]), atol=1e-4)
    assert depths[0, 0] > 0  # OpenCV: in front of the camera is +z


def test_one_splat_by_hand():
    # focal 10 px, sigma 0.2 at depth 2: projected variance (10 * 0.2 / 2)^2 + 0.3 = 1.3 px^2
    viewmat, K = pinhole(10.0, 9, 9, cx=4.5, cy=4.5)  # pixel (4, 4) is centred on the axis
    rgb, alpha = render_gaussians(one([0.0, 0.0, 2.0], 0.2, 0.8, [1.0, 0.5, 0.0]), viewmat, K, 9, 9)
    assert alpha[0, 4, 4, 0] == pytest.approx(0.8, abs=1e-6)  # alpha = opacity at the centre
    assert rgb[0, 4, 4].tolist() == pytest.approx([0.8, 0.4, 0.0], abs=1e-6)
    assert alpha[0, 4, 5, 0] == pytest.approx(0.8 * math.exp(-0.5 / 1.3), abs=1e-6)  # one pixel right
    assert alpha[0, 2, 4, 0] == pytest.approx(0.8 * math.exp(-0.5 * 4 / 1.3), abs=1e-6)  # two pixels up
    assert alpha[0, 0, 0, 0] == 0.0  # 0.8 exp(-0.5 * 32 / 1.3) < 1/255: skipped
    # a background fills what the splat leaves
    g = one([0.0, 0.0, 2.0], 0.2, 0.8, [1.0, 0.5, 0.0])
    rgb_bg, _ = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmat, K, 9, 9,
                          backgrounds=torch.tensor([[0.0, 0.0, 1.0]]))
    assert rgb_bg[0, 4, 4].tolist() == pytest.approx([0.8, 0.4, 0.2], abs=1e-6)


def test_two_splats_composite_front_to_back():
    viewmat, K = pinhole(10.0, 9, 9, cx=4.5, cy=4.5)
    red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    rgb, alpha = render_gaussians(cat(one([0, 0, 3.0], 0.2, 0.5, green), one([0, 0, 2.0], 0.2, 0.6, red)), viewmat, K, 9, 9)
    assert rgb[0, 4, 4].tolist() == pytest.approx([0.6, 0.4 * 0.5, 0.0], abs=1e-6)  # red in front
    assert alpha[0, 4, 4, 0] == pytest.approx(1 - 0.4 * 0.5, abs=1e-6)
    rgb, _ = render_gaussians(cat(one([0, 0, 1.5], 0.2, 0.5, green), one([0, 0, 2.0], 0.2, 0.6, red)), viewmat, K, 9, 9)
    assert rgb[0, 4, 4].tolist() == pytest.approx([0.5 * 0.6, 0.5, 0.0], abs=1e-6)  # now green is in front


def test_a_pixel_stops_before_its_transmittance_falls_to_1e_4_like_gsplat():
    viewmat, K = pinhole(10.0, 9, 9, cx=4.5, cy=4.5)
    g = cat(*(one([0, 0, z], 0.2, 1.0, c) for z, c in [(2.0, [1.0, 0, 0]), (2.5, [0, 1.0, 0]), (3.0, [0, 0, 1.0])]))
    rgb, alpha = render_gaussians(g, viewmat, K, 9, 9)
    # alpha is clamped to 0.999: after the first T = 1e-3; the second would leave 1e-6 <= 1e-4, so
    # compositing stops there and the third is skipped too
    assert rgb[0, 4, 4].tolist() == pytest.approx([0.999, 0.0, 0.0], abs=1e-6)
    assert alpha[0, 4, 4, 0] == pytest.approx(0.999, abs=1e-6)


def reference_render(g, viewmat, K, width, height):
    """gsplat's per-pixel compositing loop written out literally (no culling but the 1/255 rule)."""
    means2d, covars2d, depths = project_gaussians(g.means, covariances(g.quats, g.scales), viewmat, K, width, height)
    order = torch.argsort(depths[0])
    image = torch.zeros(height, width, 3, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            T, color = torch.ones((), dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            for k in order.tolist():
                if depths[0, k] <= 0.01:
                    continue
                d = torch.tensor([j + 0.5, i + 0.5]) - means2d[0, k]
                power = 0.5 * d @ torch.linalg.inv(covars2d[0, k]) @ d
                alpha = torch.clamp_max(g.opacities[k] * torch.exp(-power), 0.999)
                if power < 0 or alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                color = color + alpha * T * g.colors[k]
                T = T * (1 - alpha)
            image[i, j] = color
    return image


def test_renderer_matches_a_literal_per_pixel_loop_forward_and_backward():
    g = random_gaussians(25, seed=3, depth=(1.0, 2.0))
    g.opacities = g.opacities.clamp_max(0.9)
    g.opacities[:4] = 0.999  # some pixels reach the transmittance stop
    for t in (g.means, g.scales, g.colors, g.opacities):
        t.requires_grad_(True)
    viewmat, K = pinhole(14.0, 12, 10)
    weights = torch.randn(10, 12, 3)
    ref = reference_render(g, viewmat, K, 12, 10)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [g.means, g.scales, g.colors, g.opacities])
    for max_pairs in (1 << 22, 1):  # one chunk; and a chunk per splat (transmittance carried across)
        rgb, _ = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmat, K, 12, 10, max_pairs=max_pairs)
        assert torch.allclose(rgb[0].double(), ref, atol=1e-5)
        grads = torch.autograd.grad((rgb[0] * weights).sum(), [g.means, g.scales, g.colors, g.opacities])
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-4)


def test_refinement_brings_splats_closer_to_their_targets():
    truth = random_gaussians(30, seed=5, depth=(-0.5, 0.5))  # around the pivot
    viewmats, Ks = cameras_to_viewmats(orbit_cameras([(0.0, 0.0), (15.0, 0.0)], 16, 2.0, 50.0))
    targets, _ = render_gaussians(truth, viewmats, Ks, 16, 16)
    start = random_gaussians(30, seed=5, depth=(-0.5, 0.5))
    start.colors = torch.full_like(start.colors, 0.5)
    start.opacities = torch.full_like(start.opacities, 0.3)
    losses = []
    refined = refine_gaussians(start, targets, viewmats, Ks, steps=40, rasterize_fn=rasterize,
                               colors_lr=0.05, on_step=lambda step, loss: losses.append(loss))
    final, _ = render_gaussians(refined, viewmats, Ks, 16, 16)
    assert len(losses) == 40
    assert (final - targets).abs().mean() < 0.5 * (losses[0] + losses[1]) / 2
    assert refined.means.grad is None and not refined.means.requires_grad  # plain tensors come back


# ---- initialisation from the NeRF ------------------------------------------------------------
SPHERE_RADIUS, SPHERE_RGB, SKY_RGB = 0.5, (0.9, 0.3, 0.1), (0.2, 0.4, 0.9)


class SphereField(torch.nn.Module):
    """A field whose density is known: an opaque orange ball of radius 0.5 at the origin, a blue
    sky everywhere else (no density; the model's last sample paints it)."""

    scene_scale = 1.5

    def density_at(self, positions, planes=None, batch_idx=None):
        return 200.0 * (positions.norm(dim=-1, keepdim=True) < SPHERE_RADIUS).float()

    def forward(self, ray_samples, planes, batch_idx):
        positions = ray_samples.frustums.get_positions()
        density = self.density_at(positions)
        rgb = torch.where(density > 0, torch.tensor(SPHERE_RGB), torch.tensor(SKY_RGB))
        return {FieldHeadNames.DENSITY: density, FieldHeadNames.RGB: rgb}


def tiny_model(size=24):
    model = helpers.tiny_model(size, triplane_resolution=12, samples_per_ray=24, num_train_data=1, use_normals_output=False).eval()
    model.set_scene_images(torch.rand(size, size, 3))
    return model


def test_samples_are_the_ones_render_rays_composites():
    model = tiny_model()
    planes = model.current_planes()
    rays = orbit_cameras([(10.0, 5.0)], 24, 2.0, 50.0).generate_rays(camera_indices=0, keep_shape=False)[:200]
    samples = nerf_samples(model, rays, planes)
    batch_idx = torch.zeros(200, dtype=torch.long)
    with torch.no_grad():
        out = model.render_rays(rays, planes, batch_idx, keep_samples=True)
    assert torch.allclose(samples.weights[:, :-1], out["weights_fine"][:, :-1, 0], atol=1e-6)
    assert torch.allclose(samples.weights.sum(-1), torch.ones(200), atol=1e-5)  # the last sample takes the rest
    assert torch.allclose((samples.weights[..., None] * samples.rgb).sum(1), out["rgb"], atol=1e-5)
    # the distances are the ones render_rays turns into disparity (z = t / directions_norm)
    assert torch.allclose(rays.metadata["directions_norm"] / samples.distances, out["disp_fine"][..., 0], rtol=1e-5)
    expected = rays.origins[:, None] + rays.directions[:, None] * samples.distances[..., None]
    assert torch.allclose(samples.positions, expected, atol=1e-4)


def test_splats_lie_where_the_nerf_has_density_and_render_like_it():
    model = tiny_model()
    model.field = SphereField()
    planes = model.current_planes()
    cameras = export_cameras(export_poses(4, 20.0, 8.0), 24, 2.0, 50.0, margin_deg=10.0)
    assert int(cameras.width[0]) == 36  # 24 px over 50 degrees -> 36 px over 70 degrees
    samples = [nerf_samples(model, cameras.generate_rays(camera_indices=i, keep_shape=False), planes) for i in range(4)]
    g = gaussians_from_samples(samples, num_gaussians=1500, camera_distance=2.0, background_radius=20.0)
    assert 0 < len(g) <= 1500
    radius = g.means.norm(dim=-1)
    ball = radius < 10
    sky = ~ball
    assert ball.sum() > 100 and sky.sum() > 100
    # on the ball's surface, the side facing the cameras; the sky pulled in to the background radius
    cell = 2 * g.scales[ball, 0]  # scale_mult 0.5: a splat's sigma is half its cell
    assert ((radius[ball] - SPHERE_RADIUS).abs() < cell).float().mean() > 0.95  # within a cell of the surface
    assert cell.max() < 0.2
    assert (g.means[ball, 2] > 0).all()
    assert ((radius[sky] - 20.0).abs() < 2 * g.scales[sky, 0]).all()  # (cell averages sit a hair inside)
    assert torch.allclose(g.colors[ball], torch.tensor(SPHERE_RGB).expand(int(ball.sum()), 3), atol=0.02)
    assert torch.allclose(g.colors[sky], torch.tensor(SKY_RGB).expand(int(sky.sum()), 3), atol=1e-5)
    assert g.opacities[ball].median() > 0.8  # an opaque surface gives opaque splats
    # density at the splats vs at random points of the region the cameras frame
    random_points = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    at_splats = model.field.density_at(g.means[ball]).gt(0).float().mean()
    assert at_splats > 0.5 and model.field.density_at(random_points).gt(0).float().mean() < 0.1
    # and a splat render from views at and between the export cameras shows the same ball, no holes
    for yaw in (0.0, 10.0):
        view = orbit_cameras([(yaw, 0.0)], 24, 2.0, 50.0)
        nerf = model.get_outputs_for_camera(view)["rgb"]
        rgb, alpha = render_gaussians(g, *cameras_to_viewmats(view), 24, 24)
        assert alpha.min() > 0.9

        def ball_mask(image):
            return (image - torch.tensor(SPHERE_RGB)).norm(dim=-1) < (image - torch.tensor(SKY_RGB)).norm(dim=-1)

        a, b = ball_mask(rgb[0]), ball_mask(nerf)
        assert b.sum() > 100 and (a & b).sum() / (a | b).sum() > 0.6  # isotropic splats bloat the rim a little


def test_view_cells_widen_with_depth_like_pixels_and_deepen_with_its_square():
    angle = 0.01
    # the canonical camera sits at z = 2: these points are 2, 2, 2 and 4 deep
    points = torch.tensor([[0.001, 0.001, 0.0], [0.019, 0.001, 0.0], [0.021, 0.001, 0.0], [0.001, 0.001, -2.0]])
    keys, widths = view_cells(points, 2.0, angle, depth_ratio=6.0)
    assert widths.tolist() == pytest.approx([0.02, 0.02, 0.02, 0.04])  # depth * angle
    assert keys[0] == keys[1] != keys[2]  # x / z: 0.0005 and 0.0095 share a bin, 0.0105 is the next
    # disparity bins 6 * 0.01 / 2 = 0.03 wide: bin 16 holds depths 1.961..2.083 (0.12 = 6 widths)
    near, far = view_cells(torch.tensor([[0.001, 0.001, 0.03], [0.001, 0.001, -0.1]]), 2.0, angle, 6.0)[0]
    assert keys[0] == near != far


# ---- the command ---------------------------------------------------------------------------
def test_vq3d_export_splats_end_to_end(trained_run, tmp_path):
    config, env = trained_run
    output = tmp_path / "out" / "splats.ply"
    result = run([cli("vq3d"), "export-splats", "--load-config", str(config), "--output", str(output),
                  "--num-gaussians", "2000", "--num-cameras", "3", "--ray-resolution", "32",
                  "--report-resolution", "32", "--timing-repeats", "1"], env)
    vertex = PlyData.read(str(output))["vertex"]
    assert 0 < vertex.count <= 2000
    assert [p.name for p in vertex.properties] == STANDARD_NAMES
    assert np.isfinite(np.stack([vertex.data[n] for n in STANDARD_NAMES])).all()
    assert "PSNR (dB)" in result.stdout and "input view" in result.stdout and "yaw 15 deg" in result.stdout
    assert "skipping the gsplat refinement" in result.stdout or "Refined" in result.stdout
    import imageio.v3 as iio

    picture = iio.imread(tmp_path / "out" / "splats_compare.png")
    assert picture.shape == (2 * 32 * 8, 2 * 32 * 8, 3)  # a row per view, NeRF | splats, upscaled to 256 px
