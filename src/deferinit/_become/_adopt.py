"""The placeholders take over the real layer's fresh tensors, keeping their
identity (an optimizer made before the build holds them), and ties assigned
before the build are kept and checked against the layer being built.

A flat layer makes its placeholders only when first looked at
(``placeholders_made``): on the common first forward no one did, none exists, and
the layer simply keeps its fresh tensors, as eager construction leaves them. Once
made, a placeholder is always kept, whoever still holds it: a user who kept only
its ``id()`` finds the same object after the build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._declare._deferred import placeholders_made
from .._declare._pending import (
    DTYPES,
    QUEUE,
    Call,
    convert_through,
    dtypes_passed,
    pending_calls,
    run_pending,
    take_pending,
)
from .._declare._placeholder import placeholder_tensors
from .._declare._rules import Described
from .._errors import ShapeMismatchError
from .._naming import label
from .._swap import exchange_or_raise
from .._tensors import kind_of, table_of, tensor_at
from ._transaction import Transaction

__all__ = ["adopt_placeholders", "check_ties", "sizes_text"]


def sizes_text(values: Mapping[str, Any]) -> str:
    """``"in_features=4, out_features=3"``: the sizes of a build, for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def check_ties(
    module: nn.Module, real: nn.Module, values: dict[str, Any], built_from: str | Described | None
) -> None:
    """A real tensor assigned to the placeholder before the build (a tie such as
    ``head.weight = emb.weight``) is kept, so it must fit the layer being built:
    checked before anything changes."""
    if not placeholders_made(module):
        return  # made when first looked at: no one assigned a tie
    if not module._modules and all(
        t is None or isinstance(t, UninitializedTensorMixin)
        for t in (*module._parameters.values(), *module._buffers.values())
    ):
        return  # the common flat layer with no tie
    for name, tensor in placeholder_tensors(module):
        if isinstance(tensor, UninitializedTensorMixin):
            continue
        fresh = tensor_at(real, name)
        if fresh is None or tuple(fresh.shape) == tuple(tensor.shape):
            continue
        got = f" (inferred from {built_from})" if built_from else ""
        raise ShapeMismatchError(
            f"{label(module)}: {name} was assigned a tensor of shape {tuple(tensor.shape)} "
            f"before the build (a tie, such as head.weight = emb.weight), but the sizes "
            f"{sizes_text(values)}{got} give it shape {tuple(fresh.shape)}. The layer is left "
            f"unbuilt. Fix: pass an input whose sizes agree with the assigned tensor, or "
            f"assign a tensor that fits."
        )


def adopt_placeholders(
    module: nn.Module,
    real: nn.Module,
    txn: Transaction,
    *,
    keep_device: bool,
    run: Callable[[list[Call]], None] = run_pending,
) -> tuple[list[str], dict[str, tuple[torch.Tensor, list[Call]]]]:
    """Put the placeholders' objects in place of the real layer's fresh tensors, then
    run the init calls that waited on them (on real values; on meta they wait on for
    ``di.materialize``); returns the names that held a real tensor (ties), which the
    layer keeps, and, where init calls wait on meta, every adopted placeholder with
    the calls waiting on it, by name (``State.queued``: sharding, or a copy, gives
    the layer tensors that carry no queue, so ``di.materialize`` finds the calls by
    name)."""
    if not placeholders_made(module):
        return [], {}  # no one has seen a placeholder: the fresh tensors stay
    _convert_unplaced(module, real, keep_device=keep_device)  # before any is adopted
    ties: list[str] = []
    became: dict[str, torch.Tensor] = {}
    adopted: dict[int, torch.Tensor] = {}  # real tensor -> the placeholder now holding it
    for name, placeholder in placeholder_tensors(module):
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = real.get_submodule(owner_name) if owner_name else real
        except AttributeError:
            continue
        table = table_of(owner, leaf)
        value = table.get(leaf)
        if value is None:
            continue
        if not isinstance(placeholder, UninitializedTensorMixin):
            # Assigned before the build (head.weight = emb.weight), or another
            # layer's placeholder that its build made real: the tie is kept, as
            # eager code assigning it after construction would have it.
            table[leaf] = placeholder  # type: ignore[assignment]
            ties.append(name)
            continue
        if isinstance(value, UninitializedTensorMixin):
            # A deferred layer inside a block: it adopts this placeholder when it
            # builds, so an optimizer made before the block's build holds it too.
            # Init calls the block's __init__ queued on the fresh one move with it.
            _move_queue(value, placeholder, txn)
            table[leaf] = placeholder  # type: ignore[assignment]
            continue
        if id(value) in adopted:  # tied in the layer (e.g. head.weight = emb.weight)
            table[leaf] = adopted[id(value)]  # type: ignore[assignment]
            continue
        adopted[id(value)] = placeholder
        data = value.data
        device = data.device if keep_device else placeholder.device
        passed = dtypes_passed(placeholder)
        if passed:  # .half().float(): rounded through half precision, as eager's
            data = convert_through(data, passed)
        if data.dtype != placeholder.dtype or data.device != device:
            # The user moved the placeholder (.double(), .to(device)): as eager code
            # would, initialize in the constructor's dtype and device, then convert.
            data = data.to(device=device, dtype=placeholder.dtype)
        if data.device.type == placeholder.device.type:
            txn.tensors.append((placeholder, type(placeholder), placeholder.data))
            placeholder.data = data
            placeholder.__class__ = placeholder.cls_to_become  # type: ignore[attr-defined, union-attr]
        else:
            # .data cannot change the kind of tensor (cpu -> meta): swap the tensors
            # under the Python objects instead; identity is kept all the same.
            if isinstance(placeholder, nn.Parameter):
                built = value if data is value.data else nn.Parameter(data)
            else:
                built = data
            built.requires_grad_(placeholder.requires_grad)
            # Python weak references (RNNs keep them to their weights, users to
            # anything) do not block this swap: the object keeps its identity.
            named = f"{kind_of(placeholder)} {name!r}"
            exchange_or_raise(
                placeholder,
                built,
                functools.partial(_building, module, named),
                "drop those references (del them) and build the layer again. The layer "
                "is left unbuilt.",
            )
            txn.swaps.append((placeholder, type(placeholder), built))
            placeholder.__class__ = placeholder.cls_to_become  # type: ignore[attr-defined, union-attr]
        table[leaf] = placeholder  # type: ignore[assignment]
        became[name] = placeholder
    calls = []
    waiting: dict[str, tuple[torch.Tensor, list[Call]]] = {}
    for name, tensor in became.items():
        removed = take_pending(tensor, keep_queue=tensor.is_meta)
        txn.notes.append((tensor, removed))
        calls += removed.get(QUEUE, [])
        waiting[name] = (tensor, pending_calls(tensor))
    if calls:
        # Right after construction, in the order they were made (the registered
        # initializer, if any, runs next); ``run`` draws a copy's as its first one did.
        run(calls)
    return ties, waiting if any(queue for _, queue in waiting.values()) else {}


