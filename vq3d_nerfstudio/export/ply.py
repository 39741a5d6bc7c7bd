"""PLY files the exports write, through ``plyfile``: point clouds (``vq3d reconstruct``) and 3D
Gaussian splats in the standard 3DGS layout (``vq3d export-splats``), and reading the latter back.

Both are binary little endian with one ``vertex`` element, written atomically
(:func:`~vq3d_nerfstudio.files.atomic_path`) by one writer. Apart from the code that makes what
goes in them (:mod:`~vq3d_nerfstudio.export.pointcloud`, :mod:`~vq3d_nerfstudio.export.splats`) so
that the file format lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from plyfile import PlyData, PlyElement, PlyParseError

from vq3d_nerfstudio.export.gaussians import Gaussians, rgb_to_sh_dc, sh_dc_to_rgb
from vq3d_nerfstudio.files import atomic_path

NUM_SH_REST = 45
"""f_rest coefficients in the standard layout (degree 3: 15 per channel), written as zeros."""

PLY_PROPERTIES: Tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    *(f"f_rest_{i}" for i in range(NUM_SH_REST)),
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)
"""The vertex properties of a 3DGS ``.ply`` (Inria's ``save_ply``), in order, all float32."""


def _write_vertices(path: Path, vertex: np.ndarray) -> None:
    """Write ``vertex`` (a structured array, one field a property) as a binary little-endian PLY
    with that one ``vertex`` element, atomically."""
    with atomic_path(Path(path)) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(tmp))


def write_point_ply(path: Path, points: np.ndarray, colors: np.ndarray, normals: np.ndarray) -> None:
    """Binary little-endian PLY with float xyz, float normals and uchar RGB (what ns-export and
    MeshLab / CloudCompare / Blender read), through ``plyfile``, written atomically. ``colors`` in [0, 1]."""
    count = len(points)
    rgb = (np.clip(colors, 0, 1) * 255 + 0.5).astype(np.uint8)
    vertex = np.empty(count, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"),
                                     ("nz", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, key in enumerate("xyz"):
        vertex[key] = points[:, i]
        vertex["n" + key] = normals[:, i]
    for i, key in enumerate(("red", "green", "blue")):
        vertex[key] = rgb[:, i]
    _write_vertices(path, vertex)


def write_splat_ply(path: Path, gaussians: Gaussians) -> None:
    """Write the standard 3DGS ``.ply``: binary little endian, one ``vertex`` element with the float
    properties :data:`PLY_PROPERTIES` (through ``plyfile``). Encodings as Inria's 3DGS stores them:
    ``f_dc`` = :func:`~vq3d_nerfstudio.export.gaussians.rgb_to_sh_dc`, ``opacity`` = logit,
    ``scale_*`` = log, ``rot_*`` = normalised ``wxyz``; normals and ``f_rest_*`` are zeros. Written
    atomically (:func:`~vq3d_nerfstudio.files.atomic_path`)."""
    g = gaussians.detach().to("cpu")
    count = len(g)
    opacity = g.opacities.double().clamp(1e-6, 1 - 1e-6)
    columns = {
        "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
        "opacity": torch.log(opacity / (1 - opacity)),
    }
    f_dc = rgb_to_sh_dc(g.colors)
    log_scales = torch.log(g.scales.clamp_min(1e-12))
    quats = F.normalize(g.quats, dim=-1)
    for i in range(3):
        columns[f"f_dc_{i}"] = f_dc[:, i]
        columns[f"scale_{i}"] = log_scales[:, i]
    for i in range(4):
        columns[f"rot_{i}"] = quats[:, i]
    vertex = np.zeros(count, dtype=[(name, "<f4") for name in PLY_PROPERTIES])
    for name, values in columns.items():
        vertex[name] = values.float().numpy()
    _write_vertices(path, vertex)


def read_splat_ply(path: Path) -> Gaussians:
    """Read a 3DGS ``.ply`` whose vertex properties are all float (any order, extra properties
    ignored; the inverse of :func:`write_splat_ply`, also for Inria's files). Only the DC colour is
    read: view-dependent ``f_rest`` terms are dropped."""
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable PLY file ({err})") from err
    if [element.name for element in ply.elements] != ["vertex"]:
        raise ValueError(f"{path}: expected one 'vertex' element, found {[e.name for e in ply.elements]}")
    vertex = ply["vertex"].data
    for prop in ply["vertex"].properties:
        if getattr(prop, "val_dtype", None) not in ("f4", "float", "float32"):
            raise ValueError(f"{path}: property {prop.name} is {getattr(prop, 'val_dtype', 'a list')}; a 3DGS .ply holds floats")
    missing = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
               "rot_0", "rot_1", "rot_2", "rot_3"} - set(vertex.dtype.names)
    if missing:
        raise ValueError(f"{path}: missing properties {sorted(missing)}")

    def stack(keys: List[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([vertex[k].astype(np.float32) for k in keys], axis=-1))

    return Gaussians(
        means=stack(["x", "y", "z"]),
        scales=torch.exp(stack(["scale_0", "scale_1", "scale_2"])),
        quats=F.normalize(stack(["rot_0", "rot_1", "rot_2", "rot_3"]), dim=-1),
        opacities=torch.sigmoid(stack(["opacity"])[:, 0]),
        colors=sh_dc_to_rgb(stack(["f_dc_0", "f_dc_1", "f_dc_2"])),
    )
