"""Stage 2: the token transformer, its sampler, the token cache, training (DDP, resume) and the CLI."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import cli, random_inception_state, run

from vq3d_nerfstudio.stage1.quantizer import FSQConfig, NoQuantizerConfig
from vq3d_nerfstudio.stage2 import checkpoint as ckpt
from vq3d_nerfstudio.stage2.data import TokenCacheError, global_batch, load_token_cache, rank_share, write_token_cache
from vq3d_nerfstudio.stage2.sample import SampleError, check_compatible, resolve_class
from vq3d_nerfstudio.stage2.train import drop_labels, lr_at
from vq3d_nerfstudio.stage2.transformer import (
    TokenTransformer,
    TokenTransformerConfig,
    filter_logits,
    guided_logits,
    sample_tokens,
)


def tiny_transformer(seed=0, vocab=16, classes=3, block=12, dtype=torch.float64, groups=1, depth_layers=0):
    torch.manual_seed(seed)
    config = TokenTransformerConfig(vocab_size=vocab, num_classes=classes, block_size=block, num_layers=2, num_heads=2,
                                    embed_dim=32, groups=groups, depth_layers=depth_layers)
    return TokenTransformer(config).to(dtype).eval()


#: the two ways to read G = 2 codes a token: one interleaved sequence, or a depth head (RQ-Transformer)
TWO_CODES = {"interleaved": dict(groups=2), "depth-head": dict(groups=2, depth_layers=1)}


# ---- the network ------------------------------------------------------------------------------------
def test_changing_a_token_leaves_earlier_logits_unchanged():
    model = tiny_transformer()
    codes = torch.randint(0, 16, (2, 11), generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2])
    before = model(codes, classes)  # (2, 12, 16): position i predicts code i from codes < i
    for t in range(0, 10):
        changed = codes.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 5) % 16
        after = model(changed, classes)
        # code t+1 is seen from position t+2 on; positions <= t+1 (in particular <= t) do not see it
        assert torch.equal(after[:, : t + 2], before[:, : t + 2])
        assert not torch.allclose(after[:, t + 2 :], before[:, t + 2 :])


@pytest.mark.parametrize("kind", TWO_CODES)
def test_a_tokens_codes_are_predicted_in_order_within_and_across_tokens(kind):
    """G = 2 codes a token, flattened token-major ((h, w, G) -> one sequence): the prediction of a
    token's first code sees neither of its own codes nor later tokens'; its second code's prediction
    sees the first code of the same token, not the second. Both models: causal across positions
    (the depth head's spatial transformer) and within one (its depth transformer)."""
    model = tiny_transformer(block=12, **TWO_CODES[kind])  # 6 tokens x 2 codes
    grid = torch.randint(0, 16, (1, 6, 2), generator=torch.Generator().manual_seed(2))  # (B, tokens, G)
    codes = grid.reshape(1, 12)
    before = model(codes[:, :-1], torch.tensor([1]))  # (1, 12, 16): position 2k + g predicts code (k, g)
    for k in range(6):
        for g in range(2):
            changed = grid.clone()
            changed[0, k, g] = (changed[0, k, g] + 3) % 16
            after = model(changed.reshape(1, 12)[:, :-1], torch.tensor([1]))
            own = 2 * k + g  # the position predicting code (k, g) and every earlier one are blind to it
            assert torch.equal(after[:, : own + 1], before[:, : own + 1])
            if own + 1 < 12:
                assert not torch.allclose(after[:, own + 1], before[:, own + 1])  # the next code sees it


def test_the_depth_head_attends_over_positions_and_reads_any_prefix():
    """With a depth head the spatial transformer has one position per token (6, not 12 codes); every
    prefix length gives the logits of the full sequence's first positions (the sampler's reference
    path feeds growing prefixes)."""
    model = tiny_transformer(block=12, groups=2, depth_layers=1)
    assert model.position_embedding.shape[1] == 6 and model.new_cache(1).keys[0].shape[2] == 6
    assert model.token_embedding.num_embeddings == 2 * 16  # a table per group
    codes = torch.randint(0, 16, (2, 11), generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([0, 2])
    full = model(codes, classes)
    assert full.shape == (2, 12, 16)
    for length in range(0, 11):
        torch.testing.assert_close(model(codes[:, :length], classes), full[:, : length + 1], rtol=1e-10, atol=1e-10)


def test_a_depth_head_needs_several_codes_a_position():
    with pytest.raises(ValueError, match="needs groups > 1"):
        TokenTransformerConfig(vocab_size=16, num_classes=1, block_size=12, depth_layers=1)
    with pytest.raises(ValueError, match="whole number of positions"):
        TokenTransformerConfig(vocab_size=16, num_classes=1, block_size=13, groups=2)


def test_the_class_changes_every_position():
    model = tiny_transformer()
    codes = torch.randint(0, 16, (1, 11))
    a, b = model(codes, torch.tensor([0])), model(codes, torch.tensor([1]))
    assert (a - b).abs().amax(dim=-1).min() > 0


def test_kv_cache_logits_equal_full_recomputation():
    model = tiny_transformer()
    codes = torch.randint(0, 16, (3, 11))
    classes = torch.tensor([0, 1, 3])
    full = model(codes, classes)
    cache = model.new_cache(3)
    pieces = [model(codes[:, :4], classes, cache)]  # class token + 4 codes at once
    for t in range(4, 11):
        pieces.append(model(codes[:, t : t + 1], classes, cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(temperature=0.7, top_k=5),
    dict(top_p=0.8, cfg_scale=2.5),
    dict(temperature=0.0),
])
@pytest.mark.parametrize("kind", ["one-code", *TWO_CODES])
def test_kv_cache_sampler_draws_the_same_tokens_as_full_recomputation(settings, kind):
    model = tiny_transformer(seed=3, **TWO_CODES.get(kind, {}))
    classes = torch.tensor([0, 1, 2, 3])
    cached = sample_tokens(model, classes, generator=torch.Generator().manual_seed(7), use_kv_cache=True, **settings)
    full = sample_tokens(model, classes, generator=torch.Generator().manual_seed(7), use_kv_cache=False, **settings)
    assert cached.shape == (4, 12)
    assert torch.equal(cached, full)
    assert cached.min() >= 0 and cached.max() < 16


def test_sampling_follows_the_model_distribution():
    """Make the logits ignore the context (final norm outputs a constant one-hot vector e_0, the head
    maps it to log p): the sampled code frequencies must match p."""
    model = tiny_transformer(block=2, dtype=torch.float32)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * 12)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.head.weight.zero_()
        model.head.weight[:, 0] = torch.log(p.clamp_min(1e-30))
    tokens = sample_tokens(model, torch.zeros(5000, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens.flatten(), minlength=16).float() / tokens.numel()
    assert torch.allclose(freq, p, atol=0.015)
    assert freq[4:].sum() == 0  # zero-probability codes are never drawn


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    # mass before each token (sorted): 0, 0.5, 0.8, 0.95 -> p=0.7 keeps the first two, p=0.85 three
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7)).tolist() == [[False, True, False, True]]
    torch.testing.assert_close(guided_logits(torch.tensor([2.0]), torch.tensor([1.0]), 3.0), torch.tensor([4.0]))


