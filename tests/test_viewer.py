"""Viewer controls: installed by nerfstudio's own viewer code on a real viser server; their callbacks
pick scenes, and bad uploads leave the shown scene alone."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vq3d_nerfstudio.ns.viewer_controls import MAX_UPLOAD_BYTES, ViewerUploadButton, decode_upload


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_upload_accepts_photos_and_refuses_the_rest():
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[:, :25] = (255, 0, 0)
    image = decode_upload("a.png", png_bytes(rgb), 16)
    assert image.shape == (16, 16, 3) and float(image[8, 2, 0]) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="not an image"):
        decode_upload("notes.txt", b"hello", 16)
    with pytest.raises(ValueError, match="upload limit"):
        decode_upload("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1), 16)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    full = png_bytes(noise)
    with pytest.raises(ValueError, match="damaged"):
        decode_upload("cut.png", full[: len(full) // 2], 16)
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 MP, tiny file
    with pytest.raises(ValueError, match="megapixel"):
        decode_upload("bomb.png", bomb.getvalue(), 16)


def test_decode_upload_of_each_awkward_kind(monkeypatch):
    with pytest.raises(ValueError, match="upload is empty"):
        decode_upload("empty.jpg", b"", 8)
    buf = io.BytesIO()
    Image.new("RGBA", (6, 4), (0, 0, 0, 0)).save(buf, format="PNG")  # fully transparent: white, not black
    assert torch.equal(decode_upload("cutout.png", buf.getvalue(), 4), torch.ones(4, 4, 3))
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(buf, format="PNG")  # dark 16-bit stays dark
    assert torch.allclose(decode_upload("dark.png", buf.getvalue(), 4), torch.tensor(4 / 255))
    buf = io.BytesIO()
    Image.new("LAB", (4, 4)).save(buf, format="TIFF")
    with pytest.raises(ValueError, match=r"lab\.tif: the image data is damaged or unsupported \(colour mode LAB is not supported"):
        decode_upload("lab.tif", buf.getvalue(), 4)
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over Pillow's own bomb limit: refused when opened
    with pytest.raises(ValueError, match="bomb.png: over the 50 megapixel limit"):
        decode_upload("bomb.png", buf.getvalue(), 4)


def test_picking_a_bad_dataset_image_keeps_the_scene():
    from types import SimpleNamespace

    from vq3d_nerfstudio.errors import DatasetError
    from vq3d_nerfstudio.ns.viewer_controls import SceneControls

    def show_image(split, index):
        raise DatasetError("/data/kaputt.png: cannot read image (image file is truncated); replace or remove the file")

    datamanager = SimpleNamespace(train_dataset=[0, 1, 2], eval_dataset=[0, 1, 2])
    model = SimpleNamespace(show_image=show_image, default_scene=("eval", 0))
    controls = SceneControls(SimpleNamespace(datamanager=datamanager, model=model))
    controls.split.value, controls.index.value = "train", 1
    controls._on_pick()
    assert controls.shown.value.startswith("cannot show train image 1: /data/kaputt.png: cannot read image")
    assert controls.shown.value.endswith("still showing the previous image")


@pytest.fixture(scope="module")
def pipeline(synth_dir):
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny").pipeline
    config.datamanager.data = synth_dir
    config.datamanager.num_workers = 0
    torch.manual_seed(0)
    return config.setup(device="cpu", test_mode="val").eval()


def test_controls_are_found_and_pick_scenes(pipeline):
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    found = [path for path, _ in parse_object(pipeline, ViewerElement, "Custom Elements")]
    assert found[:6] == [f"Custom Elements/scene_{i}" for i in ("1_split", "2_index", "3_random", "4_upload", "5_shown", "5_status")]
    assert found[6:9] == [f"Custom Elements/view_{i}" for i in ("1_reset", "2_limits", "3_splats")]
    assert found[9:] == [f"Custom Elements/zedit_{i}" for i in
                         ("1_set_a", "2_set_b", "3_blend", "4_space", "5_place", "6_position", "7_scale")]
    controls, model = pipeline._scene_controls, pipeline.model
    controls.split.value, controls.index.value = "train", 3
    controls._on_pick()
    names = pipeline.datamanager.train_dataset.metadata["class_names"]
    class_id = pipeline.datamanager.train_dataset.class_ids[3]
    assert names == ["box", "cylinder", "sphere"]
    assert model.scene.key == ("train", 3) and controls.shown.value == f"training image 3, class {names[class_id]}"
    assert torch.equal(model.scene.image[0].permute(1, 2, 0), pipeline.load_image("train", 3))
    controls.index.value = 10_000
    controls._on_pick()
    assert model.scene.key == ("train", 3) and "no train image 10000" in controls.shown.value
    controls.split.value = "eval"
    controls._on_random()
    assert model.scene.key[0] == "eval" and 0 <= model.scene.key[1] < len(pipeline.datamanager.eval_dataset)


class Uploaded:
    def __init__(self, name, content):
        self.name, self.content = name, content


def test_upload_shows_the_photo_and_bad_uploads_keep_the_scene(pipeline):
    controls, model = pipeline._scene_controls, pipeline.model
    button = controls.upload
    assert isinstance(button, ViewerUploadButton)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    button.uploaded = Uploaded("photo.png", png_bytes(photo))
    controls._on_upload(button)
    assert model.scene.key == ("upload", 0) and controls.shown.value == "uploaded photo photo.png"
    assert torch.allclose(model.scene.image[0].permute(1, 2, 0), torch.from_numpy(photo / 255.0).float(), atol=1e-6)
    before = model.scene.image.clone()
    button.uploaded = Uploaded("virus.exe", b"MZ\x90\x00")
    controls._on_upload(button)
    assert torch.equal(model.scene.image, before) and "upload refused: virus.exe" in controls.shown.value


def test_nerfstudio_viewer_installs_the_controls_on_a_real_server(pipeline, tmp_path):
    """nerfstudio's Viewer builds its GUI from the pipeline: our elements get live viser handles."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.viewer import Viewer

    viewer = Viewer(ViewerConfig(websocket_port=None, quit_on_train_completion=True), log_filename=tmp_path / "v.txt",
                    datapath=tmp_path, pipeline=pipeline, share=False)
    try:
        controls = pipeline._scene_controls
        assert controls.upload.gui_handle is not None and controls.index.gui_handle is not None
        controls.split.gui_handle.value, controls.index.gui_handle.value = "train", 2
        controls.index.cb_hook(controls.index)  # the hook as the viewer rewired it (pick + re-render)
        assert pipeline.model.scene.key == ("train", 2) and controls.shown.value.startswith("training image 2, class ")
        assert viewer.control_panel.max_res == 256  # CPU default, not 512
    finally:
        viewer.viser_server.stop()


