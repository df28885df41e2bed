"""The placeholder tensors a deferred layer owns before its sizes are known, and
how they are installed under the built layer's names and saved.

They are torch's ``UninitializedParameter``/``UninitializedBuffer`` (so torch's
own checks, such as DDP's, recognise them) that also accept ``requires_grad_``:
``model.requires_grad_(False)`` before the first forward must carry over to the
built layer (torch's classes refuse every in-place call). In-place initialization
on them waits for the build (:mod:`._pending`).
"""

from __future__ import annotations

from contextlib import nullcontext
from copy import deepcopy
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from .._errors import NotBuiltError
from .._naming import label
from ._layout import NOT_PLAIN, Layout, TensorSpec, provisional_constructor
from ._pending import DTYPES, QUEUE, refuse, set_owner, waiting_torch_function

__all__ = [
    "Holder",
    "PlaceholderBuffer",
    "PlaceholderParameter",
    "flat_placeholders",
    "install_placeholders",
    "layer_attribute",
    "placeholder_tensors",
    "save_placeholders",
]


# Beside torch's list (half, float, double, to, cpu, cuda ...): what nn.Module's own
# conversions call on a tensor, so that they carry over to the built layer as eager's
# do (module.bfloat16(), module.type(torch.float64)), and requires_grad_.
_MOVES = [torch.Tensor.requires_grad_, torch.Tensor.bfloat16, torch.Tensor.type]