@pytest.mark.parametrize("kind", ["one-code", *TWO_CODES])
def test_a_tiny_model_overfits_one_batch(kind):
    torch.manual_seed(0)
    # one class per scene, so even the first code is determined (with shared classes, the first code
    # of scenes in a class could only be guessed: a floor of ln(scenes per class) / 16 nats)
    config = TokenTransformerConfig(vocab_size=32, num_classes=8, block_size=16, num_layers=2, num_heads=2, embed_dim=64,
                                    **TWO_CODES.get(kind, {}))
    model = TokenTransformer(config)
    codes = torch.randint(0, 32, (8, 16))
    classes = torch.arange(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = model.loss(codes, classes)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > math.log(32) - 0.5  # starts near chance: ln 32 = 3.47 nats
    assert float(loss) < 0.05


# ---- schedule, batches, labels --------------------------------------------------------------------
def test_learning_rate_schedule_by_hand():
    assert lr_at(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 * 0.5
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)


def test_batches_cover_each_epoch_and_ranks_split_them():
    num, batch = 23, 4
    seen = np.concatenate([global_batch(num, batch, step, seed=0) for step in range(5)])  # one epoch: 5 batches
    assert len(set(seen.tolist())) == 20  # no repeats within the epoch; 3 dropped
    assert not np.array_equal(global_batch(num, batch, 0, 0), global_batch(num, batch, 5, 0))  # next epoch reshuffles
    glob = global_batch(num, batch, 2, seed=0)
    shares = [rank_share(glob, r, 2) for r in range(2)]
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(np.concatenate(shares)) == sorted(glob)
    classes = np.arange(8)
    full = drop_labels(classes, 8, 3, 0, 0.5, 99, 0, 1)
    split = [drop_labels(classes[r::2], 8, 3, 0, 0.5, 99, r, 2) for r in range(2)]
    assert np.array_equal(full[0::2], split[0]) and np.array_equal(full[1::2], split[1])
    assert 0 < (full == 99).sum() < 8


def test_class_labels_resolve_or_fail_in_one_line():
    names = ["box", "cylinder", "sphere"]
    assert resolve_class("2", names, 3) == 2
    assert resolve_class("cylinder", names, 3) == 1
    assert resolve_class("none", names, 3) == 3
    with pytest.raises(SampleError, match="out of range.*3 class"):
        resolve_class("3", names, 3)
    with pytest.raises(SampleError, match="neither a class id"):
        resolve_class("cat", names, 3)


# ---- the token cache and training through the CLI --------------------------------------------------
def structured_cache(path, num_train=64, num_eval=16, vocab=16, grid=4, classes=("a", "b")):
    """Codes that a transformer can learn: scene = class pattern + a random shift along the raster."""
    rng = np.random.default_rng(0)

    def make(num):
        cls = rng.integers(0, len(classes), num)
        shift = rng.integers(0, vocab, num)
        ramp = np.arange(grid * grid)
        codes = (ramp[None] * (cls[:, None] + 1) + shift[:, None]) % vocab
        return codes.reshape(num, grid, grid), cls

    return write_token_cache(path, {"train": make(num_train), "eval": make(num_eval)}, vocab, list(classes))


def test_token_cache_round_trip_and_corruption(tmp_path):
    cache = structured_cache(tmp_path / "cache")
    assert len(cache.train) == 64 and cache.num_tokens == 16 and cache.class_names == ["a", "b"]
    assert cache.train.codes.dtype == np.uint16
    codes = np.load(tmp_path / "cache" / "train.codes.npy")
    codes[0, 0, 0] = 16  # outside the codebook
    np.save(tmp_path / "cache" / "train.codes.npy", codes)
    with pytest.raises(TokenCacheError, match="outside"):
        load_token_cache(tmp_path / "cache")
    data = (tmp_path / "cache" / "eval.codes.npy").read_bytes()
    (tmp_path / "cache" / "eval.codes.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenCacheError, match="eval.codes.npy"):
        load_token_cache(tmp_path / "cache", validate=False)


def train_args(cache, out, *extra):
    return ["--token-cache", str(cache), "--output-dir", str(out), "--model", "nano", "--batch-size", "8",
            "--warmup-steps", "2", "--eval-every", "3", "--log-every", "1", "--device", "cpu", *extra]


def read_log(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_resumed_run_continues_with_the_same_losses_and_weights(tmp_path, cli_env):
    cache = structured_cache(tmp_path / "cache").path
    full = tmp_path / "full"
    run([cli("vq3d-train-stage2"), *train_args(cache, full, "--max-steps", "6", "--save-every", "3", "--keep-checkpoints", "5")], cli_env)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-000000006")  # as if killed after step 3's checkpoint
    (interrupted / "log.jsonl").write_text("")
    result = run([cli("vq3d-train-stage2"), *train_args(cache, interrupted, "--max-steps", "6", "--save-every", "3")], cli_env)
    assert "Resuming from" in result.stdout and "(step 3)" in result.stdout
    resumed, original = read_log(interrupted), read_log(full)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(original[step], rel=1e-6)
    a, _, _ = ckpt.load_model(full)
    b, _, _ = ckpt.load_model(interrupted)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_codes_of_several_groups_train_as_one_sequence_or_with_a_depth_head(tmp_path, cli_env):
    """A cache of G = 2 codes per token ((N, h, w, 2) codes) is, with --depth-layers 0, one sequence of
    h * w * 2 codes to stage 2, a token's codes in a row: the transformer's block is 32 positions for
    4x4 tokens, and the checkpoint records the (4, 4, 2) grid that sampling reshapes its codes to. By
    default a depth head reads them (16 positions), and a resume with another depth is refused."""
    rng = np.random.default_rng(1)
    splits = {split: (rng.integers(0, 16, (n, 4, 4, 2)), rng.integers(0, 2, n)) for split, n in (("train", 32), ("eval", 8))}
    cache = write_token_cache(tmp_path / "cache", splits, 16, ["a", "b"])
    assert cache.num_tokens == 32 and cache.meta["grid"] == [4, 4, 2]
    out = tmp_path / "run"
    run([cli("vq3d-train-stage2"), *train_args(cache.path, out, "--max-steps", "3", "--depth-layers", "0")], cli_env)
    model, info, _ = ckpt.load_model(out)
    assert info["grid"] == [4, 4, 2] and model.config.block_size == 32 and model.config.depth_layers == 0
    codes = sample_tokens(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 32) and codes.reshape(2, 4, 4, 2).shape == (2, 4, 4, 2)
    # by default with a depth head of 2 layers: 16 positions of 2 codes, the same flat order out
    depth = tmp_path / "depth"
    run([cli("vq3d-train-stage2"), *train_args(cache.path, depth, "--max-steps", "3")], cli_env)
    model, info, _ = ckpt.load_model(depth)
    assert info["model"]["depth_layers"] == 2 and info["model"]["groups"] == 2 and model.config.positions == 16
    codes = sample_tokens(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 32) and 0 <= codes.min() and codes.max() < 16
    other = subprocess.run([cli("vq3d-train-stage2"), *train_args(cache.path, depth, "--max-steps", "4", "--depth-layers", "1")],
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "--depth-layers 2, not 1" in other.stderr and "Traceback" not in other.stderr


def test_ddp_on_two_processes_equals_one_process_on_the_combined_batch(tmp_path, cli_env):
    cache = structured_cache(tmp_path / "cache").path
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "5", "--class-dropout", "0.3"]
    run([cli("vq3d-train-stage2"), *train_args(cache, single, *args)], cli_env)
    env = dict(cli_env, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         cli("vq3d-train-stage2"), *train_args(cache, ddp, *args)], env, timeout=600)
    for step in ("step-000000001", "step-000000002"):
        a, _, _ = ckpt.load_model(single / "checkpoints" / step)
        b, _, _ = ckpt.load_model(ddp / "checkpoints" / step)
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=f"{step} {name}")
    assert read_log(single)[1] == pytest.approx(read_log(ddp)[1], rel=1e-5)
    # and the step did move the weights away from the (seeded) initial ones
    info = json.loads((single / "checkpoints" / "step-000000001" / "config.json").read_text())
    torch.manual_seed(0)
    initial = TokenTransformer(TokenTransformerConfig(**info["model"]))
    trained = ckpt.load_model(single / "checkpoints" / "step-000000001")[0]
    assert not torch.allclose(initial.head.weight, trained.head.weight)


def test_checkpoints_are_safetensors_and_tampering_is_one_clear_error(tmp_path, cli_env):
    cache = structured_cache(tmp_path / "cache").path
    out = tmp_path / "run"
    run([cli("vq3d-train-stage2"), *train_args(cache, out, "--max-steps", "2")], cli_env)
    folder = ckpt.resolve_checkpoint(out)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.ckpt")) and not list(out.rglob("*.pkl"))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors.*truncated or corrupt"):
        ckpt.load_model(out)
    # resuming from it is one line too, not a traceback
    result = subprocess.run([cli("vq3d-train-stage2"), *train_args(cache, out, "--max-steps", "4")], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "vq3d-train-stage2: error:" in result.stderr and "Traceback" not in result.stderr


def test_stage1_to_samples_end_to_end(trained_run, synth_dir, tmp_path):
    """tiny stage 1 -> token cache -> stage 2 -> `vq3d sample` videos; the cache is reused."""
    import imageio.v3 as iio

    config, env = trained_run
    out = tmp_path / "stage2"
    args = [cli("vq3d-train-stage2"), "--stage1-config", str(config), "--output-dir", str(out), "--model", "nano",
            "--batch-size", "4", "--max-steps", "3", "--eval-every", "3", "--num-workers", "0", "--device", "cpu"]
    first = run(args, env)
    assert "Wrote the token cache" in first.stdout
    caches = list(config.parent.glob("token_cache-*"))
    assert len(caches) == 1
    cache = load_token_cache(caches[0])
    assert cache.class_names == ["box", "cylinder", "sphere"]  # synth scenes carry a class
    assert len(cache.train) + len(cache.eval) == 24
    assert cache.meta["grid"] == [16, 16]  # vq3d-tiny: 64 px input (the 32 px scenes are resized), 4 px patches
    second = run([*args, "--max-steps", "4"], env)
    assert "Reusing the token cache" in second.stdout and "Resuming from" in second.stdout

    samples = tmp_path / "samples"
    run([cli("vq3d"), "sample", "--stage2-checkpoint", str(out), "--class-label", "sphere", "--num-samples", "2",
         "--output-dir", str(samples), "--num-frames", "4", "--top-k", "50", "--cfg-scale", "2"], env)
    for i in range(2):
        assert iio.imread(samples / f"sphere_{i:03d}_orbit.mp4", plugin="pyav").shape == (4, 64, 64, 3)
        assert iio.imread(samples / f"sphere_{i:03d}_disparity.mp4", plugin="pyav").shape == (4, 64, 64, 3)
        assert iio.imread(samples / f"sphere_{i:03d}_canonical.png").shape == (64, 64, 3)
        codes = np.load(samples / f"sphere_{i:03d}_codes.npy")
        assert codes.shape == (16, 16) and 0 <= codes.min() and codes.max() < cache.codebook_size  # vq3d-tiny: 64 px / patch 4
    assert iio.imread(samples / "samples.png").shape == (64, 128, 3)

    # FID of sampled scenes at the canonical and a novel view (random Inception weights: the plumbing,
    # not the score; the score's maths is tested in test_fid.py)
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state(1), weights)
    real = synth_dir.glob("*/images/frame_00000.png")
    (tmp_path / "real").mkdir()
    for i, image in enumerate(sorted(real)[:8]):
        shutil.copy(image, tmp_path / "real" / f"{i}.png")
    fid_json = tmp_path / "fid.json"
    run([cli("vq3d"), "fid", "--real", str(tmp_path / "real"), "--stage2-checkpoint", str(out), "--num-samples", "6",
         "--inception-weights", str(weights), "--feature-dim", "64", "--samples-dir", str(tmp_path / "rendered"),
         "--output", str(fid_json), "--device", "cpu"], env)
    scores = json.loads(fid_json.read_text())
    assert set(scores["views"]) == {"canonical", "novel"}
    for view in ("canonical", "novel"):
        assert scores["views"][view]["num_fake"] == 6 and scores["views"][view]["num_real"] == 8
        assert np.isfinite(scores["views"][view]["fid"]) and scores["views"][view]["fid"] > 0
        assert len(list((tmp_path / "rendered" / view).glob("*.png"))) == 6
    canonical = iio.imread(sorted((tmp_path / "rendered" / "canonical").glob("*.png"))[0])
    novel = iio.imread(sorted((tmp_path / "rendered" / "novel").glob("*.png"))[0])
    assert canonical.shape == (64, 64, 3) and not np.array_equal(canonical, novel)

    # a stage-2 model of another codebook size, pointed at this stage-1 run
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer as Net, TokenTransformerConfig as NetConfig

    wrong = NetConfig(vocab_size=2 * cache.codebook_size, num_classes=3, block_size=256, num_layers=1, num_heads=2, embed_dim=32)
    net = Net(wrong)
    ckpt.save_checkpoint(tmp_path / "wrong", 1, net, torch.optim.AdamW(net.parameters()), {},
                         {"model": wrong.to_dict(), "class_names": cache.class_names, "grid": [16, 16], "stage1_config": str(config)})
    mismatch = subprocess.run([cli("vq3d"), "sample", "--stage2-checkpoint", str(tmp_path / "wrong"), "--output-dir",
                               str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=300)
    assert mismatch.returncode != 0 and "Traceback" not in mismatch.stderr
    assert f"predicts {2 * cache.codebook_size} codes but the stage-1 model has a codebook of {cache.codebook_size}" in mismatch.stderr

    bad = subprocess.run([cli("vq3d"), "sample", "--stage2-checkpoint", str(out), "--class-label", "7",
                          "--output-dir", str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "out of range" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, cli_env):
    import signal
    import time

    cache = structured_cache(tmp_path / "cache").path
    out = tmp_path / "run"
    args = [cli("vq3d-train-stage2"), *train_args(cache, out, "--max-steps", "100000", "--save-every", "100000")]
    process = subprocess.Popen(args, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "Stopped at step" in stdout
    saved = ckpt.list_checkpoints(out)
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < 100000
    result = run([cli("vq3d-train-stage2"), *train_args(cache, out, "--max-steps", str(step + 2))], cli_env)
    assert f"(step {step})" in result.stdout
    assert ckpt.list_checkpoints(out)[-1].name == f"step-{step + 2:09d}"


def test_encoding_resumes_at_the_first_unfinished_chunk_and_ranks_split_chunks(tmp_path):
    from vq3d_nerfstudio.stage2.data import assemble_cache, encode_split

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"image": torch.full((4, 4, 3), i / 10.0), "class_id": torch.tensor(i % 2)}

    calls = []

    def encode(images):  # "code" = 10 x the image value, as a 2x2 grid
        calls.append(images.shape[0])
        return (images[:, 0, :2, :2] * 10).round().long()

    parts = tmp_path / "cache" / "parts"
    encode_split(encode, Images(), parts, "train", chunk_size=4, batch_size=2, num_workers=0, rank=1, world_size=2)
    assert sorted(p.name for p in parts.iterdir()) == ["train-000001.npz"]  # rank 1 of 2: chunk 1 of 0, 1, 2
    calls.clear()
    encode_split(encode, Images(), parts, "train", chunk_size=4, batch_size=2, num_workers=0)
    assert sum(calls) == 6  # chunks 0 (4 images) and 2 (2 images); chunk 1 was already there
    encode_split(encode, torch.utils.data.Subset(Images(), []), parts, "eval", 4, 2, 0)
    meta = {"codebook_size": 16, "grid": [2, 2], "class_names": ["even", "odd"], "num_classes": 2}
    cache = assemble_cache(tmp_path / "cache", {"train": 10, "eval": 0}, 4, 16, meta)
    assert np.array_equal(cache.train.codes[:, 0, 0], np.arange(10))
    assert np.array_equal(cache.train.classes, np.arange(10) % 2)
    assert len(cache.eval) == 0 and not parts.exists()


def test_config_mistakes_are_one_line_before_any_work(tmp_path, cli_env):
    small = structured_cache(tmp_path / "cache16", vocab=16).path
    other = structured_cache(tmp_path / "cache32", vocab=32).path
    out = tmp_path / "run"
    run([cli("vq3d-train-stage2"), *train_args(small, out, "--max-steps", "2")], cli_env)
    # resuming a run with tokens of another codebook
    result = subprocess.run([cli("vq3d-train-stage2"), *train_args(other, out, "--max-steps", "4")], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "another codebook" in result.stderr and "16 codes" in result.stderr
    # a missing cache
    result = subprocess.run([cli("vq3d-train-stage2"), "--token-cache", str(tmp_path / "nowhere"), "--output-dir",
                             str(tmp_path / "x")], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "not a finished token cache" in result.stderr and "Traceback" not in result.stderr


def test_a_save_killed_midway_leaves_the_last_checkpoint_in_use(tmp_path):
    """A kill during a save leaves only the temporary folder (the rename never happened): it is ignored."""
    model = tiny_transformer(dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    info = {"model": model.config.to_dict(), "class_names": [], "grid": [3, 4]}
    ckpt.save_checkpoint(tmp_path, 4, model, optimizer, {}, info)
    half = tmp_path / "checkpoints" / f".step-{8:09d}.tmp-12345"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000004"]
    loaded, saved_info, folder = ckpt.load_model(tmp_path)
    assert folder.name == "step-000000004" and saved_info["step"] == 4
    torch.testing.assert_close(loaded.head.weight, model.head.weight)


def test_sampler_refuses_a_stage1_model_of_another_number_of_codes_per_token():
    """A stage-2 model trained on one code per token against a stage-1 model with FSQ groups 2 (and
    the other way round) is refused in one line before any sampling; matching ones pass. A model
    without codes (no-quantizer) is refused too."""
    from helpers import tiny_model

    info = {"model": {"vocab_size": 12}, "grid": [4, 4]}
    check_compatible(info, tiny_model(quantizer=FSQConfig(levels=(3, 2, 2))))
    with pytest.raises(SampleError, match="writes 4x4 tokens of 1 code but the stage-1 model reads 4x4 tokens of 2 codes"):
        check_compatible(info, tiny_model(quantizer=FSQConfig(levels=(3, 2, 2), groups=2)))
    check_compatible({"model": {"vocab_size": 12}, "grid": [4, 4, 2]}, tiny_model(quantizer=FSQConfig(levels=(3, 2, 2), groups=2)))
    with pytest.raises(SampleError, match="continuous tokens"):
        check_compatible(info, tiny_model(quantizer=NoQuantizerConfig()))


def test_a_run_without_codes_is_refused_by_stage2_and_code_blends_in_one_line(synth_dir, tmp_path, cli_env):
    """`ns-train vq3d-tiny no-quantizer` trains (continuous tokens); stage-2 training and
    `vq3d interpolate --space codes` on it stop in one line that says why, before any work."""
    from helpers import FAST

    run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--experiment-name", "none",
         "--timestamp", "t", "--max-num-iterations", "2", *FAST, "no-quantizer"], cli_env)
    config = tmp_path / "none" / "vq3d-tiny" / "t" / "config.yml"
    stage2 = subprocess.run([cli("vq3d-train-stage2"), "--stage1-config", str(config), "--output-dir", str(tmp_path / "s2"),
                             "--device", "cpu"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert stage2.returncode != 0 and "continuous tokens (no-quantizer)" in stage2.stderr
    assert stage2.stderr.strip().count("\n") == 0 and "Traceback" not in stage2.stderr
    image = next(synth_dir.glob("scene_*/images/frame_00000.png"))
    blend = subprocess.run([cli("vq3d"), "interpolate", "--load-config", str(config), "--images", str(image), str(image),
                            "--space", "codes", "--output-dir", str(tmp_path / "i")], env=cli_env, capture_output=True, text=True,
                           timeout=300)
    assert blend.returncode != 0 and "--space codes needs codes" in blend.stderr
    assert "Traceback" not in blend.stderr


def test_a_run_of_two_codes_a_token_goes_through_stage2_sampling_and_code_blends(synth_dir, tmp_path, cli_env):
    """`ns-train vq3d-tiny ... fsq-quantizer --pipeline.model.quantizer.groups 2` -> its token cache of
    (16, 16, 2) codes -> stage 2 with the default depth head -> `vq3d sample` writes (16, 16, 2) codes
    that decode to a scene; `vq3d interpolate --space codes` blends the run's grouped codes."""
    import imageio.v3 as iio
    from helpers import FAST

    run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(tmp_path), "--experiment-name", "g2",
         "--timestamp", "t", "--max-num-iterations", "2", *FAST, "fsq-quantizer", "--pipeline.model.quantizer.groups", "2"],
        cli_env)
    config = tmp_path / "g2" / "vq3d-tiny" / "t" / "config.yml"
    out = tmp_path / "stage2"
    run([cli("vq3d-train-stage2"), "--stage1-config", str(config), "--output-dir", str(out), "--model", "nano",
         "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--num-workers", "0", "--device", "cpu"], cli_env)
    model, info, _ = ckpt.load_model(out)
    assert info["grid"] == [16, 16, 2] and model.config.depth_layers == 2 and model.config.positions == 256
    samples = tmp_path / "samples"
    run([cli("vq3d"), "sample", "--stage2-checkpoint", str(out), "--num-samples", "1", "--num-frames", "2",
         "--output-dir", str(samples)], cli_env)
    codes = np.load(next(samples.glob("*_000_codes.npy")))
    assert codes.shape == (16, 16, 2) and 0 <= codes.min() and codes.max() < 15360
    assert iio.imread(next(samples.glob("*_000_canonical.png"))).shape == (64, 64, 3)
    images = sorted(synth_dir.glob("scene_*/images/frame_00000.png"))[:2]
    blend = tmp_path / "blend"
    run([cli("vq3d"), "interpolate", "--load-config", str(config), "--images", *map(str, images), "--space", "codes",
         "--steps", "3", "--output-dir", str(blend)], cli_env)
    assert iio.imread(blend / "interpolation_strip.png").shape == (64, 5 * 64, 3)
