"""A Llama-3-70B-shaped decoder written with deferred layers, built on ``meta``.

No layer below is given its input size: every ``dnn.Linear`` and ``dnn.RMSNorm``
infers it from a shape-only pass. ``di.build(..., device="meta")`` then constructs
all ~70.6 billion parameters without allocating a byte for them (nor for any
activation), so the whole model is declared and sized on a laptop; a later
``di.materialize(model, device=...)`` (or FSDP2 sharding first) gives it memory.

Shape (Llama 3 70B): 80 blocks, d_model 8192, 64 query heads and 8 key/value heads
of dimension 128 (grouped-query attention), SwiGLU MLP with hidden size 28672,
RMSNorm, vocabulary 128256, untied output head. The token embedding is a plain
``nn.Embedding`` declared under ``torch.device("meta")``: its sizes are known, and
it mixes with the deferred layers. Rotary embeddings are left out: they hold no
parameters and change no shape.

Run: ``python examples/llama_70b_meta.py`` — prints the parameter count, the
devices the parameters live on, the elapsed seconds and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

import deferinit as di
from deferinit import nn as dnn


@dataclass(frozen=True)
class Config:
    """Llama-3-70B sizes. ``d_model`` is used only where an *output* size must be
    written (the residual stream's width); every input size is inferred."""

    vocab_size: int = 128256
    d_model: int = 8192
    n_layers: int = 80
    n_heads: int = 64
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_hidden: int = 28672
    norm_eps: float = 1e-5


class Attention(nn.Module):
    """Causal grouped-query attention: 8 key/value heads shared by 64 query heads."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = dnn.Linear(cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = dnn.Linear(cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = dnn.Linear(cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = dnn.Linear(cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(out)  # type: ignore[no-any-return]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gate_proj = dnn.Linear(cfg.ffn_hidden, bias=False)
        self.up_proj = dnn.Linear(cfg.ffn_hidden, bias=False)
        self.down_proj = dnn.Linear(cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class Block(nn.Module):
    """Pre-norm decoder block with residual connections."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.input_norm = dnn.RMSNorm(eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = dnn.RMSNorm(eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))  # type: ignore[no-any-return]


class Llama(nn.Module):
    """Token ids (batch, length) -> logits (batch, length, vocab)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = dnn.RMSNorm(eps=cfg.norm_eps)
        self.lm_head = dnn.Linear(cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))  # type: ignore[no-any-return]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` on Linux (``ru_maxrss`` keeps
    a larger parent's peak across exec), else ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=Config.n_layers, help="decoder blocks")
    parser.add_argument(
        "--summary-rows", type=int, default=0, help="also print this many rows of di.summary"
    )
    args = parser.parse_args(argv)
    cfg = Config(n_layers=args.layers)

    start = time.perf_counter()
    model = Llama(cfg)
    tokens = torch.empty(1, 16, dtype=torch.long, device="meta")
    di.build(model, tokens, device="meta")
    elapsed = time.perf_counter() - start

    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    devices = sorted({t.device.type for t in [*params, *model.buffers()]})
    print(f"parameters: {count} ({count / 1e9:.2f}e9)")
    print(f"devices: {','.join(devices)}")
    print(f"built: {di.is_built(model)}")
    print(f"elapsed: {elapsed:.2f} s (construct + di.build)")
    print(f"peak RSS: {peak_rss_bytes() / 2**20:.0f} MiB")

    if hasattr(di, "summary"):
        text = str(di.summary(model)).splitlines()
        rows = text[: args.summary_rows + 2] if args.summary_rows else []
        footer = [line for line in text if line.lower().startswith(("parameter", "buffer"))]
        for line in [*rows, *footer]:
            print(f"summary: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