def write_stage2_checkpoint(run_dir, vocab, grid, class_names):
    """An untrained stage-2 checkpoint, saved the way vq3d-train-stage2 saves one."""
    from vq3d_nerfstudio.stage2.checkpoint import save_checkpoint
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig

    torch.manual_seed(0)
    config = TokenTransformerConfig(vocab_size=vocab, num_classes=len(class_names), block_size=grid * grid,
                                    num_layers=1, num_heads=2, embed_dim=32)
    model = TokenTransformer(config)
    info = {"model": config.to_dict(), "class_names": class_names, "grid": [grid, grid]}
    save_checkpoint(run_dir, 1, model, torch.optim.AdamW(model.parameters()), {}, info)
    return model


def test_sample_button_shows_a_stage2_scene(pipeline, tmp_path):
    import dataclasses

    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    from vq3d_nerfstudio.ns.viewer_controls import SampleControls
    from vq3d_nerfstudio.stage2.sample import SamplingSettings, SceneSampler

    names = ["box", "cylinder", "sphere"]
    tiny = pipeline.model
    write_stage2_checkpoint(tmp_path / "s2", tiny.config.quantizer.codebook_size, tiny.grid_size, names)
    # given in the config, the controls appear among the viewer's custom elements
    torch.manual_seed(0)
    sampling = dataclasses.replace(pipeline.config, stage2_checkpoint=tmp_path / "s2").setup(device="cpu", test_mode="val").eval()
    found = [path for path, _ in parse_object(sampling, ViewerElement, "Custom Elements")]
    assert [f for f in found if "sample" in f] == [f"Custom Elements/scene_{i}" for i in
                                                    ("6_sample_class", "7_sample_guidance", "8_sample_temperature", "9_sample")]
    controls, model, shown = sampling._sample_controls, sampling.model, sampling._scene_controls.shown
    model.show_image("eval", 0)
    before = model.current_planes().clone()
    controls.class_label.value = "cylinder"
    controls._on_sample()
    assert model.scene.key == ("sample", 1)
    assert shown.value == "stage-2 sample of cylinder (seed 1)"
    expected = SceneSampler.from_checkpoint(tmp_path / "s2", model).sample(1, 1, SamplingSettings(), torch.Generator().manual_seed(1))
    assert torch.equal(model.scene.indices[0].cpu(), expected[0])
    torch.testing.assert_close(model.current_planes(), model.decode_from_indices(expected.to(model.device)))
    assert not torch.allclose(model.current_planes(), before)
    controls.class_label.value = "7"
    controls._on_sample()
    assert "cannot sample" in shown.value and "out of range" in shown.value
    assert model.scene.key == ("sample", 1)

    # a checkpoint for another codebook is refused in the viewer, not with a traceback
    write_stage2_checkpoint(tmp_path / "other", tiny.config.quantizer.codebook_size * 2, tiny.grid_size, names)
    other = SampleControls(sampling, tmp_path / "other", shown)
    other._on_sample()
    assert "cannot sample" in shown.value and "codebook" in shown.value


