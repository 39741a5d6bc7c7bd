"""The README picture: held-out inputs, their canonical render, novel views and disparity.

    .venv/bin/python benchmarks/demo_strip.py --load-config outputs/demo/vq3d-tiny/demo/config.yml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("docs/demo_strip.png"))
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2, help="pixel repeat for display")
    args = parser.parse_args()

    from nerfstudio.utils.eval_utils import eval_setup

    from vq3d_nerfstudio.geometry.cameras import orbit_cameras

    _, pipeline, _, step = eval_setup(args.load_config, test_mode="inference")
    model = pipeline.model
    size = model.config.image_size
    rows = []
    for index in range(args.num_images):
        image = pipeline.load_image("eval", index)
        model.set_scene_images(image, key=("eval", index))
        tiles = [image]
        for yaw in (0.0, -20.0, 20.0):
            camera = orbit_cameras([(yaw, 0.0)], size, model.camera_distance, model.fov_deg)
            outputs = model.get_outputs_for_camera(camera.to(model.device))
            tiles.append(outputs["rgb"].clamp(0, 1).cpu())
        disparity = outputs["disparity"].cpu()
        tiles.append((disparity / disparity.max().clamp_min(1e-6)).expand(-1, -1, 3))
        rows.append(torch.cat(tiles, dim=1))
    strip = (torch.cat(rows, dim=0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    strip = np.kron(strip, np.ones((args.scale, args.scale, 1), dtype=np.uint8))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(args.output, strip)
    print(f"wrote {args.output} (step {step}): columns = input, canonical, yaw -20, yaw +20, disparity at yaw +20")


if __name__ == "__main__":
    main()
