"""The baked inference field: the grid's resolution and conventions against analytic fields, the
field at the grid's nodes, the shipped model's baked renders against its exact ones, and where the
model uses it."""

import dataclasses
import math

import helpers
import pytest
import torch

from vq3d_nerfstudio.geometry.cameras import orbit_cameras
from vq3d_nerfstudio.model_index import SHIPPED_DIR
from vq3d_nerfstudio.stage1.baked import COLOUR_MIN_WEIGHT, BakedField, bake_resolution, grid_coordinates, sample_volume
from vq3d_nerfstudio.stage1.edits import ComposedField, Placement
from vq3d_nerfstudio.stage1.field import TriplaneField, density_from_logit
from vq3d_nerfstudio.stage1.triplane import PlaneLayout, frustum_points

LAYOUT = PlaneLayout(inner_resolution=8, margin=1)  # 10 texels a side


def test_resolution_puts_every_texel_on_a_node_and_resolves_the_highest_depth_frequency():
    layout = PlaneLayout(inner_resolution=64, margin=3)  # 70 texels: 69 intervals
    assert bake_resolution(layout, 0) == (139, 139, 139)  # 2 nodes per interval
    assert bake_resolution(layout, 0, nodes_per_texel=1) == (70, 70, 70)
    # sin(8 pi W): 8 periods over [-1, 1], 16 nodes each = 128 intervals -> 2 texel intervals each
    assert bake_resolution(layout, 4, nodes_per_texel=1) == (139, 70, 70)
    # sin(32 pi W): 32 periods -> 512 intervals -> 8 texel intervals each
    assert bake_resolution(layout, 6, nodes_per_texel=1) == (8 * 69 + 1, 70, 70)


class TrilinearField:
    """An analytic field on plane coordinates, in the span of 1, U, V, W, UV, UW, VW, UVW (which
    trilinear interpolation reproduces exactly), different along each axis."""

    layout = LAYOUT
    num_depth_frequencies = 0

    def query_coords(self, coords, planes, batch_idx):
        u, v, w = coords.unbind(-1)
        logit = 1.0 + u - 2.0 * v + 0.5 * w + 3.0 * u * v * w
        rgb = torch.stack([(u + 1) / 2, (v + 1) / 2, (w + 1) * (u + 1) / 4], -1)
        return logit[:, None], rgb

    def query(self, points, planes, batch_idx):
        logit, rgb = self.query_coords(self.layout(points), planes, batch_idx)
        return density_from_logit(logit), rgb


