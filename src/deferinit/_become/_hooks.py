"""Hooks on the call that builds a layer.

``Module._call_impl`` chooses its hooks before the placeholder's forward builds
the layer, so the hooks the layer registers in its own ``__init__`` would be
missed; the build runs the ones it skipped (:func:`own_hooks_to_run`). And the
first call is all-or-nothing up to its last forward hook
(:func:`undo_if_a_hook_fails`).
"""

from __future__ import annotations

import threading
import types
from typing import Any

from torch import nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from .._declare._deferred import BUILD_LOCK
from ._transaction import Transaction

__all__ = [
    "fast_path_taken",
    "own_hooks_to_run",
    "run_forward_hooks",
    "run_own_pre_hooks",
    "undo_if_a_hook_fails",
]


# ``Module._call_impl`` and its nested ``inner``: the frames a placeholder's
# forward is called from when called as ``module(x)``.
_CALL_IMPL = nn.Module._call_impl.__code__
_CALL_IMPL_INNER = next(
    c for c in _CALL_IMPL.co_consts if isinstance(c, types.CodeType) and c.co_name == "inner"
)
_SLOW_FORWARD = nn.Module._slow_forward.__code__
# What Module._call_impl's fast path checks.
_CALL_IMPL_TABLES = (
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
)
_GLOBAL_CALL_IMPL_TABLES = (
    _global_backward_pre_hooks,
    _global_backward_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)


def own_hooks_to_run(caller: types.FrameType | None, module: nn.Module) -> str:
    """Which of the hooks the layer registers in its own ``__init__`` this build
    must run itself, given the frame that called the placeholder's forward.

    ``Module._call_impl`` chose its hooks before the layer existed. With none on
    the placeholder it took its fast path and runs no hook at all: ``"all"``.
    Otherwise (its ``inner``) it already ran its pre-hooks but reads the forward
    hooks after the forward, the layer's own included: ``"pre"``. Called
    directly (``module.forward(x)``), eager torch runs no hook either: ``"none"``.
    """
    if caller is not None and caller.f_code is _SLOW_FORWARD:  # under torch.jit.trace
        caller = caller.f_back
    if caller is None or caller.f_locals.get("self") is not module:
        return "none"
    if caller.f_code is _CALL_IMPL:
        return "all"
    if caller.f_code is _CALL_IMPL_INNER:
        return "pre"
    return "none"


def run_own_pre_hooks(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], own_hooks: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run the forward pre-hooks the layer's own ``__init__`` registered, as
    ``Module._call_impl`` would have (see :func:`own_hooks_to_run`)."""
    if own_hooks == "none":
        return args, kwargs
    d = module.__dict__
    table, with_kwargs = d["_forward_pre_hooks"], d["_forward_pre_hooks_with_kwargs"]
    for hook_id in d["_di"].own_hooks.get("_forward_pre_hooks", []):
        hook = table.get(hook_id)
        if hook is None:  # removed by the initializer
            continue
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "forward pre-hook must return None or a tuple "
                        f"of (new_args, new_kwargs), but got {result}."
                    )
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def run_forward_hooks(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """Run the forward hooks (only the layer's own: ``Module._call_impl`` took its
    fast path, so the placeholder had none) as ``Module._call_impl`` would have."""
    d = module.__dict__
    with_kwargs = d["_forward_hooks_with_kwargs"]
    for hook_id, hook in list(d["_forward_hooks"].items()):
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def undo_if_a_hook_fails(module: nn.Module, txn: Transaction) -> None:
    """Make the first call all-or-nothing up to its last forward hook.

    ``Module.__call__`` runs the forward hooks after this build returned. For that
    one call, each hook is wrapped: if one raises (Ctrl-C included), the build is
    undone and the error goes on unchanged; after the last hook the layer's own
    table is back. Same hook ids, so torch's with-kwargs bookkeeping still applies;
    calls from other threads meanwhile run the hooks as they are.
    """
    watch = _HookWatch(module, txn)
    items = list(watch.table.items())
    module.__dict__["_forward_hooks"] = {
        hook_id: watch.wrap(hook, last=i == len(items) - 1)
        for i, (hook_id, hook) in enumerate(items)
    }


class _HookWatch:
    def __init__(self, module: nn.Module, txn: Transaction) -> None:
        self.module = module
        self.txn = txn
        self.table = module.__dict__["_forward_hooks"]
        self.builder = threading.get_ident()
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.module.__dict__["_forward_hooks"] = self.table

    def wrap(self, hook: Any, *, last: bool) -> Any:
        def run(*hook_args: Any) -> Any:
            if not self.open or threading.get_ident() != self.builder:
                return hook(*hook_args)
            try:
                result = hook(*hook_args)
            except BaseException:
                self.close()
                with BUILD_LOCK:
                    self.txn.rollback()
                raise
            if last:
                self.close()
            return result

        return run


def fast_path_taken(module: nn.Module) -> bool:
    """Whether ``Module._call_impl`` skips every hook for ``module`` now: neither
    it nor the process has any."""
    d = module.__dict__
    return not (any(d[k] for k in _CALL_IMPL_TABLES) or any(_GLOBAL_CALL_IMPL_TABLES))
