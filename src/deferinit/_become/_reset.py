"""Inspecting and resetting deferred state: ``is_built``, ``pending``, ``reset``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._declare._deferred import BUILD_LOCK, Deferred
from .._declare._layout import Layout, layout_of
from .._declare._placeholder import Holder, install_placeholders, placeholder_tensors
from .._declare._state import State, replace
from .._errors import ArgumentsError, DeferredInitError
from .._lazy import waiting_lazy
from .._naming import label, root_scope
from .._tensors import table_of, tensor_at
from ._transaction import hook_tables

__all__ = ["is_built", "pending", "reset"]

M = TypeVar("M", bound=nn.Module)


def _check(module: object, fn: str) -> None:
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.{fn} expects an nn.Module, got {type(module).__name__}. Fix: pass the model."
        )


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
    stays as it is and fixes its sizes again; so do the parameters and buffers a
    user registered on the layer. Layers whose sizes were all given explicitly are
    left as they are. A layer carrying a reparametrization (pruning,
    ``torch.nn.utils.parametrize``, weight or spectral normalization), which its
    rebuild would lose, is a :class:`DeferredInitError` before any layer is reset.
    Returns ``module``.

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
        layers = [
            (sub, state) for sub in reversed(list(module.modules())) if (state := _resettable(sub))
        ]
        # Every layer is checked before any is reset: a refusal leaves the model as it was.
        with root_scope(module):
            kept = [_tensors_to_keep(sub, state) for sub, state in layers]
        for (sub, state), users in zip(layers, kept, strict=True):
            unbecome(sub, state, users)
    return module


def _resettable(module: nn.Module) -> State | None:
    """The state of ``module`` if it is a layer deferinit built with a size it inferred."""
    state: State | None = module.__dict__.get("_di")
    if state is None or isinstance(module, Deferred):
        return None
    if len(state.explicit) == len(state.deferred._di_rules):
        return None  # every size was given: nothing to forget
    return state


def unbecome(module: nn.Module, state: State, users: tuple[str, ...]) -> None:
    """Turn ``module``, a layer that deferinit built (``state``: :func:`_resettable`),
    back into a placeholder (``di.reset``).

    Sizes are forgotten; initializers, hooks, train/eval mode, dtype, device and
    the attributes, submodules and parameters or buffers (``users``: their names)
    a user set on the layer are kept, and so are the parameter objects (emptied in
    place), so an optimizer that holds them keeps training them after the next
    build. Tensors the layer kept from before its build (ties) are not deferinit's:
    they stay as they are, and fix the sizes again at the next build.
    """
    cls = state.deferred
    fresh = replace(
        state,
        values=None,
        built_from=None,
        own_hooks={},
        ties=(),
        built_keys=frozenset(),
        built_modules=frozenset(),
        queued=None,
        meta_versions=None,
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
    for name in users:  # the next build keeps them, as it kept those set before it
        table = "_parameters" if name in current["_parameters"] else "_buffers"
        new[table][name] = current[table][name]
        if name in current["_non_persistent_buffers_set"]:
            new["_non_persistent_buffers_set"].add(name)
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


def _tensors_to_keep(layer: nn.Module, state: State) -> tuple[str, ...]:
    """The names of the parameters and buffers a user registered on ``layer`` itself
    (before or after its build), which reset keeps; a ``DeferredInitError`` where
    the layer carries what its rebuild would lose: a reparametrization, which
    moves the constructor's tensors under other names and recomputes them (pruning,
    ``parametrize``, old-style weight or spectral norm), or tensors of its
    constructor's submodules that reset would drop with them."""
    owners = dict(_constructors_modules(layer, state))
    found = [finding for prefix, sub in owners.items() for finding in _reparametrized(prefix, sub)]
    present = {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in owners.items()
        for name in (*sub._parameters, *sub._buffers)
    }
    made = _made_names(state, owners, present)
    missing = sorted(made - present)
    dropped = sorted(n for n in present - made if "." in n)
    if missing and not found:  # torch's reparametrizations are named above
        shown = ", ".join(missing)
        found.append(
            (
                f"no parameter or buffer {shown} of its own, which its constructor makes "
                f"(replaced or moved, as a reparametrization does)",
                f"put {shown} back as the layer's own parameter or buffer",
            )
        )
    if dropped:
        shown = ", ".join(dropped)
        found.append(
            (
                f"{shown}, registered on a submodule its constructor makes (the rebuild "
                f"makes that submodule again, without them)",
                f"delete {shown}",
            )
        )
    if found:
        what = "; ".join(w for w, _ in found)
        undo = "; ".join(u for _, u in found)
        raise DeferredInitError(
            f"{label(layer)} carries {what}: di.reset rebuilds the layer from its "
            f"constructor and would lose it. Nothing was reset. Fix: {undo} first, then "
            f"call di.reset, and apply it again after the rebuild (the next forward or "
            f"di.build)."
        )
    return tuple(n for n in (*layer._parameters, *layer._buffers) if n not in made)


