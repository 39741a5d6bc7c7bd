"""The renderer's fast paths against their references: the fine pass reusing the coarse evaluations
(forward and backward, training and eval mode) and colour only where a sample is seen."""

from types import SimpleNamespace

import helpers
import pytest
import torch

from vq3d_nerfstudio.geometry.cameras import orbit_cameras
from vq3d_nerfstudio.stage1.field import PointField
from vq3d_nerfstudio.stage1.renderer import PiecewiseLinDispSampler, coarse_duplicates, pdf_spacing

SIZE = 16
KEYS = ("rgb", "rgb_coarse", "accumulation", "depth", "disparity", "weights_fine", "weights_coarse")


def spacing(*edges_per_ray):
    """Ray samples with these spacing edges (one list per ray): all :func:`coarse_duplicates` reads."""
    edges = torch.tensor(edges_per_ray, dtype=torch.float32)
    return SimpleNamespace(spacing_starts=edges[:, :-1, None], spacing_ends=edges[:, 1:, None])


def test_duplicates_are_the_fine_intervals_whose_ends_are_consecutive_coarse_edges():
    coarse = spacing([0.0, 0.25, 0.5, 0.75, 1.0])
    # new edges 0.1 (splits the first interval) and 0.5 (equal to a coarse edge: a zero-width interval)
    fine = spacing([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 1.0])
    duplicate, index = coarse_duplicates(coarse, fine)
    assert duplicate.tolist() == [[False, False, True, False, True, True]]
    assert index[duplicate].tolist() == [1, 2, 3]


class CountingField(PointField):
    """The model's field, counting the points its point query evaluates."""

    def __init__(self, field):
        self.inner, self.points = field, 0

    def query(self, positions, planes, batch_idx):
        self.points += positions.shape[0]
        return self.inner.query(positions, planes, batch_idx)


def render_with_grads(model, reuse_coarse, seed):
    """Render 64 rays of two images' NeRFs with gradients; the loss's gradients w.r.t. the field's
    parameters and the planes."""
    model.zero_grad()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    quantized, _, _ = model.encode(images)
    planes = model.decoder(quantized).detach().requires_grad_(True)
    cameras = orbit_cameras([(0.0, 0.0), (20.0, 5.0)], SIZE, 2.0, 50.0)
    rays = cameras.generate_rays(camera_indices=torch.tensor([[0], [1]]).repeat_interleave(32, 0),
                                 coords=torch.rand(64, 2, generator=torch.Generator().manual_seed(2)) * SIZE)
    batch_idx = torch.arange(2).repeat_interleave(32)
    torch.manual_seed(seed)  # the same stratified samples in training mode
    out = model.renderer.render(rays, model.field, planes, batch_idx, keep_samples=True, reuse_coarse=reuse_coarse)
    loss = (out["rgb"] - 0.5).square().sum() + 0.1 * out["rgb_coarse"].sum() + out["depth"].sum() + out["disparity"].sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.field.named_parameters()}
    grads["planes"] = planes.grad.clone()
    return out, grads


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_reusing_coarse_evaluations_equals_evaluating_every_fine_sample(training):
    model = helpers.tiny_model(SIZE, samples_per_ray=12).train(training)
    reused, reused_grads = render_with_grads(model, True, seed=3)
    every, every_grads = render_with_grads(model, False, seed=3)
    for key in KEYS:
        torch.testing.assert_close(reused[key], every[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in every_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(reused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_reusing_coarse_evaluations_evaluates_fewer_points():
    model = helpers.tiny_model(SIZE, samples_per_ray=12).eval()
    model.set_scene_images(torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(4)))
    planes = model.current_planes()
    rays = orbit_cameras([(10.0, 0.0)], SIZE, 2.0, 50.0).generate_rays(camera_indices=0).flatten()
    field = CountingField(model.field)
    with torch.no_grad():
        passes = model.renderer.sample(rays, field, planes, torch.zeros(len(rays), dtype=torch.long))
    duplicate, _ = coarse_duplicates(passes.coarse, passes.fine)
    coarse_count, fine_count = passes.coarse.spacing_starts.shape[1], passes.fine.spacing_starts.shape[1]
    assert field.points == len(rays) * (coarse_count + fine_count) - int(duplicate.sum())
    assert duplicate.any()


def test_colour_only_where_seen_stays_within_its_bound():
    """A sample's colour is left out only where its weight is <= min_weight: the composite moves by at
    most (S - 1) * min_weight; everything else is unchanged."""
    model = helpers.tiny_model(SIZE, samples_per_ray=12).eval()
    model.set_scene_images(torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5)))
    planes = model.current_planes()
    rays = orbit_cameras([(15.0, 5.0)], SIZE, 2.0, 50.0).generate_rays(camera_indices=0).flatten()
    batch_idx = torch.zeros(len(rays), dtype=torch.long)
    min_weight = 1e-3
    with torch.no_grad():
        every = model.renderer.render(rays, model.field, planes, batch_idx, keep_samples=True, reuse_coarse=False)
        seen = model.renderer.render(rays, model.field, planes, batch_idx, keep_samples=True, colour_min_weight=min_weight)
    for key in ("accumulation", "depth", "disparity", "weights_fine", "weights_coarse", "disp_fine", "disp_coarse"):
        torch.testing.assert_close(seen[key], every[key], rtol=1e-5, atol=1e-6, msg=key)
    fine_samples = every["weights_fine"].shape[1]
    assert (seen["rgb"] - every["rgb"]).abs().max() <= (fine_samples - 1) * min_weight + 1e-6
    assert (every["weights_fine"] <= min_weight).any()  # some colour was left out


