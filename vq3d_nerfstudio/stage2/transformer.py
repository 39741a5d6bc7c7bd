"""Stage 2: a class-conditional, decoder-only transformer over stage-1 token grids (VQ3D Sec. 3.3,
after ViT-VQGAN's stage 2), and its sampler.

A scene is ``T = h * w`` code indices in raster order. The sequence the transformer reads is the
class token followed by the first ``T - 1`` codes; the output at position ``i`` predicts code ``i``:

    input    [cls] c_0  c_1  ...  c_{T-2}
    predicts  c_0  c_1  c_2  ...  c_{T-1}

Class ``num_classes`` is the null class: it is trained by dropping labels at random, and gives
unconditional samples and classifier-free guidance (Ho & Salimans 2022).

The sampler keeps each layer's keys and values (a KV cache), so drawing ``T`` tokens costs ``T``
single-position passes instead of ``T`` passes over a growing prefix.

With G codes per token (a stage-1 run with FSQ groups G) a scene is ``T * G`` codes, a token's G
codes in a row, and two models read them:

- **interleaved** (``depth_layers`` 0): the sequence above, ``T * G`` long; the learned position
  embedding tells a token's codes apart.
- **depth head** (``depth_layers`` > 0; RQ-Transformer, Lee et al. 2022): a spatial transformer over
  the ``T`` positions, whose input at a position is the sum of the previous position's G code
  embeddings (one table per group), and a small causal transformer over a position's G codes, fed the
  spatial output first, then the codes before each one:

      spatial   [cls]  u_0  ...  u_{T-2}          u_t = sum_g E_g[c_{t,g}]
      -> h_0 ... h_{T-1}
      depth t   [h_t]  E_0[c_{t,0}]  ...  E_{G-2}[c_{t,G-2}]
      predicts  c_{t,0}  c_{t,1}  ...  c_{t,G-1}

  Attention over ``T`` positions instead of ``T * G`` codes; the output head is the same.

Both take and give the flat ``T * G`` code order, so training, held-out bits and the sampler see one
interface.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Size presets (nanoGPT style). ``paper`` is our choice for the ``vq3d`` preset's 256 px / 32x32 tokens /
#: 15,360 codes: GPT-2-medium-sized (24 layers, 1024 wide, 336 M parameters incl. embeddings with 1000
#: classes), between ViT-VQGAN's VIM-Base and VIM-Large stage-2 transformers; VQ3D does not state its size.
PRESETS: Dict[str, Dict[str, int]] = {
    "nano": dict(num_layers=2, num_heads=2, embed_dim=64),
    "tiny": dict(num_layers=4, num_heads=4, embed_dim=128),
    "small": dict(num_layers=8, num_heads=8, embed_dim=512),
    "paper": dict(num_layers=24, num_heads=16, embed_dim=1024),
}


@dataclass
class TokenTransformerConfig:
    """Everything needed to rebuild the network (stored as JSON beside its weights)."""

    vocab_size: int
    """Stage-1 codebook size."""
    num_classes: int
    """Number of real classes; the null class is ``num_classes`` (1 class = unconditional data)."""
    block_size: int
    """Tokens per scene, ``h * w``."""
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    dropout: float = 0.0
    """Dropout on attention, residual and embedding outputs."""
    groups: int = 1
    """Codes per token (G; ``block_size`` counts codes, ``T * G``)."""
    depth_layers: int = 0
    """0: one interleaved sequence of ``block_size`` codes; > 0 (needs ``groups`` > 1): a spatial
    transformer over ``block_size / groups`` positions and a depth transformer of this many layers
    over each position's codes."""

    def __post_init__(self) -> None:
        if self.groups < 1 or self.block_size % self.groups:
            raise ValueError(f"block_size {self.block_size} is not a whole number of positions of {self.groups} codes")
        if self.depth_layers < 0 or (self.depth_layers > 0 and self.groups == 1):
            raise ValueError(f"depth_layers {self.depth_layers} needs groups > 1 (a depth transformer over one code is none)")

    @property
    def positions(self) -> int:
        """Positions the (spatial) transformer attends over: ``block_size`` codes, or ``T`` with a depth head."""
        return self.block_size // self.groups if self.depth_layers else self.block_size

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class KVCache:
    """Per-layer keys and values ``(B, nh, block_size, hs)``, filled up to ``length`` positions."""

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    length: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TokenTransformerConfig) -> None:
        super().__init__()
        assert config.embed_dim % config.num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layer: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        """``x``: ``(B, L, C)``. With a cache, ``x`` holds positions ``cache.length ..
        cache.length + L - 1``; their keys/values are written into the cache and attention covers
        every cached position before them."""
        batch, length, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            start = cache.length
            cache.keys[layer][:, :, start : start + length] = k
            cache.values[layer][:, :, start : start + length] = v
            k = cache.keys[layer][:, :, : start + length]  # (B, nh, start + L, hs)
            v = cache.values[layer][:, :, : start + length]
            # query i (absolute position start + i) sees keys 0 .. start + i
            mask = torch.ones(length, start + length, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(batch, length, channels)  # (B, L, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: TokenTransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embed_dim)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.embed_dim, 4 * config.embed_dim),
            nn.GELU(),
            nn.Linear(4 * config.embed_dim, config.embed_dim),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, layer: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache)
        return x + self.mlp(self.ln_2(x))


