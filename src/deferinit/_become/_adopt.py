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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._declare._deferred import placeholders_made
from .._declare._pending import QUEUE, Call, pending_calls, run_pending, take_pending
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
    module: nn.Module, real: nn.Module, txn: Transaction, *, keep_device: bool
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
            table[leaf] = placeholder  # type: ignore[assignment]
            continue
        if id(value) in adopted:  # tied in the layer (e.g. head.weight = emb.weight)
            table[leaf] = adopted[id(value)]  # type: ignore[assignment]
            continue
        adopted[id(value)] = placeholder
        data = value.data
        device = data.device if keep_device else placeholder.device
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
        # initializer, if any, runs next).
        run_pending(calls)
    return ties, waiting if any(queue for _, queue in waiting.values()) else {}


def _building(module: nn.Module, tensor: str) -> str:
    """The start of a failed swap's message (naming the layer walks the model)."""
    return f"building {label(module)}: {tensor}"
