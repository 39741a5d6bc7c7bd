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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Size presets (nanoGPT style). ``paper`` is our choice for 256 px / 32x32 tokens / 8192 codes:
#: GPT-2-medium-sized (24 layers, 1024 wide, ~330 M parameters incl. embeddings), between
#: ViT-VQGAN's VIM-Base and VIM-Large stage-2 transformers; VQ3D does not state its size.
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
        self.token_embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.embed_dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.block_size, config.embed_dim))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.position_embedding, std=0.02)
        # GPT-2: residual projections scaled by 1/sqrt(2 * num_layers)
        for block in self.blocks:
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
        parts = []
        if cache is None or cache.length == 0:
            parts.append(self.class_embedding(class_ids)[:, None])  # (B, 1, C)
        if tokens.shape[1] > 0:
            parts.append(self.token_embedding(tokens))  # (B, L, C)
        x = torch.cat(parts, dim=1)
        start = 0 if cache is None else cache.length
        if start + x.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {start + x.shape[1]} positions exceeds block_size {self.config.block_size}")
        x = self.dropout(x + self.position_embedding[:, start : start + x.shape[1]])
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.ln_f(x))

    def loss(self, codes: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of ``(B, T)`` codes given their classes."""
        logits = self(codes[:, :-1], class_ids)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    def new_cache(self, batch_size: int) -> KVCache:
        cfg = self.config
        param = self.head.weight
        shape = (batch_size, cfg.num_heads, cfg.block_size, cfg.embed_dim // cfg.num_heads)
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
    cache = model.new_cache(class_ids.shape[0]) if use_kv_cache else None
    codes = torch.zeros(class_ids.shape[0], 0, dtype=torch.long, device=device)
    for _ in range(model.config.block_size):
        if cache is not None:
            logits = model(codes[:, -1:] if cache.length else codes, class_ids, cache)[:, -1]
        else:
            logits = model(codes, class_ids)[:, -1]
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
        if guided:
            nxt = torch.cat([nxt, nxt])
        codes = torch.cat([codes, nxt[:, None]], dim=1)
    model.train(was_training)
    return codes[:batch]