class TokenTransformer(nn.Module):
    """GPT-style pre-LN transformer with a class token in front of the code sequence."""

    def __init__(self, config: TokenTransformerConfig) -> None:
        super().__init__()
        self.config = config
        depth = config.depth_layers > 0
        # with a depth head, one embedding table per group (code g of a token: row g * vocab + c)
        self.token_embedding = nn.Embedding(config.vocab_size * (config.groups if depth else 1), config.embed_dim)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.embed_dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.positions, config.embed_dim))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        if depth:
            self.depth_embedding = nn.Parameter(torch.zeros(1, config.groups, config.embed_dim))
            self.depth_blocks = nn.ModuleList(Block(config) for _ in range(config.depth_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.position_embedding, std=0.02)
        if depth:
            nn.init.normal_(self.depth_embedding, std=0.02)
        # GPT-2: residual projections scaled by 1/sqrt(2 * num_layers)
        for block in [*self.blocks, *(self.depth_blocks if depth else [])]:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * config.num_layers))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, tokens: torch.Tensor, class_ids: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: ``(B, L)`` code indices, ``L <= block_size - 1``; without a cache these are codes
                ``0 .. L-1`` of each scene (the class token is prepended here).
            class_ids: ``(B,)`` in ``[0, num_classes]`` (``num_classes`` = null class).
            cache: when given, ``tokens`` continue the cached sequence; an empty cache is first fed
                the class token.

        Returns:
            ``(B, L + 1, vocab)`` logits without a cache (position ``i`` predicts code ``i``), or
            ``(B, L', vocab)`` for the ``L'`` positions fed this call with one.
        """
        if self.config.depth_layers:
            if cache is not None:
                raise ValueError("a depth-head model samples through sample_tokens (its cache is per position)")
            return self._depth_forward(tokens, class_ids)
        parts = []
        if cache is None or cache.length == 0:
            parts.append(self.class_embedding(class_ids)[:, None])  # (B, 1, C)
        if tokens.shape[1] > 0:
            parts.append(self.token_embedding(tokens))  # (B, L, C)
        return self.head(self.ln_f(self._spatial(torch.cat(parts, dim=1), cache)))

    # ---- depth head ------------------------------------------------------------------------------
    def _embed_groups(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, P, G')`` codes (groups ``0 .. G'-1``) -> ``(B, P, G', C)`` from each group's table."""
        offsets = torch.arange(codes.shape[-1], device=codes.device) * self.config.vocab_size
        return self.token_embedding(codes + offsets)

    def _spatial(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The transformer over positions: inputs ``(B, L, C)`` (class token, then code embeddings or,
        with a depth head, position sums; no position embedding yet) -> outputs ``(B, L, C)``,
        continuing ``cache`` when given."""
        start = 0 if cache is None else cache.length
        if start + x.shape[1] > self.config.positions:
            raise ValueError(f"sequence of {start + x.shape[1]} positions exceeds {self.config.positions}")
        x = self.dropout(x + self.position_embedding[:, start : start + x.shape[1]])
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return x

    def _depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """A position's spatial output ``(N, C)`` and its first ``g < G`` codes ``(N, g)`` -> logits
        ``(N, g + 1, vocab)`` for its codes ``0 .. g``."""
        x = torch.cat([hidden[:, None], self._embed_groups(codes)], dim=1)
        x = self.dropout(x + self.depth_embedding[:, : x.shape[1]])
        for block in self.depth_blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _depth_forward(self, tokens: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """The flat interface of ``forward`` for the depth head: ``(B, L)`` codes -> ``(B, L + 1, vocab)``."""
        batch, length = tokens.shape
        groups = self.config.groups
        positions = length // groups + 1  # the code L lies at position L // G
        if length >= self.config.block_size:
            raise ValueError(f"sequence of {length + 1} codes exceeds block_size {self.config.block_size}")
        padded = F.pad(tokens, (0, positions * groups - length)).view(batch, positions, groups)  # pad: never read
        sums = self._embed_groups(padded[:, : positions - 1]).sum(dim=2)  # complete positions 0 .. P-2
        x = torch.cat([self.class_embedding(class_ids)[:, None], sums], dim=1)  # (B, P, C)
        hidden = self._spatial(x)
        logits = self._depth_logits(hidden.reshape(batch * positions, -1), padded[..., :-1].reshape(batch * positions, -1))
        return logits.view(batch, positions * groups, -1)[:, : length + 1]

    def loss(self, codes: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of ``(B, T)`` codes given their classes."""
        logits = self(codes[:, :-1], class_ids)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    def new_cache(self, batch_size: int) -> KVCache:
        cfg = self.config
        param = self.head.weight
        shape = (batch_size, cfg.num_heads, cfg.positions, cfg.embed_dim // cfg.num_heads)
        make = lambda: torch.zeros(shape, dtype=param.dtype, device=param.device)  # noqa: E731
        return KVCache([make() for _ in self.blocks], [make() for _ in self.blocks])


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the ``top_k`` largest, and outside the smallest set whose probability
    reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), to ``-inf``. ``(B, V)`` -> ``(B, V)``;
    the most likely token always survives."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; scale 1 is plain conditioning."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_tokens(
    model: TokenTransformer,
    class_ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    cfg_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Draw one token grid per class label, in raster order.

    Args:
        class_ids: ``(B,)`` labels (``model.null_class`` for unconditional samples).
        temperature: divides the logits; lower is more conservative. 0 takes the most likely token.
        top_k, top_p: see :func:`filter_logits`.
        cfg_scale: classifier-free guidance weight (1 = none); each step then also runs the null class.
        generator: the random source (same seed -> same tokens, with or without the cache).
        use_kv_cache: False recomputes the whole prefix every step (the reference the cache is tested against).

    Returns:
        ``(B, block_size)`` code indices.
    """
    was_training = model.training
    model.eval()
    batch = class_ids.shape[0]
    device = model.head.weight.device
    class_ids = class_ids.to(device)
    guided = cfg_scale != 1.0
    if guided:
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, model.null_class)])

    def draw(logits: torch.Tensor) -> torch.Tensor:
        """The next code of each scene from its ``(2B or B, V)`` logits."""
        logits = logits.float()
        if guided:
            logits = guided_logits(logits[:batch], logits[batch:], cfg_scale)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            # inverse-CDF draw from one uniform per scene: the random stream does not depend on the
            # probabilities, so the cached and uncached paths consume it identically
            u = torch.rand(batch, 1, generator=generator, device=generator.device if generator else "cpu").to(device)
            nxt = torch.searchsorted(probs.cumsum(dim=-1), u * probs.sum(-1, keepdim=True), right=True)[:, 0]
            nxt = nxt.clamp_max(probs.shape[-1] - 1)
        return torch.cat([nxt, nxt]) if guided else nxt

    codes = torch.zeros(class_ids.shape[0], 0, dtype=torch.long, device=device)
    depth = model.config.depth_layers > 0
    cache = model.new_cache(class_ids.shape[0]) if use_kv_cache else None
    if depth and cache is not None:  # per position: one cached spatial step, then the depth head over its G codes
        groups = model.config.groups
        x = model.class_embedding(class_ids)[:, None]
        for _ in range(model.config.positions):
            hidden = model._spatial(x, cache)[:, -1]
            mine = codes[:, :0]
            for _ in range(groups):
                mine = torch.cat([mine, draw(model._depth_logits(hidden, mine)[:, -1])[:, None]], dim=1)
            codes = torch.cat([codes, mine], dim=1)
            x = model._embed_groups(mine[:, None]).sum(dim=2)  # (B, 1, C): the next position's input
    else:
        for _ in range(model.config.block_size):
            if cache is not None:
                logits = model(codes[:, -1:] if cache.length else codes, class_ids, cache)[:, -1]
            else:
                logits = model(codes, class_ids)[:, -1]
            codes = torch.cat([codes, draw(logits)[:, None]], dim=1)
    model.train(was_training)
    return codes[:batch]