def _move_queue(fresh: torch.Tensor, kept: torch.Tensor, txn: Transaction) -> None:
    """The init calls waiting on ``fresh`` (a placeholder a block's ``__init__`` made
    and queued calls on, ``self.b.weight.data.normal_(0, 0.01)``) wait on ``kept``
    instead, the placeholder the model holds under that name: they run when the
    layer builds, in program order with the ones already there. Undone with the
    build (``kept``'s own queue comes back as it was)."""
    moved = pending_calls(fresh)
    if not moved or fresh is kept:
        return

    def swap(x: Any) -> Any:
        return kept if x is fresh else x

    calls: list[Call] = [
        (seq, func, tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()})
        for seq, func, args, kwargs in moved
    ]
    before = pending_calls(kept)
    txn.notes.append((kept, {QUEUE: before}))
    kept.__dict__[QUEUE] = [*before, *calls]


def _convert_unplaced(module: nn.Module, real: nn.Module, *, keep_device: bool) -> None:
    """The real layer's tensors under names that have no placeholder (a
    MultiheadAttention whose inferred kdim differs from embed_dim has
    ``q_proj_weight`` where its placeholders have ``in_proj_weight``) take the
    conversions the layer's placeholders took, as eager's conversion after
    construction converts every tensor alike: the placeholders' common dtype (and
    the dtypes they passed through) for a floating tensor, device, and
    ``requires_grad`` for a parameter. Where the placeholders disagree (converted
    one by one), that conversion is not guessed: the tensor stays as constructed."""
    if (
        not real._modules
        and real._parameters.keys() == module._parameters.keys()
        and real._buffers.keys() == module._buffers.keys()
    ):
        return  # the common flat layer: every name has its placeholder
    placeholders = dict(placeholder_tensors(module))
    fresh = [
        (name, t)
        for name, t in [
            *real.named_parameters(remove_duplicate=False),
            *real.named_buffers(remove_duplicate=False),
        ]
        if name not in placeholders
    ]
    if not fresh:
        return
    waiting = [t for t in placeholders.values() if isinstance(t, UninitializedTensorMixin)]
    floats = {(t.dtype, dtypes_passed(t)) for t in waiting if t.dtype.is_floating_point}
    devices = {t.device for t in waiting}
    grads = {t.requires_grad for t in waiting if isinstance(t, nn.Parameter)}
    done: dict[int, torch.Tensor] = {}  # a tensor under two names is converted once
    for name, value in fresh:
        owner_name, _, leaf = name.rpartition(".")
        table = table_of(real.get_submodule(owner_name), leaf)
        if id(value) in done:
            table[leaf] = done[id(value)]
            continue
        data = original = value.data
        passed: tuple[torch.dtype, ...] = ()
        if len(floats) == 1 and data.dtype.is_floating_point:
            ((dtype, passed),) = floats
            data = convert_through(data, passed).to(dtype=dtype)
        if len(devices) == 1 and not keep_device:
            data = data.to(device=next(iter(devices)))
        converted = value
        if data is not original:
            if torch._has_compatible_shallow_copy_type(value, data):
                value.data = data
            else:  # cpu -> meta: a new tensor (no one else holds the fresh one)
                keep = value.requires_grad
                converted = nn.Parameter(data, keep) if isinstance(value, nn.Parameter) else data
                table[leaf] = converted
        if len(grads) == 1 and isinstance(value, nn.Parameter):
            converted.requires_grad_(*grads)
        if passed and converted.is_meta:  # for di.materialize, as on the placeholders
            converted.__dict__[DTYPES] = passed
        done[id(value)] = converted


def _building(module: nn.Module, tensor: str) -> str:
    """The start of a failed swap's message (naming the layer walks the model)."""
    return f"building {label(module)}: {tensor}"
