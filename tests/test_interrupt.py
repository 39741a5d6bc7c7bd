"""Interruption: a SIGKILLed `ns-train vq3d-tiny` (adversarial training on) resumes from its last
checkpoint with the same step, weights and optimizer state, even with a half-written save beside it."""

import signal
import subprocess
import time

import pytest
import torch
from helpers import FAST, cli, run

GAN = [
    "--pipeline.model.adversarial.loss-mult", "0.1", "--pipeline.model.adversarial.start-step", "0",
    "--pipeline.model.adversarial.ramp-steps", "1", "--pipeline.model.adversarial.resolution", "8",
    "--pipeline.model.adversarial.images-per-batch", "2", "--pipeline.model.adversarial.discriminator-channels", "8",
]


def adam_steps(state: dict, group: str) -> int:
    """Adam's step counter of the first parameter of an optimizer group in a checkpoint."""
    first = next(iter(state["optimizers"][group]["state"].values()))
    return int(torch.as_tensor(first["step"]))


def test_sigkill_then_resume_continues_training(synth_dir, tmp_path, cli_env):
    args = [cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--experiment-name", "k",
            "--timestamp", "run", *FAST, *GAN, "--steps-per-save", "2", "--save-only-latest-checkpoint", "False"]
    proc = subprocess.Popen([*args, "--max-num-iterations", "100000"], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    models = tmp_path / "k" / "vq3d-tiny" / "run" / "nerfstudio_models"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(models.glob("step-*.ckpt"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = sorted(models.glob("step-*.ckpt"))
    assert len(saved) >= 3, "no checkpoints before the kill"
    # what a kill during a save leaves: the temporary file beside the folder (the rename never happened)
    stray = models.parent / f".step-{999999:09d}.ckpt.tmp"
    stray.write_bytes(saved[-1].read_bytes()[:1000])
    latest = saved[-1]
    last_step = int(latest.stem.split("-")[1])
    before = torch.load(latest, map_location="cpu", weights_only=False)
    assert before["step"] == last_step

    result = run([*args, "--max-num-iterations", str(last_step + 4), "--load-dir", str(models)], cli_env)
    assert f"step-{last_step:09d}.ckpt" in result.stdout  # nerfstudio names what it resumed from
    final = sorted(models.glob("step-*.ckpt"))[-1]
    after = torch.load(final, map_location="cpu", weights_only=False)
    trained = after["step"] - last_step
    assert trained >= 2
    # the optimizers continued: Adam's step counters advanced by exactly the steps trained since
    for group in ("autoencoder", "field", "discriminator"):
        assert adam_steps(after, group) == adam_steps(before, group) + trained, group
    # and training moved the weights on
    key = next(k for k in before["pipeline"] if "discriminator" in k and k.endswith("weight"))
    assert not torch.equal(before["pipeline"][key], after["pipeline"][key])
    assert stray.exists()  # left alone, and it did not disturb loading


def test_first_ctrl_c_asks_to_stop_the_second_stops_at_once():
    """Both trainers' Ctrl-C: the first sets ``requested`` (and calls back, e.g. nerfstudio's
    ``stop_training``) and says so; the second raises KeyboardInterrupt; on exit the previous
    handler is back."""
    import os

    from vq3d_nerfstudio.interrupts import StopRequest

    said, called = [], []
    before = signal.getsignal(signal.SIGINT)
    with StopRequest("stopping", said.append, on_request=lambda: called.append(True)) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and called == [True] and said == ["stopping"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and called == [True]
