"""Shared by the tests of ``di.deferred_init`` (tests/test_record_*.py): comparing a
recorded model with its eager twin, the replay as ``di.materialize`` runs it, and
the models written for these tests (torchvision's ResNet init loop, values computed
from values, a 70B-shaped decoder with plain torch.nn layers)."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

import deferinit as di
from deferinit._record import Undo, deferred_init, replay_recorded

M = TypeVar("M", bound=nn.Module)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not) by every name, ties included."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def differing(eager: nn.Module, other: nn.Module) -> list[str]:
    """Names whose tensors differ in dtype, stride or any bit."""
    a, b = tensors(eager), tensors(other)
    assert a.keys() == b.keys()
    return [
        k
        for k in a
        if a[k].dtype != b[k].dtype or a[k].stride() != b[k].stride() or not torch.equal(a[k], b[k])
    ]


def materialize_recorded(
    module: M,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> M:
    """``replay_recorded`` as ``di.materialize`` calls it: with an undo log run newest
    first on failure, and the default generator put back."""
    undo: list[Undo] = []
    state = torch.get_rng_state()
    try:
        return replay_recorded(module, device=device, dtype=dtype, seed=seed, undo=undo)
    except BaseException:
        for action in reversed(undo):
            action()
        torch.set_rng_state(state)
        raise


def tiny_llama_config(transformers: Any) -> Any:
    """A small ``LlamaConfig`` with tied embeddings (``transformers`` is passed in:
    it is an optional dependency of the tests that use it)."""
    return transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def recorded_and_eager(factory: Callable[[], nn.Module], seed: int = 0) -> tuple[Any, Any]:
    """(eager, recorded then materialized) under the same seed."""
    torch.manual_seed(seed)
    eager = factory()
    model: Any = deferred_init(factory)
    torch.manual_seed(seed)
    materialize_recorded(model)
    return eager, model


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (explicit sizes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)  # type: ignore[no-any-return]


class SmallResNet(nn.Module):
    """A ResNet with torchvision's init loop: kaiming_normal_(fan_out) for convs,
    constant_ for norms, zero-init of the last BN of every residual block."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        inplanes = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(inplanes, width, stride), BasicBlock(width, width)]
            inplanes = width
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # type: ignore[no-any-return]


def rotary_table(dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ValuesFromValues(nn.Module):
    """Values computed from other values: QR (orthogonal_), a norm rescale in place,
    a copy, a rotary table as a plain attribute and as a non-persistent buffer, a
    tied head, a sinusoidal table in a list attribute, slice initialization."""

    def __init__(self, vocab: int = 20, dim: int = 8, length: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.orthogonal_(self.proj.weight)
        self.mix = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.mix.weight.div_(self.mix.weight.norm(dim=1, keepdim=True))
            self.mix.weight[:, : dim // 2].normal_(0.0, 0.5)  # a slice, in place
        self.gain = nn.Parameter(self.proj.weight.detach().diagonal().clone().abs() + 1)
        self.table = rotary_table(dim, length)  # plain tensor attribute
        self.register_buffer("rope", rotary_table(dim, length) * 2, persistent=False)
        self.register_buffer("scale", torch.tensor(math.sqrt(dim)))
        self.extras = [torch.linspace(0, 1, dim), torch.randn(dim)]
        self.lookup = {"bias": torch.randn(dim) * 0.1}
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tie

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rope = self.get_buffer("rope")
        x = self.embed(ids) * self.gain + self.table[: ids.shape[-1]] + rope[: ids.shape[-1]]
        return self.head(self.mix(self.proj(x)) / self.scale + self.lookup["bias"])  # type: ignore[no-any-return]


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MidSize(nn.Module):
    """A ~25M-parameter GPT-style stack (for timing record + replay against eager)."""

    def __init__(self, vocab: int = 8000, dim: int = 384, layers: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 256, dim) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(dim, 4 * dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -- a Llama-3-70B-shaped decoder, plain torch.nn layers, explicit sizes ---------


@dataclass(frozen=True)
class Config70B:
    vocab_size: int = 128256
    d_model: int = 8192
    n_layers: int = 80
    n_heads: int = 64
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_hidden: int = 28672
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0


class Attention70B(nn.Module):
    def __init__(self, cfg: Config70B) -> None:
        super().__init__()
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)


class MLP70B(nn.Module):
    def __init__(self, cfg: Config70B) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)


class Block70B(nn.Module):
    def __init__(self, cfg: Config70B) -> None:
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention70B(cfg)
        self.post_attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP70B(cfg)


class Llama70B(nn.Module):
    def __init__(self, cfg: Config70B) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block70B(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta**half, persistent=False)
        std = 0.02 / (2 * cfg.n_layers) ** 0.5
        for block in self.blocks:  # GPT-2-style scaled init of the residual projections
            assert isinstance(block, Block70B)
            nn.init.normal_(block.attn.o_proj.weight, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, std=std)


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and what it contains (tensors counted by their storage)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, type) or callable(obj) and not isinstance(obj, tuple):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return sys.getsizeof(obj) + obj.untyped_storage().nbytes()
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_size(v, seen) for v in obj)
    return size


def peak_rss_mib() -> float:
    """This process's peak resident set: ``VmHWM`` on Linux (``ru_maxrss`` would be the
    parent's peak when that was larger: it survives exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_70b(layers: int = Config70B.n_layers) -> None:
    """Record the 70B-shaped decoder; print what ``test_record_scale`` checks (run in a
    fresh interpreter, so that peak RSS is this run's)."""
    base = peak_rss_mib()
    start = time.perf_counter()
    model = deferred_init(Llama70B, Config70B(n_layers=layers))
    elapsed = time.perf_counter() - start
    record = model.__dict__["_di_record"]
    count = sum(p.numel() for p in model.parameters())
    devices = sorted({p.device.type for p in model.parameters()})
    print(f"parameters: {count / 1e9:.2f}e9, devices: {devices}")
    print(f"ops recorded: {len(record.ops)}, final tensors: {len(record.finals)}")
    print(f"record time: {elapsed:.2f} s")
    ops = deep_size(record.ops)
    print(
        f"record: ops {ops / 2**20:.2f} MiB = {ops / len(record.ops):.0f} B/op; plan "
        f"{deep_size(record.plan.__dict__) / 2**10:.0f} KiB"
    )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB (after imports: {base:.0f} MiB)")


def assert_replays_as_eager(
    factory: Callable[[], nn.Module], recorded_under: int, materialized_under: int
) -> None:
    """``factory`` recorded under one seed and materialized under another holds what
    eager construction under the second gives, and leaves the generator where eager
    construction leaves it."""
    torch.manual_seed(materialized_under)
    eager = factory()
    after_eager = torch.get_rng_state()
    torch.manual_seed(recorded_under)
    model: Any = di.deferred_init(factory)
    torch.manual_seed(materialized_under)
    di.materialize(model)
    assert differing(eager, model) == []
    assert torch.equal(torch.get_rng_state(), after_eager)