def test_edit_controls_blend_and_place(pipeline):
    from vq3d_nerfstudio.stage1.edits import encode_image, interpolate

    torch.manual_seed(0)  # a pipeline of its own: the shared one's viewer was stopped above
    pipeline = pipeline.config.setup(device="cpu", test_mode="val").eval()
    controls, model, shown = pipeline._edit_controls, pipeline.model, pipeline._scene_controls.shown
    controls._on_blend()
    assert "remember a scene as A and B first" in shown.value
    model.show_image("eval", 0)
    controls._remember("A")
    model.show_image("train", 1)  # the tiny data holds one held-out image
    controls._remember("B")
    a = encode_image(model, pipeline.load_image("eval", 0))
    b = encode_image(model, pipeline.load_image("train", 1))
    for t, expected in ((0.0, a.planes), (1.0, b.planes)):
        controls.blend.value = t
        controls._on_blend()
        torch.testing.assert_close(model.current_planes(), expected)
    controls.blend.value = 0.5
    controls._on_blend()
    torch.testing.assert_close(model.current_planes(), interpolate(model, a, b, 0.5, "latent"))
    assert shown.value == "A -> B at t = 0.50 (latent)"
    controls.place.value = True
    controls._on_place()
    assert model.scene.composition is not None and model.scene.composition.position == (0.0, 0.0, 0.5)
    torch.testing.assert_close(model.current_planes(), a.planes)
    assert shown.value.startswith("B placed into A")


class FakeClient:
    """A viser client as the server sees it (its real CameraHandle, messages to the browser dropped)."""

    def __init__(self):
        import contextlib
        from types import SimpleNamespace

        from viser._viser import CameraHandle

        self._websock_connection = SimpleNamespace(queue_message=lambda message: None)
        self.atomic = contextlib.nullcontext
        self.camera = CameraHandle(self)
        self.camera._state.update_timestamp = 1.0  # as after the browser's first camera message
        self.camera._state.position = np.array([3.0, -4.0, 1.0])  # viser's default-ish: somewhere else
        self.camera._state.up_direction = np.array([0.0, 0.0, 1.0])
        self.camera._state.aspect = 1.0


