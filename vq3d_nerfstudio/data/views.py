"""Posed views: any nerfstudio dataparser as a source of single images, and the supervising views of
multi-view training.

VQ3D trains on single, unposed images: each image is seen by the canonical camera (OpenGL, at
``(0, 0, d)`` looking at the pivot, square, ``fov_deg``). A nerfstudio dataparser (``nerfstudio-data``,
``blender-data``, ``colmap``, ...) gives posed images of one scene; :func:`single_image_outputs` turns
its outputs into that form: every image one training input (centre-cropped and resized by the
dataset like a folder's images), its depth files (metric z-depth, scaled into the canonical frame
of that image), no class labels (no nerfstudio dataparser has per-image classes).

When the data has several calibrated views of a scene, multi-view supervision (beyond the paper,
pixelNeRF / Splatter Image style) encodes one view and renders the others from their cameras,
expressed relative to the input view by the rigid map and scale ``vq3d eval`` uses
(:func:`vq3d_nerfstudio.geometry.poses.canonical_alignment` / ``align_pose``): the input camera becomes
the canonical camera and the world is scaled so that its distance to the scene's pivot is ``d``.
:class:`MultiviewDataset` adds those views to every item.

This module must not import nerfstudio's datamanagers or pipelines (the dataparser module imports
nothing from here at start-up, but keep it light all the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nerfstudio.cameras.cameras import CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.scene_box import SceneBox

from vq3d_nerfstudio.data.dataset import (
    RelativeDisparityConfig,
    Vq3dImageDataset,
    center_crop_box,
    image_size_of,
    load_disparity,
    load_image,
)
from vq3d_nerfstudio.data.scenes import load_scene
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.geometry.cameras import canonical_cameras
from vq3d_nerfstudio.geometry.poses import CanonicalCamera, align_pose, canonical_alignment


@dataclass
class PosedViews:
    """Calibrated views of one or more scenes (one split).

    ``camera_to_worlds`` ``[N, 4, 4]`` float64, OpenGL (x right, y up, looking down -z), world units;
    ``intrinsics`` ``[N, 6]`` float64: ``fx, fy, cx, cy, width, height`` in pixels of the file on disk;
    ``depth_scale``: world units per unit of the depth files (z-depth); ``pivots`` ``[num_scenes, 3]``:
    the point each scene's views orbit (world units)."""

    images: List[Path]
    camera_to_worlds: np.ndarray
    intrinsics: np.ndarray
    depths: Optional[List[Optional[Path]]]
    depth_scale: float
    scene_ids: List[int]
    pivots: np.ndarray

    def alignment(self, view: int, distance: float) -> Tuple[np.ndarray, float]:
        """``(world_to_input [4, 4], scale)`` that map view ``view`` onto the canonical camera at
        ``distance`` from its scene's pivot (:func:`~vq3d_nerfstudio.geometry.poses.canonical_alignment`)."""
        pivot = self.pivots[self.scene_ids[view]]
        if not np.linalg.norm(self.camera_to_worlds[view][:3, 3] - pivot) > 1e-9:
            raise DatasetError(f"{self.images[view]}: the camera sits on the scene's pivot {pivot.tolist()}; no scale to set")
        return canonical_alignment(self.camera_to_worlds[view], distance, pivot=pivot)



def crop_intrinsics(
    fx: float, fy: float, cx: float, cy: float, width: int, height: int, size: int
) -> Tuple[float, float, float, float]:
    """Intrinsics of an image after the centre crop to a square and the resize to ``size``
    (what :func:`~vq3d_nerfstudio.data.dataset.load_image` does): shift by the crop's corner, scale by
    ``size / side``."""
    left, top, right, _ = center_crop_box(int(width), int(height))
    s = size / (right - left)
    return fx * s, fy * s, (cx - left) * s, (cy - top) * s