def _constructors_modules(layer: nn.Module, state: State) -> Iterator[tuple[str, nn.Module]]:
    """``layer`` and the submodules its own construction made, by qualified name within
    it; not a user's submodule (reset keeps it as it is) nor a deferinit layer inside
    (one of its own, reset on its own)."""
    yield "", layer
    stack = [(name, sub) for name, sub in layer._modules.items() if name in state.built_modules]
    while stack:
        prefix, sub = stack.pop()
        if sub is None or "_di" in sub.__dict__:
            continue
        yield prefix, sub
        stack += [(f"{prefix}.{name}", child) for name, child in sub._modules.items()]


def _made_names(state: State, owners: dict[str, nn.Module], present: set[str]) -> frozenset[str]:
    """The names of the tensors the layer's constructor makes on ``owners``: those
    its declaration showed, else (names that depend on the sizes, as
    MultiheadAttention's with a kdim of its own) those of a construction with the
    built sizes."""
    names = _names_on(state.layout, owners)
    if names == present or state.values is None:  # the common case: nothing to tell apart
        return names
    built = replace(state, explicit={**state.explicit, **state.values})
    return _names_on(layout_of(state.deferred, built), owners)


def _names_on(layout: Layout | None, owners: dict[str, nn.Module]) -> frozenset[str]:
    if layout is None:
        return frozenset()
    return frozenset(spec.name for spec in layout.tensors if spec.name.rpartition(".")[0] in owners)


def _reparametrized(prefix: str, module: nn.Module) -> Iterator[tuple[str, str]]:
    """Each reparametrization torch applied to ``module`` (at ``prefix`` within the
    layer reset), as what it is and the call that takes it off."""
    at = f"layer.{prefix}" if prefix else "layer"
    dot = f"{prefix}." if prefix else ""
    if parametrize.is_parametrized(module):
        for name in cast(nn.ModuleDict, module.parametrizations):
            yield (
                f"a parametrization of {dot}{name} (torch.nn.utils.parametrize)",
                f"torch.nn.utils.parametrize.remove_parametrizations({at}, {name!r})",
            )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            name = hook._tensor_name
            yield (
                f"pruning of {dot}{name} (torch.nn.utils.prune)",
                f"torch.nn.utils.prune.remove({at}, {name!r})",
            )
        elif isinstance(hook, WeightNorm):
            yield (
                f"weight normalization of {dot}{hook.name} (torch.nn.utils.weight_norm)",
                f"torch.nn.utils.remove_weight_norm({at}, {hook.name!r})",
            )
        elif isinstance(hook, SpectralNorm):
            yield (
                f"spectral normalization of {dot}{hook.name} (torch.nn.utils.spectral_norm)",
                f"torch.nn.utils.remove_spectral_norm({at}, {hook.name!r})",
            )