def test_viewer_opens_at_the_input_view_with_one_frustum_and_the_panels_scene(pipeline, tmp_path):
    """A client that connects gets the canonical camera (nerfstudio turns the viser camera into the
    model's canonical camera-to-world and field of view); nerfstudio's initial camera index does not
    pick training image 0 over the panel's scene; one training frustum, showing the shown image."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.utils import get_camera
    from nerfstudio.viewer.viewer import Viewer

    from vq3d_nerfstudio.geometry.cameras import canonical_camera_to_world

    torch.manual_seed(0)
    pipeline = pipeline.config.setup(device="cpu", test_mode="val").eval()
    model = pipeline.model
    viewer = Viewer(ViewerConfig(websocket_port=None, quit_on_train_completion=True), log_filename=tmp_path / "v.txt",
                    datapath=tmp_path, pipeline=pipeline, share=False)
    try:
        viewer.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="completed")
        assert list(viewer.camera_handles) == [0]  # 1 frustum, not one per training image
        client = FakeClient()
        pipeline.scene_viewer_setup.to_input_view(client)
        state = viewer.get_camera_state(client)
        torch.testing.assert_close(state.c2w.float(), canonical_camera_to_world(model.camera_distance), atol=1e-5, rtol=0)
        assert state.fov == pytest.approx(np.radians(model.fov_deg))
        # the first frame: the viewer's camera carries cam_idx 0 (nobody clicked); the panel's scene shows
        camera = get_camera(state, 16, 16)  # the frame's camera, built as the viewer's render thread does
        camera.metadata = {"cam_idx": viewer.current_camera_idx}
        model.get_outputs_for_camera(camera)
        assert model.scene.key == ("eval", 0) and pipeline._scene_controls.shown.value.startswith("held-out image 0")
        assert model.shown_outputs() == {viewer.control_panel.output_render}  # frames compute what is shown
        camera.metadata = {"cam_idx": 2}  # a click on another camera still picks it
        model.get_outputs_for_camera(camera)
        assert model.scene.key == ("train", 2)
        pipeline.scene_viewer_setup.poll()  # what the watcher thread does after a scene change
        assert "encoded in" in pipeline._scene_controls.status.value
        assert model.scene.encode_seconds is not None and model.scene.encode_seconds > 0
    finally:
        viewer.viser_server.stop()


def test_the_panels_shown_outputs_are_the_chosen_one_and_the_splits():
    from types import SimpleNamespace

    from vq3d_nerfstudio.ns.viewer_controls import shown_outputs

    panel = SimpleNamespace(output_render="rgb", split=False, split_output_render="normals")
    assert shown_outputs(panel) == {"rgb"}
    panel.split = True
    assert shown_outputs(panel) == {"rgb", "normals"}


def test_the_viewer_compiles_the_density_passes_unless_told_not_to(pipeline, monkeypatch):
    """After the first scene the viewer starts compiling the baked density passes for the model's
    layout and its coarse and fine interval counts; VQ3D_NO_COMPILE=1 (the test suite's setting) stops it."""
    from vq3d_nerfstudio.ns import viewer_controls

    started = []
    monkeypatch.setattr(viewer_controls, "COMPILED_DENSITY_PASS", SimpleNamespace(start=lambda *args: started.append(args)))
    model, setup = pipeline.model, pipeline.scene_viewer_setup
    setup.compile_density_pass(delay=0)
    assert started == []  # VQ3D_NO_COMPILE=1 here
    monkeypatch.delenv("VQ3D_NO_COMPILE")
    setup.compile_density_pass(delay=0)
    cfg = model.config
    assert started == [(model.field.layout, (cfg.coarse_samples_per_ray, cfg.coarse_samples_per_ray + cfg.fine_samples_per_ray + 1))]


def test_splat_toggle_builds_splats_and_idles_the_nerf_render(pipeline):
    from vq3d_nerfstudio.geometry.cameras import canonical_cameras

    torch.manual_seed(0)
    pipeline = pipeline.config.setup(device="cpu", test_mode="val").eval()
    model, splats = pipeline.model, pipeline._splat_controls
    splats.settings.num_cameras, splats.settings.num_gaussians = 2, 500  # quick
    model.show_image("eval", 0)
    camera = canonical_cameras(1, 12, model.camera_distance, model.fov_deg)
    rendered = model.get_outputs_for_camera(camera)
    splats.toggle.value = True
    splats._on_toggle()
    assert model.idle_render
    splats.build()  # (the toggle started the same build in a thread; one runs, the other finds it done)
    assert 0 < splats.count <= 500 and splats.bytes == splats.count * (3 + 9 + 3 + 1) * 4
    assert "splats" in pipeline._scene_controls.status.value
    idle = model.get_outputs_for_camera(camera)
    assert set(idle) == set(rendered)  # the same outputs: the viewer's output menu does not change
    assert float(idle["rgb"].abs().max()) == 0 and torch.all(idle["depth"] == model.config.far_plane)
    splats.toggle.value = False
    splats._on_toggle()
    torch.testing.assert_close(model.get_outputs_for_camera(camera)["rgb"], rendered["rgb"])
