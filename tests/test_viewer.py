"""Viewer controls: installed by nerfstudio's own viewer code on a real viser server; their callbacks
pick scenes, and bad uploads leave the shown scene alone."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vq3d_nerfstudio.viewer_controls import MAX_UPLOAD_BYTES, ViewerUploadButton, decode_upload


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


@pytest.fixture(scope="module")
def pipeline(synth_dir):
    from vq3d_nerfstudio.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny").pipeline
    config.datamanager.data = synth_dir
    config.datamanager.num_workers = 0
    torch.manual_seed(0)
    return config.setup(device="cpu", test_mode="val").eval()


def test_controls_are_found_and_pick_scenes(pipeline):
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    found = [path for path, _ in parse_object(pipeline, ViewerElement, "Custom Elements")]
    assert found == [f"Custom Elements/scene_{i}" for i in ("1_split", "2_index", "3_random", "4_upload", "5_shown")]
    controls, model = pipeline._scene_controls, pipeline.model
    controls.split.value, controls.index.value = "train", 3
    controls._on_pick()
    assert model._scene_key == ("train", 3) and controls.shown.value == "training image 3"
    assert torch.equal(model._scene_image[0].permute(1, 2, 0), pipeline.load_image("train", 3))
    controls.index.value = 10_000
    controls._on_pick()
    assert model._scene_key == ("train", 3) and "no train image 10000" in controls.shown.value
    controls.split.value = "eval"
    controls._on_random()
    assert model._scene_key[0] == "eval" and 0 <= model._scene_key[1] < len(pipeline.datamanager.eval_dataset)


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
    assert model._scene_key == ("upload", 0) and controls.shown.value == "uploaded photo photo.png"
    assert torch.allclose(model._scene_image[0].permute(1, 2, 0), torch.from_numpy(photo / 255.0).float(), atol=1e-6)
    before = model._scene_image.clone()
    button.uploaded = Uploaded("virus.exe", b"MZ\x90\x00")
    controls._on_upload(button)
    assert torch.equal(model._scene_image, before) and "upload refused: virus.exe" in controls.shown.value


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
        assert pipeline.model._scene_key == ("train", 2) and controls.shown.value == "training image 2"
        assert viewer.control_panel.max_res == 2 * pipeline.model.config.image_size  # CPU default, not 512
    finally:
        viewer.viser_server.stop()