def random_points(num, seed=0):
    """World points in and around the canonical frustum: near side, slab and far field."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.exp(torch.rand(num, generator=g) * 5 - 1.5)  # 0.22 .. 33 from the camera
    xy = (torch.rand(num, 2, generator=g) * 2 - 1) * depth[:, None] * 0.6
    return torch.cat([xy, (2.0 - depth)[:, None]], -1)


@pytest.mark.parametrize("resolution", [(5, 4, 3), (9, 10, 10)])
def test_a_trilinear_field_is_reproduced_everywhere(resolution):
    """Any grid reproduces a trilinear function: this pins the axis order (U -> W axis of the volume,
    W -> D), align_corners and the logit's activation."""
    field = TrilinearField()
    baked = BakedField.bake(field, torch.zeros(1, 3, 1, 10, 10), resolution)
    assert baked.resolution == resolution
    points = random_points(2000)
    zeros = torch.zeros(2000, dtype=torch.long)
    density, rgb = baked.query(points, None, zeros)
    expected_density, expected_rgb = field.query(points, None, zeros)
    torch.testing.assert_close(density, expected_density, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rgb, expected_rgb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(baked.density_at(points, None, zeros), expected_density, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(baked.rgb_at(points, None, zeros), expected_rgb, rtol=1e-5, atol=1e-6)


def test_outside_the_cube_the_lookup_takes_the_border_value():
    volume = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    inside = sample_volume(volume, torch.tensor([[1.0, -1.0, 1.0], [-1.0, 0.0, -1.0]]))
    outside = sample_volume(volume, torch.tensor([[1.5, -1.2, 3.0], [-1.01, 0.0, -7.0]]))
    assert torch.equal(outside, inside)
    assert inside[:, 0].tolist() == [3 + 0 * 4 + 1 * 12, 0 + 1 * 4 + 0 * 12]  # (U, V, W) -> column, row, slice


def test_normals_of_a_baked_field_are_its_density_gradient():
    """logit = 4 W; in the pivot slab W = z / 2 (depth_inner 0.5 over a half-width of 1), so the density
    grows towards +z and the normal, the negated gradient, is -z."""

    class Ramp(TrilinearField):
        def query_coords(self, coords, planes, batch_idx):
            return 4.0 * coords[:, 2:3], torch.zeros(coords.shape[0], 3)

    baked = BakedField.bake(Ramp(), torch.zeros(1, 3, 1, 10, 10), (9, 3, 3))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.5], [-0.3, 0.1, -0.6]])
    with torch.no_grad():  # normals work under no_grad, as in inference
        normals = baked.normals_at(points, torch.zeros(1, 3, 1, 10, 10), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(normals, torch.tensor([[0.0, 0.0, -1.0]]).expand(3, 3), rtol=0, atol=1e-5)


def test_at_the_grid_nodes_the_bake_is_the_field():
    torch.manual_seed(0)
    field = TriplaneField(triplane_channels=4, hidden_dim=16, layout=LAYOUT, num_depth_frequencies=2)
    planes = torch.randn(1, 3, 4, LAYOUT.resolution, LAYOUT.resolution)
    resolution = bake_resolution(LAYOUT, 2, nodes_per_texel=2)  # nodes between the texels too
    baked = BakedField.bake(field, planes, resolution)
    coords = grid_coordinates(*resolution).reshape(-1, 3)
    zeros = torch.zeros(coords.shape[0], dtype=torch.long)
    with torch.no_grad():
        logit, rgb = field.query_coords(coords, planes, zeros)
    torch.testing.assert_close(sample_volume(baked.logit, coords), logit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_volume(baked.rgb, coords), rgb, rtol=1e-5, atol=1e-5)
    # the same through world points (interior nodes: W = +-1 is at the camera plane and at infinity)
    interior = (coords.abs() < 0.99).all(-1)
    points = frustum_points(coords[interior].double(), LAYOUT.camera.distance, LAYOUT.camera.fov_deg, LAYOUT.uv_inner).float()
    with torch.no_grad():
        density, colour = baked.query(points, planes, zeros[interior])
        expected_density, expected_colour = field.query(points, planes, zeros[interior])
    torch.testing.assert_close(density, expected_density, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(colour, expected_colour, rtol=1e-4, atol=1e-5)


# ---- the shipped model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from vq3d_nerfstudio.data.dataset import load_image
    from vq3d_nerfstudio.stage1.package import load_package

    folder = SHIPPED_DIR / "vq3d-tiny-synth"
    model, _ = load_package(folder)
    model.set_scene_images(load_image(folder / "examples" / "example_00.png", model.config.image_size))
    return model


def render(model, yaw, size, inference_field):
    model.config.inference_field = inference_field
    try:
        return model.get_outputs_for_camera(orbit_cameras([(yaw, 0.0)], size, model.camera_distance, model.fov_deg))
    finally:
        model.config.inference_field = "baked"


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("yaw", [0.0, 20.0], ids=["canonical", "orbit20"])
def test_the_shipped_models_baked_render_matches_its_exact_render(shipped, yaw, size):
    """PSNR >= 35 dB against the exact render, and the expected depth (ray distance) within 2%: the
    median over pixels of |baked - exact| / exact."""
    exact = render(shipped, yaw, size, "exact")
    baked = render(shipped, yaw, size, "baked")
    assert isinstance(shipped.scene.baked, BakedField)
    mse = (baked["rgb"] - exact["rgb"]).square().mean()
    assert -10 * math.log10(float(mse)) >= 35.0
    relative = (baked["depth"] - exact["depth"]).abs() / exact["depth"]
    assert float(relative.median()) <= 0.02
    assert torch.isfinite(baked["normals"]).all()


# ---- where the model uses it -------------------------------------------------------------------------
SIZE = 16


def tiny_model(**overrides):
    model = helpers.tiny_model(SIZE, **overrides).eval()
    model.set_scene_images(torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)))
    return model


def canonical_rays(model):
    return orbit_cameras([(10.0, 0.0)], SIZE, 2.0, 50.0).generate_rays(camera_indices=0).flatten()


def test_the_option_switches_get_outputs_between_the_exact_and_the_baked_field():
    model = tiny_model(inference_field="exact")
    rays = canonical_rays(model)
    planes = model.current_planes()
    batch_idx = torch.zeros(len(rays), dtype=torch.long)
    with torch.no_grad():
        got = model.get_outputs(rays)
        exact = model.renderer.render(rays, model.field, planes, batch_idx, normals=True)
        assert model.scene.baked is None
        for key in exact:
            assert torch.equal(got[key], exact[key]), key

        model.config.inference_field = "baked"
        got = model.get_outputs(rays)
        baked = model.scene.baked
        assert isinstance(baked, BakedField) and baked.source_planes is planes
        assert baked.resolution == bake_resolution(model.layout, model.config.num_depth_frequencies, 1)
        expected = model.renderer.render(rays, baked, planes, batch_idx, normals=True, colour_min_weight=COLOUR_MIN_WEIGHT)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        assert not torch.equal(got["rgb"], exact["rgb"])
        model.get_outputs(rays)
        assert model.scene.baked is baked  # baked once per scene


def test_a_viewer_frame_computes_only_the_outputs_it_shows():
    """With shown_outputs set (the viewer), normals and rgb_coarse are computed only when shown and
    come back black otherwise, under the same keys; the shown outputs equal a full render's."""
    model = tiny_model()
    rays = canonical_rays(model)
    with torch.no_grad():
        full = model.get_outputs(rays)
        for shown in ({"rgb"}, {"normals"}, {"rgb_coarse", "depth"}):
            model.shown_outputs = lambda shown=shown: shown
            got = model.get_outputs(rays)
            assert got.keys() == full.keys()
            for key in got:
                if key in ("normals", "rgb_coarse") and key not in shown:
                    assert torch.equal(got[key], torch.zeros_like(full[key])), (shown, key)
                else:
                    assert torch.equal(got[key], full[key]), (shown, key)
        assert full["normals"].abs().sum() > 0 and full["rgb_coarse"].abs().sum() > 0


