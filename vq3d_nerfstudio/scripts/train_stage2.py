"""``vq3d-train-stage2``: train VQ3D's class-conditional token transformer (stage 2)."""

from __future__ import annotations

import tyro

from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import disk_full_as_error
from vq3d_nerfstudio.stage2.train import Stage2TrainConfig, train


def entrypoint() -> None:
    """Parse the options and train; ``torchrun --nproc-per-node N $(which vq3d-train-stage2) ...``
    trains data-parallel. The error boundary of stage 2: a :class:`~vq3d_nerfstudio.errors.Vq3dError`
    (a bad option, a damaged cache or checkpoint, a full disk, ...) stops it with
    ``"vq3d-train-stage2: error: <its message>"`` and exit status 1; the checkpoints saved before stay."""
    config = tyro.cli(Stage2TrainConfig)
    try:
        with disk_full_as_error():
            path = train(config)
    except Vq3dError as err:
        raise SystemExit(f"vq3d-train-stage2: error: {err}") from None
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"Stage 2 checkpoint: {path}\nSample with: vq3d sample --stage2-checkpoint {config.output_dir} --class-label 0")


if __name__ == "__main__":
    entrypoint()
