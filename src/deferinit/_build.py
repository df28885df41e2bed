"""``di.build``: build every deferred layer from a shape-only pass.

Two passes. The first runs the model under torch's FakeTensorMode: deferred
layers infer their sizes and are constructed with fake parameters, so nothing
is computed and neither activations nor parameters take memory; then every one
of them is rolled back. The second constructs the layers for real (or on
``meta``) in *registration* order, as eager construction would, so the result
is bitwise the eager model's under the same seed, whatever order the forward
runs them in. Either pass failing leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from ._become import SHAPE_PASS, ShapeRecorder, Transaction, become
from ._deferred import BUILD_LOCK, Deferred
from ._errors import NotBuiltError
from ._naming import qualified_name, root_scope

__all__ = ["ShapePass", "build", "shape_pass"]

M = TypeVar("M", bound=nn.Module)


@dataclass
class ShapePass:
    """What a shape-only pass saw, by qualified name below the root."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # inferred arguments
    built_from: dict[str, str] = field(default_factory=dict)  # the input they came from
    outputs: dict[str, Any] = field(default_factory=dict)  # fake outputs: read shape/dtype


def _fake(example: Any, mode: Any, home: torch.device) -> Any:
    if isinstance(example, torch.Size) or (
        isinstance(example, tuple)
        and example
        and all(isinstance(s, int) and not isinstance(s, bool) for s in example)
    ):
        if any(s < 0 for s in example):
            raise ValueError(f"di.build: an example shape has a negative size: {tuple(example)}")
        with mode:
            return torch.empty(tuple(example), dtype=torch.float32, device=home)
    if isinstance(example, torch.Tensor):
        device = home if home.type == "meta" or example.device.type == "meta" else example.device
        with mode:
            return torch.empty_strided(
                tuple(example.shape), tuple(example.stride()), dtype=example.dtype, device=device
            )
    if isinstance(example, list | tuple):
        return type(example)(_fake(e, mode, home) for e in example)
    if isinstance(example, dict):
        return {k: _fake(v, mode, home) for k, v in example.items()}
    return example


def _home(module: nn.Module) -> torch.device:
    """Where shape-only examples live: with the model's real tensors if it has
    any, else on meta (placeholders and meta tensors only)."""
    devices = {
        t.device
        for t in [*module.parameters(), *module.buffers()]
        if not isinstance(t, UninitializedTensorMixin)
    }
    real = [d for d in devices if d.type != "meta"]
    return real[0] if real else torch.device("meta")


def shape_pass(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ShapePass:
    """Run ``module`` on shape-only inputs; record sizes and outputs; change nothing.

    A model of placeholders and meta tensors is first run on the meta device, which
    computes shapes fastest; if its forward needs more (it makes tensors on the
    default device, say), or the model holds real weights, it runs under torch's
    FakeTensorMode, in which real weights take part unchanged.
    """
    with BUILD_LOCK, root_scope(module), torch.random.fork_rng(devices=[]):
        home = _home(module)
        if home.type == "meta":
            try:
                return _run(module, args, kwargs, contextlib.nullcontext(), home)
            except Exception:  # noqa: S110 - retried below, where the error is raised
                pass
            home = torch.get_default_device()
        return _run(module, args, kwargs, FakeTensorMode(allow_non_fake_inputs=True), home)


def _run(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    mode: Any,
    home: torch.device,
) -> ShapePass:
    result = ShapePass()
    recorder = ShapeRecorder()
    recorded = recorder.records
    outputs: list[tuple[nn.Module, Any]] = []

    def hook(mod: nn.Module, _args: Any, output: Any) -> None:
        outputs.append((mod, output))

    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    token = SHAPE_PASS.set(recorder)
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        if isinstance(mode, FakeTensorMode):
            _fake_buffers(module, mode, saved)
        fake_args = _fake(args, mode, home)
        fake_kwargs = _fake(dict(kwargs), mode, home)
        with mode, torch.no_grad():
            module(*fake_args, **fake_kwargs)
        names: dict[int, str] = {}
        for name, sub in module.named_modules(remove_duplicate=False):
            names.setdefault(id(sub), name)  # a shared layer goes by its first name
        for layer, values, built_from, _ in recorded:
            name = names.get(id(layer))
            if name is None:
                name = qualified_name(layer, module) or ""
            result.values[name] = values
            result.built_from[name] = built_from
        for mod, output in outputs:
            if id(mod) in names:
                result.outputs.setdefault(names[id(mod)], output)
    finally:
        handle.remove()
        SHAPE_PASS.reset(token)
        for *_, txn in reversed(recorded):
            if txn is not None:
                txn.rollback()
        for owner, name, buffer in saved:
            owner._buffers[name] = buffer
    return result


def _fake_buffers(
    module: nn.Module, mode: FakeTensorMode, saved: list[tuple[nn.Module, str, torch.Tensor]]
) -> None:
    """Put fake stand-ins in place of the real buffers for the pass (a training-mode
    forward updates BatchNorm statistics in place); ``saved`` is what to put back."""
    for sub in module.modules():
        for name, b in sub._buffers.items():
            if b is None or isinstance(b, UninitializedTensorMixin) or b.device.type == "meta":
                continue
            saved.append((sub, name, b))
            sub._buffers[name] = mode.from_tensor(b)


def build(
    module: M,
    *example_args: Any,
    device: torch.device | str | None = None,
    **example_kwargs: Any,
) -> M:
    """Build every deferred layer below ``module`` from a shape-only pass.

    Examples may be tensors, shapes (tuples of ints or ``torch.Size``, float32),
    or meta/fake tensors (``torch.empty(2, 16, dtype=torch.long, device="meta")``
    for token ids). Nothing is computed and no activation memory is used.
    Layers are constructed in registration order, as eager code would, so the
    model equals the eager one under the same seed. ``device="meta"`` builds
    without allocating any parameter (then :func:`deferinit.materialize`).
    All-or-nothing: on any error the model is left as it was. Returns ``module``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = di.build(nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10)), (2, 20))
    >>> net[0], di.is_built(net)
    (Linear(in_features=20, out_features=256, bias=True), True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"di.build expects an nn.Module, got {type(module).__name__}")
    with BUILD_LOCK, root_scope(module):
        seen = shape_pass(module, example_args, example_kwargs)
        unreached = [
            name
            for name, sub in module.named_modules()
            if isinstance(sub, Deferred) and name not in seen.values
        ]
        if unreached:
            listed = ", ".join(repr(n) for n in unreached)
            raise NotBuiltError(
                f"di.build: the examples did not reach the deferred layer(s) {listed}, so "
                f"their sizes are unknown (a branch not taken, an unused head?). Nothing was "
                f"built. Fix: pass examples that run through them, or give their sizes "
                f"explicitly (e.g. dnn.Linear(10, in_features=256))."
            )
        _construct_in_registration_order(module, seen, device)
    return module


def _construct_in_registration_order(
    module: nn.Module, seen: ShapePass, device: torch.device | str | None
) -> None:
    from ._initialize import run_registered  # noqa: PLC0415 - cyclic by nature

    done: list[Transaction] = []
    try:
        # A live walk: named_modules reads a layer's children after yielding it, so
        # the deferred children that a just-built block constructs come next, in
        # eager's registration order.
        for name, sub in module.named_modules():
            if isinstance(sub, Deferred) and name in seen.values:
                done.append(
                    become(sub, seen.values[name], built_from=seen.built_from[name], device=device)
                )
                run_registered(sub)
    except BaseException:
        for txn in reversed(done):
            txn.rollback()
        raise
