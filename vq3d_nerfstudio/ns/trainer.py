"""A nerfstudio ``Trainer`` with VQ3D's discriminator step and non-finite-step protection.

nerfstudio's ``Trainer.train_iteration`` sums every loss, runs one backward and steps every param
group: right for a NeRF, wrong for a GAN. Here each iteration is

1. the generator step: the pipeline's losses (reconstruction, VQ, depth, adversarial, perceptual)
   with the discriminator frozen (``requires_grad`` off, so not one of its parameters moves), then
   a step of every param group except ``discriminator``;
2. the discriminator step, once the adversarial loss has started: its loss on the renders the
   generator step cached *detached* (so not one generator parameter moves), plus R1 on real images,
   then a step of the ``discriminator`` group only (gradients averaged across ranks under DDP).

The discriminator is a submodule of the model (its adversarial component,
:mod:`~vq3d_nerfstudio.stage1.adversarial`) and has its own param group, so its weights and its
optimizer state are saved in, and restored from, the usual nerfstudio checkpoint: a resumed run
continues the same GAN. A step whose loss or gradients are not finite is skipped (no weight or
optimizer state changes), counted, and logged (``skipped_steps/*``).

Interruption loses nothing: the first Ctrl-C (SIGINT) finishes the current step, saves a checkpoint
and ends training normally (resume with ``--load-dir``); a second one stops at once
(:class:`~vq3d_nerfstudio.interrupts.StopRequest`, which stage 2's trainer uses too). Checkpoints are
written to a temporary file and renamed, so an interrupted save never leaves a truncated ``.ckpt``;
a save on a full disk stops training in one line naming the file and the last good checkpoint, kept.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
from nerfstudio.engine.trainer import TRAIN_INTERATION_OUTPUT, Trainer, TrainerConfig
from nerfstudio.utils import colormaps, writer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from vq3d_nerfstudio.checks import (
    NonNegativeFloat,
    PositiveFloat,
    check_options,
    output_path_problem,
    ranged,
    renamed_option_notes,
)
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import DiskFullError, atomic_path
from vq3d_nerfstudio.interrupts import StopRequest
from vq3d_nerfstudio.ns.pipeline import check_canonical_cameras, check_image_sizes
from vq3d_nerfstudio.ns.schedulers import schedules_for_run
from vq3d_nerfstudio.stage1.adversarial import DISCRIMINATOR
from vq3d_nerfstudio.stage1.quantizer import reset_optimizer_rows


@dataclass
class AdamConfig(AdamOptimizerConfig):
    """nerfstudio's Adam config with the ranges of its options checked before training starts
    (``--optimizers.field.optimizer.lr -1`` is one line, not torch's traceback at the first step).
    Runs saved with nerfstudio's class load as before."""

    lr: PositiveFloat = 0.0005
    """The learning rate to use."""
    eps: PositiveFloat = 1e-08
    """The epsilon value to use."""
    max_norm: ranged(Optional[float], 0, low_open=True) = None
    """The max norm to use for gradient clipping (None: no clipping)."""
    weight_decay: NonNegativeFloat = 0
    """The weight decay to use."""


@dataclass
class AdamWithBetasConfig(AdamConfig):
    """nerfstudio's Adam config with the betas exposed (GANs want beta1 = 0)."""

    betas: ranged(Tuple[float, float], 0, 1, high_open=True) = (0.9, 0.999)
    """Adam's running-average coefficients (beta1, beta2)."""


@dataclass
class Vq3dTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, run by :class:`Vq3dTrainer`."""

    _target: Type = field(default_factory=lambda: Vq3dTrainer)

    def save_config(self) -> None:
        """Check the options before ns-train makes the run folder (finite floats, a writable
        --output-dir, the data and model image sizes and canonical cameras agreeing): a mistake stops in one line and
        leaves nothing behind. Then one deprecation line (stderr) for each renamed option's old flag
        on the command line (:func:`~vq3d_nerfstudio.checks.renamed_option_notes`), and nerfstudio's save
        of config.yml. The first error boundary of ``ns-train vq3d*`` (the first method of ours it
        calls): a mistake stops with ``"vq3d: error: ..."``."""
        try:
            check_options(self)
            problem = output_path_problem(Path(self.output_dir), is_folder=True)
            if problem is not None:
                raise Vq3dError(f"--output-dir: {problem}")
            check_image_sizes(self.pipeline)
            check_canonical_cameras(self.pipeline)
        except Vq3dError as err:
            raise SystemExit(f"vq3d: error: {err}") from None
        for note in renamed_option_notes(self, sys.argv[1:]):  # an old flag that still works, once each
            print(note, file=sys.stderr)
        super().save_config()


def _finite_grads(params: List[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class Vq3dTrainer(Trainer):
    """See the module docstring."""

    config: Vq3dTrainerConfig

    def setup(self, test_mode="val") -> None:
        """nerfstudio's setup, then the model's preparation for training. The error boundary of
        building the run: a ``Vq3dError`` (no images, an empty folder, a file as --data, LPIPS weights
        not on this machine, ...) stops with ``"vq3d: error: ..."``; one from building the pipeline
        also removes the run folder, which then holds only config.yml (also when the pipeline's own
        boundary already stopped)."""
        try:
            super().setup(test_mode)
        except Vq3dError as err:
            self._remove_unused_run_folder()
            raise SystemExit(f"vq3d: error: {err}") from None
        except SystemExit:
            self._remove_unused_run_folder()
            raise
        self.skipped_steps = {"generator": 0, DISCRIMINATOR: 0}
        self.gan_inputs: Optional[Dict[str, torch.Tensor]] = None
        """The discriminator's (detached) real and fake images of the last generator forward."""
        model = self.pipeline.model
        if hasattr(model, "prepare_training") and test_mode == "val":
            try:
                model.prepare_training()
            except Vq3dError as err:  # LPIPS weights not on this machine
                raise SystemExit(f"vq3d: error: {err}") from None

    def setup_optimizers(self) -> Optimizers:
        """nerfstudio's optimizers, with every warm-up cosine schedule that has no length of its own
        running over this run's --max-num-iterations."""
        optimizers = schedules_for_run(self.config.optimizers, self.config.max_num_iterations)
        return Optimizers(optimizers, self.pipeline.get_param_groups())

    def train(self) -> None:
        """nerfstudio's training loop under one :class:`~vq3d_nerfstudio.interrupts.StopRequest`
        (Ctrl-C sets ``stop_training``). The error boundary of training: a ``Vq3dError`` (a strict
        bad file, a full disk at a checkpoint save, ...) stops it with ``"vq3d: error: <message>"``."""
        self._completed_step = None
        notice = "[yellow]Interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)"
        try:
            with StopRequest(notice, CONSOLE.print, on_request=lambda: setattr(self, "stop_training", True)):
                super().train()
        except DiskFullError as err:  # a checkpoint save: atomic_path removed its partial file
            kept = sorted(self.checkpoint_dir.glob("step-*.ckpt"))
            last = f"; the last good checkpoint {kept[-1]} is kept" if kept else ""
            raise SystemExit(f"vq3d: error: {err}{last}") from None
        except Vq3dError as err:
            raise SystemExit(f"vq3d: error: {err}") from None

    def _remove_unused_run_folder(self) -> None:
        """Delete this run's folder if it holds nothing but config.yml, and the experiment / method
        folders above it if that leaves them empty (never above --output-dir)."""
        folder, top = Path(self.base_dir), Path(self.config.output_dir)
        try:
            if {p.name for p in folder.iterdir()} - {"config.yml"}:
                return
            (folder / "config.yml").unlink(missing_ok=True)
            while folder != top and top in folder.parents and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        except OSError:  # another rank removed it first, or it was never made
            pass

    def _after_train(self) -> None:
        if getattr(self, "_completed_step", None) is not None:
            self.step = self._completed_step  # the loop had already advanced to a step it did not run
        super()._after_train()

    def _groups(self, names: List[str], step: int, phase: str) -> List[str]:
        accumulation = self.gradient_accumulation_steps
        if phase == "zero":
            return [g for g in names if step % accumulation[g] == 0]
        return [g for g in names if step % accumulation[g] == accumulation[g] - 1]

    def _reset_restarted_codes(self, model) -> None:
        """Codes the quantizer just moved onto new latents start with fresh Adam moments (the old
        ones belong to the code's previous place), before this step's update."""
        quantizer = getattr(model, "quantizer", None)
        restarted = getattr(quantizer, "last_restarted", None)
        if restarted is None or not bool(restarted.any()):
            return
        for name, params in self.optimizers.parameters.items():
            if any(p is quantizer.codebook for p in params):
                reset_optimizer_rows(self.optimizers.optimizers[name], quantizer.codebook, restarted)

    def train_iteration(self, step: int) -> TRAIN_INTERATION_OUTPUT:
        model = self.pipeline.model
        groups = list(self.optimizers.parameters.keys())
        generator_groups = [g for g in groups if g != DISCRIMINATOR]
        disc_params = self.optimizers.parameters.get(DISCRIMINATOR, [])
        gen_params = [p for g in generator_groups for p in self.optimizers.parameters[g]]

        # ---- generator step (discriminator frozen)
        self.optimizers.zero_grad_some(self._groups(generator_groups, step, "zero"))
        for p in disc_params:
            p.requires_grad_(False)
        device_type = self.device.split(":")[0]
        device_type = "cpu" if device_type == "mps" else device_type
        try:
            with torch.autocast(device_type=device_type, enabled=self.mixed_precision):
                outputs, loss_dict, metrics_dict = self.pipeline.get_train_loss_dict(step=step)
                self.gan_inputs = model.adversarial.discriminator_inputs(outputs)
                loss = functools.reduce(torch.add, loss_dict.values())
            finite = bool(torch.isfinite(loss))
            if finite:
                self.grad_scaler.scale(loss).backward()
                # with mixed precision the grad scaler handles overflow itself (skips and rescales)
                finite = self.grad_scaler.is_enabled() or _finite_grads(gen_params)
        finally:
            for p in disc_params:
                p.requires_grad_(True)
        if finite:
            self._reset_restarted_codes(model)
            self.optimizers.optimizer_scaler_step_some(self.grad_scaler, self._groups(generator_groups, step, "step"))
        else:
            self._skip("generator", step, loss_dict)
            self.optimizers.zero_grad_some(generator_groups)

        # ---- discriminator step (on the detached renders of this step)
        if disc_params and finite and model.adversarial.active(step):
            self.optimizers.zero_grad_some([DISCRIMINATOR])
            d_losses, d_metrics = model.adversarial.get_discriminator_loss_dict(step, self.gan_inputs)
            if d_losses:
                d_loss = functools.reduce(torch.add, d_losses.values())
                d_finite = bool(torch.isfinite(d_loss))
                if d_finite:
                    d_loss.backward()
                    if dist.is_available() and dist.is_initialized() and self.world_size > 1:
                        for p in disc_params:
                            if p.grad is not None:
                                dist.all_reduce(p.grad)
                                p.grad /= self.world_size
                    d_finite = _finite_grads(disc_params)
                if d_finite:
                    self.optimizers.optimizer_step(DISCRIMINATOR)
                else:
                    self._skip(DISCRIMINATOR, step, d_losses)
                    self.optimizers.zero_grad_some([DISCRIMINATOR])
                metrics_dict.update({f"gan/{k}": v.detach() for k, v in d_losses.items()})
                metrics_dict.update({f"gan/{k}": v for k, v in d_metrics.items()})
        for name, count in self.skipped_steps.items():
            metrics_dict[f"skipped_steps/{name}"] = torch.tensor(float(count))
        if step % self.config.steps_per_eval_image == 0 and self.gan_inputs is not None:
            self._log_gan_images(self.gan_inputs, step)

        scale = self.grad_scaler.get_scale()
        self.grad_scaler.update()
        if scale <= self.grad_scaler.get_scale():
            self.optimizers.scheduler_step_all(step)
        self._completed_step = step
        return loss, loss_dict, metrics_dict

    def _skip(self, who: str, step: int, losses: Dict[str, torch.Tensor]) -> None:
        self.skipped_steps[who] += 1
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        what = f"loss {', '.join(bad)}" if bad else "gradients"
        CONSOLE.print(f"[yellow]step {step}: non-finite {what} in the {who} step; skipped "
                      f"({self.skipped_steps[who]} {who} steps skipped so far)")

    @torch.no_grad()
    def _log_gan_images(self, cache: Dict[str, torch.Tensor], step: int) -> None:
        """Rows: canonical renders, novel-view renders, their disparities; then the real images."""
        fake, disparity, real = cache["fake"][:, :3], cache["gan_fake_disparity"], cache["real"][:, :3]
        num = real.shape[0]
        to_row = lambda x: torch.cat(list(x.permute(0, 2, 3, 1)), dim=1)  # noqa: E731 [N,H,W,C] -> [H, N*W, C]
        disp = disparity / disparity.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
        disp_rgb = colormaps.apply_colormap(disp.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        rows = [
            to_row((fake[:num] + 1) / 2), to_row((fake[num:] + 1) / 2),
            to_row(disp_rgb[:num]), to_row(disp_rgb[num:]), to_row((real + 1) / 2),
        ]
        image = torch.cat(rows, dim=0).clamp(0, 1)
        writer.put_image(name="GAN/canonical, novel, their disparity, real", image=image, step=step)

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """nerfstudio's checkpoint, written atomically (temporary file, then rename); on the main
        process only under DDP (as nerfstudio's own: every rank writing one file would race)."""
        if not self.checkpoint_dir.exists():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        # the temporary file beside, not inside, the checkpoint folder: nerfstudio parses every file name in it
        with atomic_path(ckpt_path, folder=self.checkpoint_dir.parent) as tmp_path:
            torch.save(
                {
                    "step": step,
                    "pipeline": pipeline.state_dict(),
                    "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
                    "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
                    "scalers": self.grad_scaler.state_dict(),
                },
                tmp_path,
            )
        if self.config.save_only_latest_checkpoint:
            for f in self.checkpoint_dir.glob("*.ckpt"):
                if f != ckpt_path:
                    f.unlink()
