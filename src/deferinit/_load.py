"""``di.load_state_dict``: load a checkpoint without a random initialization first.

Deferred layers take their sizes from the checkpoint's shapes and are built on
``meta`` (no memory, no random numbers); every key is checked against the model
before anything is assigned; then the saved tensors are put *under* the existing
parameter objects (``torch.utils.swap_tensors``), so nothing is allocated twice
and an optimizer created before loading holds the loaded values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ._become import Transaction, become
from ._checkpoint import infer_from_shapes
from ._deferred import BUILD_LOCK, Deferred, placeholder_tensors
from ._errors import DeferredInitError
from ._naming import label, root_scope

__all__ = ["load_state_dict"]

M = TypeVar("M", bound=nn.Module)

Source = Mapping[str, torch.Tensor] | str | os.PathLike[str]


def _read(source: Source) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"di.load_state_dict: no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415 - optional at import time

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise DeferredInitError(
            f"di.load_state_dict: {str(path)!r} holds a {type(loaded).__name__}, not a state "
            f"dict. Fix: save model.state_dict(), not the model."
        )
    return dict(loaded)


def load_state_dict(module: M, source: Source, *, strict: bool = True) -> M:
    """Load ``source`` (a state dict, a ``.safetensors`` file, or a torch file read
    with ``weights_only=True``) into a built, unbuilt or meta-built ``module``.

    Unbuilt layers take their sizes from the checkpoint; nothing is randomly
    initialized first and nothing is allocated twice. With ``strict`` every key
    must match (missing, unexpected and mis-shaped keys are listed), and the
    model is left unchanged on any mismatch. Returns ``module``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> saved = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)).state_dict()
    >>> net = di.load_state_dict(nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10)), saved)
    >>> net[0], torch.equal(net[2].weight, saved["2.weight"])
    (Linear(in_features=20, out_features=256, bias=True), True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"di.load_state_dict expects an nn.Module, got {type(module).__name__}")
    state = _read(source)
    with BUILD_LOCK, root_scope(module):
        done: list[Transaction] = []
        try:
            _build_from(module, state, done)
            _check_keys(module, state, strict)
            if _has_meta(module):
                _assign(module, state)
            else:
                module.load_state_dict(state, strict=strict)
        except BaseException:
            for txn in reversed(done):
                txn.rollback()
            raise
    return module


def _build_from(module: nn.Module, state: Mapping[str, torch.Tensor], done: list[Any]) -> None:
    # A live walk: a block built here may construct deferred children, next in order.
    for name, sub in module.named_modules():
        if not isinstance(sub, Deferred):
            continue
        prefix = name + "." if name else ""
        names = {n for n, _ in placeholder_tensors(sub)}
        shapes = {
            key[len(prefix) :]: tuple(value.shape)
            for key, value in state.items()
            if key.startswith(prefix) and key[len(prefix) :] in names
        }
        if not shapes:
            continue  # no keys: stays deferred; strict loading reports them missing
        values, problems = infer_from_shapes(sub, shapes)
        if problems:
            raise DeferredInitError(
                f"di.load_state_dict: {label(sub)} cannot take its sizes from the "
                f"checkpoint: {'; '.join(problems)}. Nothing was loaded. Fix: check that "
                f"the checkpoint belongs to this model (keys under {prefix!r})."
            )
        done.append(become(sub, values, built_from="a checkpoint", device="meta"))


def _assign(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Meta tensors take the saved tensor itself (no copy, no second allocation),
    under the same Python object where possible; real ones are copied into."""
    for owner_name, owner in module.named_modules():
        prefix = owner_name + "." if owner_name else ""
        for table in (owner._parameters, owner._buffers):
            for leaf, old in list(table.items()):
                key = prefix + leaf
                if old is None or key not in state:
                    continue
                new = state[key]
                if old.device.type != "meta":
                    with torch.no_grad():
                        old.copy_(new)
                    continue
                # A new object over the same storage: the swap must not turn the
                # caller's own tensor into the meta placeholder.
                new = new.to(dtype=old.dtype) if new.dtype != old.dtype else new.detach()
                fresh: torch.Tensor = (
                    nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter)
                    else new
                )
                try:
                    torch.utils.swap_tensors(old, fresh)
                except RuntimeError:  # weak references (RNN weights): replace instead
                    setattr(owner, leaf, fresh)


def _has_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


def _check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool) -> None:
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misfit = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state
        and not isinstance(t, nn.parameter.UninitializedTensorMixin)  # type: ignore[attr-defined]
        and tuple(t.shape) != tuple(state[k].shape)
    ]
    problems = [f"size mismatch: {', '.join(misfit)}"] if misfit else []
    if strict:
        problems += [f"missing keys: {', '.join(missing)}"] if missing else []
        problems += [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []
    if problems:
        raise DeferredInitError(
            f"di.load_state_dict: the checkpoint does not fit {type(module).__name__}: "
            f"{'; '.join(problems)}. Nothing was loaded. Fix: load the checkpoint of this "
            f"model, or pass strict=False to skip missing and unexpected keys."
        )
