"""Interruption: a SIGKILLed `ns-train vq3d-tiny` (adversarial training on) resumes from its last
checkpoint with the same step, weights and optimizer state, even with a half-written save beside it."""

import signal
import subprocess
import time

import torch
from helpers import FAST, cli, run

GAN = [
    "--pipeline.model.adversarial-loss-mult", "0.1", "--pipeline.model.adversarial-start-step", "0",
    "--pipeline.model.adversarial-ramp-steps", "1", "--pipeline.model.gan-resolution", "8",
    "--pipeline.model.gan-images-per-batch", "2", "--pipeline.model.discriminator-channels", "8",
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
