"""CUDA paths, checked where a GPU is lent (never in CI): materialize onto ``cuda`` is
bitwise eager construction under ``torch.device("cuda")`` and the same seed, for
deferred twins built on meta, for recorded models (``di.deferred_init``, a Hugging
Face Llama and a mixed model with twins), and ``seed=``; and what it costs there.

Run: ``python benchmarks/cuda_check.py [--json PATH]`` on a machine with a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def same(a: nn.Module, b: nn.Module) -> bool:
    x = dict([*a.named_parameters(), *a.named_buffers()])
    y = dict([*b.named_parameters(), *b.named_buffers()])
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def deferred(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [dnn.Linear(width), nn.ReLU(), dnn.LayerNorm()]
    return nn.Sequential(*layers, dnn.Linear(10))


def explicit(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 64, width), nn.ReLU(), nn.LayerNorm(width)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def check_twins(width: int, depth: int) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = explicit(width, depth)
    model = di.build(deferred(width, depth), (2, 64), device="meta")
    torch.manual_seed(0)
    di.materialize(model, device="cuda")
    seeded = di.materialize(di.build(deferred(width, depth), (2, 64), device="meta"), seed=1)
    again = di.materialize(di.build(deferred(width, depth), (2, 64), device="meta"), seed=1)

    def eager_make() -> None:
        torch.manual_seed(0)
        with torch.device("cuda"):
            explicit(width, depth)

    def ours() -> None:
        m = di.build(deferred(width, depth), (2, 64), device="meta")
        torch.manual_seed(0)
        di.materialize(m, device="cuda")

    ratios = []
    for _ in range(5):
        ratios.append(timed(eager_make) / timed(ours))
    return {
        "twins_equal_eager_on_cuda": same(eager, model),
        "twins_on_cuda": {p.device.type for p in model.parameters()} == {"cuda"},
        "seed_deterministic": same(seeded, again),
        "twins_materialize_throughput_vs_eager": statistics.median(ratios),
    }


class Mixed(nn.Module):
    def __init__(self, explicit_sizes: bool) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.pos = nn.Parameter(torch.randn(1, 6) * 0.02)
        self.body = nn.Linear(6, 8) if explicit_sizes else dnn.Linear(8)
        for m in self.modules():
            if isinstance(m, nn.Linear | dnn.Linear) and m is not self.stem:
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.stem(x) + self.pos)
        return out


def check_recorded() -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - optional

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = LlamaForCausalLM(cfg)
    model = di.deferred_init(LlamaForCausalLM, cfg)
    torch.manual_seed(0)
    di.materialize(model, device="cuda")
    hf_equal = same(eager, model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 32000, (1, 16), device="cuda")
    with torch.no_grad():
        logits_equal = torch.equal(eager(ids).logits, model(ids).logits)
    del eager, model

    def eager_make() -> None:
        torch.manual_seed(0)
        with torch.device("cuda"):
            LlamaForCausalLM(cfg)

    def ours() -> None:
        m = di.deferred_init(LlamaForCausalLM, cfg)
        torch.manual_seed(0)
        di.materialize(m, device="cuda")

    ratios = [timed(ours) / timed(eager_make) for _ in range(3)]
    torch.manual_seed(0)
    with torch.device("cuda"):
        mixed_eager = Mixed(True)
    mixed = di.build(di.deferred_init(Mixed, False), (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(mixed, device="cuda")
    return {
        "hf_llama_equal_eager_on_cuda": hf_equal,
        "hf_tied": tied,
        "hf_logits_equal": logits_equal,
        "hf_record_materialize_time_vs_eager_on_cuda": statistics.median(ratios),
        "mixed_equal_eager_on_cuda": same(mixed_eager, mixed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    figures.update(check_twins(4096, 8))
    figures.update(check_recorded())
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    ok = all(v for k, v in figures.items() if isinstance(v, bool))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