def test_the_gather_trilinear_is_grid_samples():
    """The compile-friendly lookup (eight gathers and lerps) equals grid_sample's trilinear, border
    clamp included (points outside the cube)."""
    from vq3d_nerfstudio.stage1.baked import trilinear

    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(1, 1, 7, 5, 6, generator=generator)
    coords = torch.rand(500, 3, generator=generator) * 2.4 - 1.2
    torch.testing.assert_close(trilinear(volume[0, 0], coords), sample_volume(volume, coords)[:, 0], rtol=1e-5, atol=1e-6)


def test_the_compiled_density_pass_renders_what_the_eager_one_does(monkeypatch):
    """Compiled in the background (as the viewer starts it), then used by the renderer: the same
    render as the eager path within float rounding, with no compile on the render's own calls."""
    from torch._dynamo.utils import counters

    from vq3d_nerfstudio.stage1 import baked as baked_module

    model = tiny_model()
    rays = canonical_rays(model)
    cfg = model.config
    compiled = baked_module.CompiledDensityPass()
    monkeypatch.setattr(baked_module, "COMPILED_DENSITY_PASS", compiled)
    with torch.no_grad():
        eager = model.get_outputs(rays)
        compiled.start(model.field.layout, (cfg.coarse_samples_per_ray, cfg.coarse_samples_per_ray + cfg.fine_samples_per_ray + 1))
        if not compiled.join(timeout=600):
            pytest.skip(f"torch.compile is unavailable here: {compiled.error}")
        graphs = counters["stats"]["unique_graphs"]
        got = model.get_outputs(rays)
        assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's graph served the real shapes
    for key in eager:
        torch.testing.assert_close(got[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)


def test_training_renders_the_exact_field_and_a_training_step_rebakes():
    model = tiny_model()
    rays = canonical_rays(model)
    with torch.no_grad():
        model.get_outputs(rays)
    first = model.scene.baked
    model.train()
    planes = model.current_planes()
    with torch.no_grad():
        torch.manual_seed(1)
        got = model.get_outputs(rays)
        torch.manual_seed(1)  # the same stratified samples
        exact = model.renderer.render(rays, model.field, planes, torch.zeros(len(rays), dtype=torch.long))
    for key in exact:
        assert torch.equal(got[key], exact[key]), key
    # a training forward re-encodes the shown scene later: the next inference frame bakes the new planes
    bundle = orbit_cameras([(0.0, 0.0)], SIZE, 2.0, 50.0).generate_rays(camera_indices=0).flatten()[:8]
    bundle.metadata["batch_idx"] = torch.zeros(8, 1, dtype=torch.long)
    model(bundle, {"input_images": torch.rand(1, 3, SIZE, SIZE)})
    model.eval()
    with torch.no_grad():
        model.get_outputs(rays)
    assert model.scene.baked is not first and model.scene.baked.source_planes is model.scene.planes


def test_a_placed_object_is_composed_from_both_baked_fields():
    model = tiny_model()
    scene_planes = model.current_planes()
    object_planes = scene_planes.flip(-1).clone()
    model.set_scene_planes(scene_planes, composition=Placement(object_planes, (0.0, 0.0, 0.3), 0.5))
    rays = canonical_rays(model)
    with torch.no_grad():
        model.get_outputs(rays)
    field = model.shown_field(model.current_planes())
    assert isinstance(field, ComposedField) and field.field is model.scene.baked and field.object_field is model.scene.baked_object
    assert model.scene.baked_object.source_planes is object_planes
    model.config.inference_field = "exact"
    field = model.shown_field(model.current_planes())
    assert isinstance(field, ComposedField) and field.field is model.field and field.object_field is model.field


def test_a_package_without_the_inference_options_loads_with_their_defaults(tmp_path):
    import json

    from vq3d_nerfstudio.stage1 import package as pkg

    model = helpers.tiny_model(SIZE, inference_field="exact")
    pkg.write_package_files(tmp_path / "p", model, {"source_run": "test", "step": 1, "revision": "test"}, {"description": "t"})
    info = json.loads((tmp_path / "p" / "config.json").read_text())
    assert info["model"].pop("inference_field") == "exact"
    info["model"].pop("bake_nodes_per_texel")
    (tmp_path / "p" / "config.json").write_text(json.dumps(info))
    loaded, _ = pkg.load_package(tmp_path / "p")
    defaults = type(model.config)()
    assert loaded.config.inference_field == defaults.inference_field == "baked"
    assert loaded.config.bake_nodes_per_texel == defaults.bake_nodes_per_texel
    assert dataclasses.replace(loaded.config, inference_field="exact").hidden_dim == model.config.hidden_dim