def test_pdf_spacing_is_nerfstudios_pdf_sampler_outside_training():
    """The density-first path's plain-tensor resampling gives nerfstudio's PDFSampler edges (eval mode,
    original bins included), for peaked, flat and all-zero weights and per-ray near/far planes."""
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.model_components.ray_samplers import PDFSampler

    generator = torch.Generator().manual_seed(6)
    num_rays, num_coarse, num_fine = 5, 8, 6
    bundle = RayBundle(
        origins=torch.zeros(num_rays, 3), directions=torch.nn.functional.normalize(torch.randn(num_rays, 3, generator=generator), dim=-1),
        pixel_area=torch.ones(num_rays, 1), nears=torch.linspace(0.1, 0.5, num_rays)[:, None], fars=torch.linspace(5.0, 50.0, num_rays)[:, None],
    )
    coarse = PiecewiseLinDispSampler(num_coarse, 1.5).eval()(bundle)
    weights = torch.rand(num_rays, num_coarse, 1, generator=generator) ** 8  # peaked
    weights[1] = 1.0 / num_coarse  # flat
    weights[2] = 0.0  # nothing seen: the padding alone decides
    sampler = PDFSampler(num_samples=num_fine, include_original=True).eval()
    expected = sampler(bundle, coarse, weights)
    edges = torch.cat([coarse.spacing_starts[..., 0], coarse.spacing_ends[:, -1:, 0]], dim=-1)
    got = pdf_spacing(edges, weights[..., 0], num_fine, sampler.histogram_padding)
    assert got.shape == (num_rays, num_coarse + num_fine + 2)
    torch.testing.assert_close(got[:, :-1], expected.spacing_starts[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1:], expected.spacing_ends[..., 0], rtol=0, atol=0)


class PointCounter(PointField):
    """The model's field, counting the points asked for density and for colour apart."""

    def __init__(self, field):
        self.inner, self.density_points, self.colour_points = field, 0, 0

    def query(self, positions, planes, batch_idx):
        return self.inner.query(positions, planes, batch_idx)

    def density_at(self, positions, planes, batch_idx):
        self.density_points += positions.shape[0]
        return self.inner.density_at(positions, planes, batch_idx)

    def rgb_at(self, positions, planes, batch_idx):
        self.colour_points += positions.shape[0]
        return self.inner.rgb_at(positions, planes, batch_idx)


def test_density_first_colours_the_coarse_pass_only_when_asked():
    """Without coarse colours the density-first path composites the same outputs from the same
    densities, asks the field for fewer colours and none in the coarse pass, and returns rgb_coarse black."""
    model = helpers.tiny_model(SIZE, samples_per_ray=12).eval()
    model.set_scene_images(torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(7)))
    planes = model.current_planes()
    rays = orbit_cameras([(10.0, 0.0)], SIZE, 2.0, 50.0).generate_rays(camera_indices=0).flatten()
    batch_idx = torch.zeros(len(rays), dtype=torch.long)
    counted = PointCounter(model.field)
    with torch.no_grad():
        both = model.renderer.render(rays, counted, planes, batch_idx, keep_samples=True, colour_min_weight=1e-3)
        densities, colours = counted.density_points, counted.colour_points
        counted.density_points = counted.colour_points = 0
        fine_only = model.renderer.render(rays, counted, planes, batch_idx, keep_samples=True, colour_min_weight=1e-3,
                                          coarse_colour=False)
    seen_fine = int((both["weights_fine"][..., 0] > 1e-3).sum() + (both["weights_fine"][:, -1, 0] <= 1e-3).sum())
    seen_coarse = int((both["weights_coarse"][..., 0] > 1e-3).sum() + (both["weights_coarse"][:, -1, 0] <= 1e-3).sum())
    assert colours == seen_fine + seen_coarse and counted.colour_points == seen_fine  # seen samples and each ray's last
    assert counted.density_points == densities
    assert torch.equal(fine_only["rgb_coarse"], torch.zeros(len(rays), 3))
    for key in both:
        if key != "rgb_coarse":
            assert torch.equal(fine_only[key], both[key]), key
