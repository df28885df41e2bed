"""Inspecting and resetting deferred state: ``is_built``, ``pending``, ``reset``."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from .._declare._deferred import BUILD_LOCK, Deferred
from .._declare._layout import layout_of
from .._declare._placeholder import Holder, install_placeholders, placeholder_tensors
from .._declare._state import State, replace
from .._lazy import waiting_lazy
from .._tensors import table_of, tensor_at
from ._transaction import hook_tables

__all__ = ["is_built", "pending", "reset"]

M = TypeVar("M", bound=nn.Module)


def _check(module: object, fn: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"di.{fn} expects an nn.Module, got {type(module).__name__}")


def pending(module: nn.Module) -> list[str]:
    """Qualified names of the layers below ``module`` that are still deferred,
    in registration order (``""`` for ``module`` itself): deferinit's layers not yet
    built, and torch's own ``nn.Lazy*`` modules still waiting for their first
    forward (which :func:`deferinit.adopt` turns into deferinit layers).

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    >>> di.pending(net)
    ['0', '2']
    >>> _ = net(torch.randn(1, 3)); di.pending(net)
    []
    """
    _check(module, "pending")
    return [
        name
        for name, sub in module.named_modules()
        if (isinstance(sub, Deferred) or waiting_lazy(sub))
        and not _inside_placeholder(module, name)
    ]


def _inside_placeholder(root: nn.Module, name: str) -> bool:
    parts = name.split(".") if name else []
    sub = root
    for part in parts[:-1]:
        sub = sub._modules[part]  # type: ignore[assignment]
        if isinstance(sub, Deferred | Holder):
            return True
    return False


def is_built(module: nn.Module) -> bool:
    """Whether no layer below ``module`` (or ``module`` itself) is still deferred:
    neither a deferinit layer nor a torch ``nn.Lazy*`` module waiting for its first
    forward (the layers :func:`pending` lists).

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> net = torch.nn.Sequential(dnn.Linear(2))
    >>> di.is_built(net)
    False
    >>> _ = net(torch.randn(1, 3))
    >>> di.is_built(net)
    True
    """
    _check(module, "is_built")
    return not any(isinstance(sub, Deferred) or waiting_lazy(sub) for sub in module.modules())


def reset(module: M) -> M:
    """Turn every layer below ``module`` that deferinit built back into a deferred
    layer: sizes are forgotten, so the next input infers them again. Initializers,
    hooks, train/eval mode, dtype, device and the parameter objects themselves are
    kept (emptied in place), so optimizers holding them keep training the model
    after the next build. Only what deferinit created is forgotten: a tensor the
    layer kept from before its build (a tie such as ``head.weight = emb.weight``)
    stays as it is and fixes its sizes again. Layers whose sizes were all given
    explicitly are left as they are. Returns ``module``.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4)
    >>> _ = layer(torch.randn(1, 3))
    >>> _ = di.reset(layer)
    >>> layer(torch.randn(1, 5)).shape, layer.in_features
    (torch.Size([1, 4]), 5)
    """
    _check(module, "reset")
    with BUILD_LOCK:
        # Innermost first, so a reset block does not keep stale built children.
        for sub in reversed(list(module.modules())):
            unbecome(sub)
    return module


def unbecome(module: nn.Module) -> bool:
    """Turn a layer that deferinit built back into a placeholder (``di.reset``).

    Sizes are forgotten; initializers, hooks, train/eval mode, dtype, device and
    the attributes and submodules a user set on the layer are kept, and so are
    the parameter objects (emptied in place), so an optimizer that holds them
    keeps training them after the next build. Tensors the layer kept from before
    its build (ties) are not deferinit's: they stay as they are, and fix the
    sizes again at the next build. Returns whether anything changed.
    """
    state: State | None = module.__dict__.get("_di")
    if state is None or isinstance(module, Deferred):
        return False
    cls = state.deferred
    if len(state.explicit) == len(cls._di_rules):
        return False  # every size was given: nothing to forget
    fresh = replace(
        state,
        values=None,
        built_from=None,
        own_hooks={},
        ties=(),
        built_keys=frozenset(),
        built_modules=frozenset(),
        queued=None,
    )
    fresh.layout = layout_of(cls, fresh)
    placeholder = cls.__new__(cls)
    nn.Module.__init__(placeholder)
    object.__setattr__(placeholder, "_di", fresh)
    install_placeholders(placeholder, fresh.layout, state.arguments.get("device"))
    to_empty = [
        kept
        for name, _ in placeholder_tensors(placeholder)
        if (kept := _keep_object(module, placeholder, name, emptied=name not in state.ties))
    ]
    current = module.__dict__
    new = placeholder.__dict__
    for key in hook_tables(current):
        table = current[key]
        for k in state.own_hooks.get(key, []):
            table.pop(k, None)
        new[key] = table
    new["training"] = current.get("training", True)
    new["_is_full_backward_hook"] = current.get("_is_full_backward_hook")
    # What the user put on the layer (before or after its build) stays.
    new.update(
        (k, v)
        for k, v in current.items()
        if k not in state.built_keys and k not in new and k != "forward" and not k.startswith("_di")
    )
    modules = new["_modules"]
    for name, sub in current["_modules"].items():
        if name not in state.built_modules and name not in modules:
            modules[name] = sub
    # The placeholder first, then the emptying: a call racing the reset now goes to
    # the placeholder's forward (which waits on the build lock), never to the built
    # class's forward over emptied tensors.
    object.__setattr__(module, "__class__", cls)
    object.__setattr__(module, "__dict__", new)
    for sub in placeholder.modules():
        sub.training = new["training"]
    for old, kind in to_empty:
        old.grad = None  # a gradient of the old sizes would not fit the next build
        # torch keeps a tensor's gradient accumulator (and the sizes it expects) while a
        # graph from before holds it, across .data assignments of another shape; one of
        # another dtype drops it, so the next build's graph gets one of its own sizes.
        dtype, device = old.dtype, old.device
        other = torch.float64 if dtype != torch.float64 else torch.float32
        old.data = torch.empty(0, dtype=other, device=device)
        old.data = torch.empty(0, dtype=dtype, device=device)
        old.__class__ = kind
    return True


def _keep_object(
    module: nn.Module, placeholder: nn.Module, name: str, *, emptied: bool
) -> tuple[torch.Tensor, type] | None:
    """Put the built layer's tensor object ``name`` into the new placeholder's slot.
    Returns it with the placeholder class it is to be turned into (in place, once
    the layer is a placeholder again), or None for a tie or an empty slot."""
    old = tensor_at(module, name)
    if old is None:
        return None
    owner_name, _, leaf = name.rpartition(".")
    target = placeholder.get_submodule(owner_name) if owner_name else placeholder
    table = table_of(target, leaf)
    slot = table[leaf]
    table[leaf] = old  # type: ignore[assignment]
    if emptied and slot is not None:
        return old, type(slot)
    return None