def orbit_pivot(camera_to_worlds: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The point a capture's cameras look at: nerfstudio's ``focus_of_attention`` (least-squares
    nearest point to the optical axes) when it lies in front of every camera, else ``fallback``
    (the scene box centre): forward-facing or single-camera captures have no such point."""
    from nerfstudio.cameras.camera_utils import focus_of_attention

    if len(camera_to_worlds) >= 2:
        try:
            focus = focus_of_attention(torch.from_numpy(camera_to_worlds).float(), torch.from_numpy(fallback).float())
        except RuntimeError:  # singular: parallel optical axes
            focus = None
        if focus is not None:
            focus = focus.double().numpy()
            ahead = ((focus - camera_to_worlds[:, :3, 3]) * -camera_to_worlds[:, :3, 2]).sum(-1) > 0
            if np.isfinite(focus).all() and ahead.all():
                return focus
    return fallback.astype(np.float64)


def _homogeneous(c2w: torch.Tensor) -> np.ndarray:
    out = np.tile(np.eye(4), (c2w.shape[0], 1, 1))
    out[:, :3, :4] = c2w.detach().double().cpu().numpy()
    return out


def posed_views_from_outputs(outputs: DataparserOutputs) -> PosedViews:
    """The views of a nerfstudio dataparser's outputs: one scene, its pivot from :func:`orbit_pivot`.
    Depth: the files of ``metadata["depth_filenames"]``, z-depth in units of
    ``depth_unit_scale_factor`` (nerfstudio-data's default: millimetres), rescaled with the poses
    (``dataparser_scale``), as nerfstudio's own depth datasets read them."""
    cameras = outputs.cameras
    num = len(outputs.image_filenames)
    cameras = cameras.reshape((-1,)) if cameras.shape != (num,) else cameras
    c2w = _homogeneous(cameras.camera_to_worlds)
    per = lambda x: x.reshape(-1).double().cpu().numpy() * np.ones(num)  # noqa: E731 - broadcast shared intrinsics
    intrinsics = np.stack([per(cameras.fx), per(cameras.fy), per(cameras.cx), per(cameras.cy),
                           per(cameras.width), per(cameras.height)], axis=-1)
    depths = outputs.metadata.get("depth_filenames")
    depth_scale = float(outputs.metadata.get("depth_unit_scale_factor", 1.0)) * float(outputs.dataparser_scale)
    centre = outputs.scene_box.aabb.double().mean(0).numpy()
    return PosedViews(
        images=[Path(p) for p in outputs.image_filenames],
        camera_to_worlds=c2w,
        intrinsics=intrinsics,
        depths=[Path(p) for p in depths] if depths else None,
        depth_scale=depth_scale,
        scene_ids=[0] * num,
        pivots=orbit_pivot(c2w, centre)[None],
    )


def posed_views_from_scene_files(transforms_files: Sequence[Path]) -> PosedViews:
    """Every frame of ``vq3d synth``-style scene folders (``transforms.json``, read by
    :func:`~vq3d_nerfstudio.data.scenes.load_scene`). Depth files are z-depth in world units; the
    pivot is the file's ``"pivot"``, else :func:`orbit_pivot` of the scene's cameras."""
    images, c2ws, intrinsics, depths, scene_ids, pivots = [], [], [], [], [], []
    for scene_id, path in enumerate(transforms_files):
        scene = load_scene(path)
        k = scene.intrinsics
        images += scene.images
        depths += scene.depths
        c2ws.append(scene.camera_to_worlds)
        intrinsics += [[k["fl_x"], k["fl_y"], k["cx"], k["cy"], k["w"], k["h"]]] * len(scene.images)
        scene_ids += [scene_id] * len(scene.images)
        pivots.append(scene.pivot if scene.pivot is not None else orbit_pivot(scene.camera_to_worlds, np.zeros(3)))
    return PosedViews(
        images=images,
        camera_to_worlds=np.concatenate(c2ws).astype(np.float64),
        intrinsics=np.asarray(intrinsics, dtype=np.float64),
        depths=depths if all(d is not None for d in depths) else None,
        depth_scale=1.0,
        scene_ids=scene_ids,
        pivots=np.stack(pivots).astype(np.float64),
    )


def single_image_outputs(
    outputs: DataparserOutputs, name: str, image_size: int, camera: CanonicalCamera
) -> DataparserOutputs:
    """A nerfstudio dataparser's outputs as VQ3D's single images: ``camera`` for every image,
    depth (when the dataparser lists depth files) as z-depth rescaled into each image's canonical
    frame (``metadata["depth_scales"]``: canonical units per file unit), no class labels, and the
    posed views for multi-view supervision (``metadata["posed_views"]``, ``["input_views"]``).

    Raises:
        DatasetError: the dataparser gave no images (one line naming the dataparsers that serve).
    """
    if not outputs.image_filenames:
        raise DatasetError(
            f"{name}: gave no images; VQ3D trains on images: use vq3d-images (folders of photos or `vq3d synth` "
            "scenes) or a nerfstudio dataparser whose data has images (nerfstudio-data, blender-data, colmap, ...)"
        )
    views = posed_views_from_outputs(outputs)
    num = len(views.images)
    depth_files = views.depths
    scales = [views.depth_scale * views.alignment(i, camera.distance)[1] for i in range(num)] if depth_files else None
    extent = 3.0
    metadata: Dict = {
        "depth_filenames": depth_files,
        "depth_kind": "z-depth" if depth_files else "none",
        "depth_scales": scales,
        "class_ids": [-1] * num,
        "class_names": [],
        "image_keys": [p.as_posix() for p in views.images],
        "canonical_camera": camera,
        "posed_views": views,
        "input_views": list(range(num)),
    }
    return DataparserOutputs(
        image_filenames=list(views.images),
        cameras=canonical_cameras(num, image_size, camera.distance, camera.fov_deg),
        scene_box=SceneBox(aabb=torch.tensor([[-extent] * 3, [extent] * 3], dtype=torch.float32)),
        metadata=metadata,
    )


def check_perspective(outputs: DataparserOutputs, name: str) -> None:
    """Multi-view supervision renders pinhole cameras: refuse fisheye / equirectangular captures."""
    types = outputs.cameras.camera_type.reshape(-1).unique().tolist()
    if any(t != CameraType.PERSPECTIVE.value for t in types):
        raise DatasetError(
            f"{name}: multi-view supervision needs pinhole (perspective) cameras, this data has camera types "
            f"{[CameraType(t).name for t in types]}; train without --pipeline.datamanager.use-multiview-supervision"
        )


class MultiviewDataset(Vq3dImageDataset):
    """Single-image items plus ``V = 1 + num_views`` views of the same scene, view 0 the input:

    - ``view_images`` ``[V, S, S, 3]`` in [0, 1] (centre-cropped, resized like the input);
    - ``view_poses`` ``[V, 3, 4]`` camera-to-world in the input's canonical frame (view 0 is the
      canonical camera) and ``view_intrinsics`` ``[V, 4]`` (``fx, fy, cx, cy`` of the resized image);
    - with metric depth, ``view_disparity`` ``[V, S, S, 1]`` (``1 / z`` in canonical units) and
      ``view_disparity_mask``; with relative depth view 0 holds the input's target (see
      :class:`~vq3d_nerfstudio.data.dataset.Vq3dImageDataset`) and the supervising views are 0 with
      masks all False (their pseudo-depth has its own unknown scale and shift, not the input's).

    Supervising views are drawn at random among the scene's other training views (with
    replacement when it has fewer than ``num_views``; the input itself when it has none).
    """

    def __init__(
        self, dataparser_outputs: DataparserOutputs, num_views: int, strict: bool = False,
        relative_disparity: Optional[RelativeDisparityConfig] = None,
    ):
        super().__init__(dataparser_outputs, strict=strict, relative_disparity=relative_disparity)
        self.views: PosedViews = self.metadata["posed_views"]
        self.input_views: List[int] = self.metadata["input_views"]
        self.num_views = num_views
        self.distance = self.metadata["canonical_camera"].distance  # the dataparser's, never a default
        self.scene_views: Dict[int, List[int]] = {}
        for v, scene in enumerate(self.views.scene_ids):
            self.scene_views.setdefault(scene, []).append(v)

    def supervising_views(self, view: int) -> List[int]:
        others = [v for v in self.scene_views[self.views.scene_ids[view]] if v != view]
        if not others:
            return [view] * self.num_views
        if len(others) >= self.num_views:
            return [others[int(i)] for i in torch.randperm(len(others))[: self.num_views]]
        return [others[int(i)] for i in torch.randint(len(others), (self.num_views,))]

    def get_data(self, image_idx: int, image_type: str = "float32") -> Dict:
        data = super().get_data(image_idx, image_type)
        size, views = self.image_size, self.views
        view = self.input_views[image_idx]
        world_to_input, scale = views.alignment(view, self.distance)
        chosen = [view, *self.supervising_views(view)]

        poses, intrinsics, images, disparities, masks = [], [], [], [], []
        metric = self.depth_kind == "z-depth" and views.depths is not None
        for k, v in enumerate(chosen):
            poses.append(align_pose(views.camera_to_worlds[v], world_to_input, scale, self.distance)[:3])
            fx, fy, cx, cy, width, height = views.intrinsics[v]
            intrinsics.append(crop_intrinsics(fx, fy, cx, cy, int(width), int(height), size))
            images.append(data["image"] if k == 0 else load_image(views.images[v], size))
            if "disparity" not in data:
                continue
            if k == 0:
                disparities.append(data["disparity"])
                masks.append(data["disparity_mask"])
            elif metric:
                disp, mask = load_disparity(views.depths[v], "z-depth", image_size_of(views.images[v]), size,
                                            depth_scale=views.depth_scale * scale)
                disparities.append(disp)
                masks.append(mask)
            else:
                disparities.append(torch.zeros_like(data["disparity"]))
                masks.append(torch.zeros_like(data["disparity_mask"]))
        data["view_images"] = torch.stack(images)
        data["view_poses"] = torch.from_numpy(np.stack(poses)).float()
        data["view_intrinsics"] = torch.tensor(intrinsics, dtype=torch.float32)
        if disparities:
            data["view_disparity"] = torch.stack(disparities)
            data["view_disparity_mask"] = torch.stack(masks)
        return data