class _Portable:
    """Copies and pickles that keep dtype and device (torch's keep only requires_grad)."""

    requires_grad: bool
    device: torch.device
    dtype: torch.dtype

    _allowed_methods: list[Any]

    def __reduce_ex__(self, proto: Any) -> Any:
        # The waiting init calls travel along (they refer to the placeholder itself,
        # which pickle has memoized by the time it writes the state), and so do the
        # dtypes it was converted through.
        state = {k: self.__dict__[k] for k in (QUEUE, DTYPES) if k in self.__dict__}
        return (type(self), (self.requires_grad, self.device, self.dtype), state or None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:
            copy = type(self)(self.requires_grad, self.device, self.dtype)  # type: ignore[call-arg]
            memo[id(self)] = copy
            if DTYPES in self.__dict__:
                copy.__dict__[DTYPES] = self.__dict__[DTYPES]
            if QUEUE in self.__dict__:
                copy.__dict__[QUEUE] = [
                    (n, f, deepcopy(a, memo), deepcopy(k, memo))
                    for n, f, a, k in self.__dict__[QUEUE]
                ]
        return memo[id(self)]

    @property
    def shape(self) -> torch.Size:
        raise refuse(self, "Tensor.shape")

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        return waiting_torch_function(cls, func, types, args, kwargs)


class PlaceholderParameter(_Portable, UninitializedParameter):  # type: ignore[override]
    """An ``UninitializedParameter`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedParameter._allowed_methods,  # type: ignore[attr-defined]
        *_MOVES,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedParameter>"


class PlaceholderBuffer(_Portable, UninitializedBuffer):  # type: ignore[override]
    """An ``UninitializedBuffer`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedBuffer._allowed_methods,  # type: ignore[attr-defined]
        *_MOVES,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedBuffer>"


class Holder(nn.Module):
    """A submodule of a placeholder that only holds placeholders (e.g. ``out_proj``),
    so that ``state_dict`` keys equal the built layer's before the build."""

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        save_placeholders(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # The owning placeholder loads every key of the layer itself.
        return None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            d = self.__dict__
            if "_di_owner" not in d:
                raise
            found = layer_attribute(d["_di_owner"], d["_di_path"], name)
            if found is NOT_PLAIN:
                raise
            return found


# Names Python, copy, pickle and inspect probe on any object (``inspect.signature``
# reads ``_partialmethod``): never a layer's, and not worth a construction.
_PROTOCOL = ("__", "_di", "_partialmethod")


class _NotBuiltAttributeError(NotBuiltError, AttributeError):
    """An attribute that depends on an inferred size, read before the build; also an
    ``AttributeError`` so ``hasattr`` works."""


def layer_attribute(owner: nn.Module, path: str, name: str) -> Any:
    """The plain attribute ``name`` that the built layer's submodule ``path`` will
    have (torch's ``TransformerEncoder`` reads ``layer.self_attn.batch_first`` before
    any layer runs); :data:`NOT_PLAIN` where the built layer has no such attribute.
    Raise :class:`_NotBuiltAttributeError` where it depends on an inferred size."""
    state = owner.__dict__.get("_di")
    if state is None or name.startswith(_PROTOCOL):
        return NOT_PLAIN
    layout = state.layout
    if layout is None:
        return NOT_PLAIN
    cls: Any = type(owner)
    dotted = f"{path}.{name}" if path else name
    try:
        # Real meta constructions even inside di.build's fake pass.
        with unset_fake_temporarily() if torch._C._get_dispatch_mode(_FAKE) else nullcontext():
            found = layout.attribute(
                path,
                name,
                provisional_constructor(cls, state),
                provisional_constructor(cls, state, spread=True),
            )
    except AttributeError:
        return NOT_PLAIN
    if found is NOT_PLAIN:
        inferred = ", ".join(f"{n}=..." for n in cls._di_rules)
        raise _NotBuiltAttributeError(
            f"{label(owner)}: {dotted} is not known before the layer is built (it "
            f"depends on an inferred size, or is not a plain value). Fix: run a forward "
            f"pass (or di.build, or load a checkpoint) first, or give {inferred} "
            f"explicitly."
        )
    return found


def install_placeholders(module: nn.Module, layout: Layout, device: Any) -> None:
    """A placeholder (or ``None``) under every name of ``layout``, in holders
    for the submodules."""
    for qualified in layout.modules:
        parent, _, name = qualified.rpartition(".")
        holder = Holder()
        # Where its plain attributes are read from (layer_attribute); in __dict__ so
        # that a deep copy of the layer points its holders at the copy.
        holder.__dict__["_di_owner"], holder.__dict__["_di_path"] = module, qualified
        module.get_submodule(parent)._modules[name] = holder
    # Real placeholders even inside di.build's fake pass (a block that constructs
    # deferred children); outside one (declaring is a hot path) nothing to unset.
    if torch._C._get_dispatch_mode(_FAKE) is None:
        _install(module, layout, device)
        return
    with unset_fake_temporarily():
        _install(module, layout, device)


_FAKE = torch._C._TorchDispatchModeKey.FAKE


def _install(module: nn.Module, layout: Layout, device: Any) -> None:
    flat = not layout.modules
    for spec in layout.tensors:
        if flat:
            owner, leaf = module, spec.name
        else:
            owner_name, _, leaf = spec.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
        # Assigned directly: register_* would refuse names that __getattr__ answers
        # (a constructor argument named like a parameter, such as ``bias``).
        tensor = _placeholder(module, spec, device)
        if spec.is_parameter:
            owner._parameters[leaf] = tensor
        else:
            owner._buffers[leaf] = tensor
            if not spec.persistent:
                owner._non_persistent_buffers_set.add(leaf)


def _placeholder(module: nn.Module, spec: TensorSpec, device: Any) -> Any:
    """The placeholder for one tensor of a layout (``None`` where the layer has none,
    such as ``bias=False``), noted as ``module``'s."""
    if spec.dtype is None:
        return None
    kind = PlaceholderParameter if spec.is_parameter else PlaceholderBuffer
    # torch's stubs describe Parameter's signature, not UninitializedParameter's.
    tensor = kind(spec.is_parameter and spec.requires_grad, device, spec.dtype)  # type: ignore[call-arg, arg-type]
    set_owner(tensor, module, spec.name)
    return tensor


def flat_placeholders(
    module: nn.Module, layout: Layout, device: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat layer's placeholder tables (parameters, buffers), as
    :func:`install_placeholders` would fill them, made apart from ``module`` so that
    they can be published at once; non-persistent buffers are noted on ``module``."""
    parameters: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    with unset_fake_temporarily() if torch._C._get_dispatch_mode(_FAKE) else nullcontext():
        for spec in layout.tensors:
            tensor = _placeholder(module, spec, device)
            if spec.is_parameter:
                parameters[spec.name] = tensor
            else:
                buffers[spec.name] = tensor
                if not spec.persistent:
                    module._non_persistent_buffers_set.add(spec.name)
    return parameters, buffers


def save_placeholders(module: nn.Module, destination: Any, prefix: str, keep: bool) -> None:
    """``_save_to_state_dict`` of a placeholder or a holder."""
    # As torch's LazyModuleMixin: UninitializedParameter cannot be detached.
    for name, param in module._parameters.items():
        if param is not None:
            lazy = isinstance(param, UninitializedParameter)
            destination[prefix + name] = param if lazy or keep else param.detach()
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            lazy = isinstance(buf, UninitializedBuffer)
            destination[prefix + name] = buf if lazy or keep else buf.detach()


def placeholder_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every placeholder of a deferred layer, by qualified name within it."""
    out: list[tuple[str, torch.Tensor]]
    if not module._modules:  # the common flat layer
        out = [(n, t) for n, t in module._parameters.items() if t is not None]
        return out + [(n, t) for n, t in module._buffers.items() if t is not None]
    out = []
    for prefix, sub in module.named_modules():
        if sub is not module and not isinstance(sub, Holder):
            continue
        dot = prefix + "." if prefix else ""
        out += [(dot + n, t) for n, t in sub._parameters.items() if t is not None]
        out += [(dot + n, t) for n, t in sub._buffers.items() if t is not None]
    return out
