"""Cameras and poses, written once for every layer (the bottom layer, with ``errors`` and
``checks``): the canonical camera, pinhole intrinsics, orbit and look-at poses, novel-view sampling,
camera paths, and the rigid alignment of a posed scene onto the canonical frame.

Convention (nerfstudio / OpenGL): camera-to-world matrices, camera x right, y up, looking down -z;
world +y up. The canonical camera sits at ``(0, 0, distance)`` with identity rotation, looking at the
pivot (the origin), with a square pinhole of ``fov_deg`` horizontal field of view: one object,
:class:`.poses.CanonicalCamera`, holds its numbers.

- :mod:`.poses`: plain numpy (``vq3d synth`` and the folder scanners import it without torch);
- :mod:`.cameras`: torch poses and nerfstudio ``Cameras``.
"""
