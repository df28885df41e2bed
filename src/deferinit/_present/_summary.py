"""``di.summary``: a table of every layer, its inferred arguments, shapes and state.

Nothing here touches tensor data: sizes come from ``shape``/``dtype``/``numel``,
placeholders (whose shapes are unknown) from their layout, and an unbuilt layer
whose sizes a shape pass inferred is constructed on ``meta`` to learn its
parameter shapes. So a summary works before the build, after it, and on models
larger than memory (``with torch.device("meta"): ...``) without allocating.

Rows follow ``named_modules()``: every leaf, every layer made through deferinit
(built or not; the submodules that only hold a placeholder's tensors are part of its row), and every
other module that owns parameters or buffers directly. Each tensor is listed in
the row of the module that owns it, so the counts of the rows add up to the
totals (which count a tied parameter once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._declare._deferred import Deferred
from .._declare._layout import freeze
from .._declare._placeholder import placeholder_tensors
from .._declare._rules import Rule
from .._declare._signature import constructor_call
from .._errors import ArgumentsError
from .._lazy import waiting_lazy
from .._shape._build import shape_pass
from .._tensors import construct_on_meta
from ..nn import SpatialDims
from ._render import (
    dtype_name,
    footer_lines,
    html_table,
    plain,
    plain_table,
    rich_group,
    row_dict,
    table_cells,
)

__all__ = ["LAZY", "Row", "Summary", "TensorInfo", "summary"]

# The state of a torch nn.Lazy* module still waiting for its first forward: deferinit
# cannot size it until di.adopt makes it a deferinit layer.
LAZY = "lazy (di.adopt)"


class _Unknown:
    """The value of a size that is not known yet; shows as ``?``."""

    def __repr__(self) -> str:
        return "?"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True)
class TensorInfo:
    """A parameter or buffer as the summary sees it: ``None`` marks unknown sizes."""

    name: str  # within its layer, e.g. "weight" or "out_proj.weight"
    shape: tuple[int | None, ...] | None  # None: not even the rank is known
    dtype: torch.dtype
    requires_grad: bool
    key: tuple[int, str]  # identity, so that tied tensors count once

    @property
    def numel(self) -> int | None:
        if self.shape is None or None in self.shape:
            return None
        n = 1
        for size in self.shape:
            n *= size  # type: ignore[operator]
        return n


@dataclass(frozen=True)
class Row:
    """One layer of the summary."""

    name: str  # qualified name below the summarized module ("" for itself)
    layer: str  # class name
    arguments: dict[str, Any]  # inferable constructor arguments; UNKNOWN when not known
    output: Any  # nested shapes (tuples of ints) from the shape pass; None: unknown
    parameters: tuple[TensorInfo, ...]
    buffers: tuple[TensorInfo, ...]
    state: str  # "deferred", "built", "meta" or LAZY (a torch Lazy module)

    @property
    def count(self) -> int | None:
        """Number of parameter elements, ``None`` if any size is unknown."""
        sizes = [p.numel for p in self.parameters]
        return None if None in sizes else sum(s for s in sizes if s is not None)


class Summary:
    """The result of :func:`summary`: print it, ``str()`` it, ``to_dict()`` it, or
    show it in Jupyter (HTML) or with ``rich``."""

    def __init__(self, rows: Iterable[Row], *, examples: bool, output: Any) -> None:
        self.rows = tuple(rows)
        self.examples = examples  # whether example inputs were given
        self.output = output  # the model's output shapes, or None

    # -- totals -------------------------------------------------------------------------

    def _unique(self, kind: Callable[[Row], tuple[TensorInfo, ...]]) -> list[TensorInfo]:
        seen: dict[tuple[int, str], TensorInfo] = {}
        for row in self.rows:
            for info in kind(row):
                seen.setdefault(info.key, info)
        return list(seen.values())

    def totals(self) -> dict[str, Any]:
        """Parameter counts and bytes by dtype. ``unknown`` is the number of parameter
        tensors whose size is not known yet; counts and bytes leave them out."""
        params = self._unique(lambda r: r.parameters)
        known = [p for p in params if p.numel is not None]
        return {
            "parameters": sum(p.numel or 0 for p in known),
            "trainable": sum(p.numel or 0 for p in known if p.requires_grad),
            "unknown": len(params) - len(known),
            "bytes": _bytes_by_dtype(params),
            "buffer_bytes": _bytes_by_dtype(self._unique(lambda r: r.buffers)),
        }

    # -- renderings ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``rows`` (one dict per layer), ``totals`` and the
        model's ``output_shape``. Unknown arguments are ``"?"``; unknown sizes in
        shapes, counts that depend on them, and output shapes no example gave (a
        row's ``output_shape``, the model's), are ``None``."""
        return {
            "rows": [row_dict(row) for row in self.rows],
            "totals": self.totals(),
            "output_shape": plain(self.output),
        }

    def _footer(self) -> list[str]:
        params, buffers = self._unique(lambda r: r.parameters), self._unique(lambda r: r.buffers)
        lazy = [row.name for row in self.rows if row.state == LAZY]
        return footer_lines(self.totals(), params, buffers, output=self.output, lazy=lazy)

    def __str__(self) -> str:
        return plain_table(table_cells(self.rows), self._footer())

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return html_table(table_cells(self.rows), self._footer())

    def __rich__(self) -> Any:
        return rich_group(table_cells(self.rows), self._footer())


def summary(module: nn.Module, /, *example_args: Any, **example_kwargs: Any) -> Summary:
    """A table of every layer below ``module``: qualified name, layer class, inferred
    arguments, output shape, parameter shapes and count, and state (``deferred``,
    ``built`` or ``meta``). Unknown sizes show as ``?``: an output shape is known
    where example inputs reached the layer.
    torch's own ``nn.Lazy*`` modules show as ``lazy (di.adopt)``: only their own first
    forward sizes them, so example inputs give no shapes until ``di.adopt(model)``
    has made them deferinit layers.

    Examples (``example_args``, ``example_kwargs``) are what :func:`deferinit.build`
    takes (tensors, shapes, meta tensors):
    they run through a shape-only pass that infers every size and changes nothing.
    No tensor data is read or allocated, so meta models of any size work.

    >>> import deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
    >>> print(di.summary(net, (2, 20)))
    name  layer   arguments        output    parameters                     count  state
    ----  ------  ---------------  --------  -----------------------------  -----  --------
    0     Linear  in_features=20   (2, 256)  weight (256, 20), bias (256,)  5,376  deferred
    1     ReLU                     (2, 256)                                     0  built
    2     Linear  in_features=256  (2, 10)   weight (10, 256), bias (10,)   2,570  deferred
    ----  ------  ---------------  --------  -----------------------------  -----  --------
    Parameters: 7,946 (7,946 trainable)
    Parameter bytes: float32 31,784 (31.0 KiB)
    Output: (2, 10)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.summary expects an nn.Module, got {type(module).__name__}. Fix: pass the "
            f"model first, then example inputs: di.summary(model, x)."
        )
    examples = bool(example_args or example_kwargs)
    values: Mapping[str, Mapping[str, Any]] = {}
    outputs: Mapping[str, Any] = {}
    # A shape pass cannot run a Lazy module's own sizing (it would even write to its
    # uninitialized tensors); the footer says to call di.adopt.
    if examples and not any(waiting_lazy(sub) for sub in module.modules()):
        seen = shape_pass(module, example_args, example_kwargs, outputs=True)
        values, outputs = seen.values, seen.outputs
    rows = [
        _row(name, sub, values.get(name, {}), _shapes(outputs[name]) if name in outputs else None)
        for name, sub in _layers(module)
    ]
    return Summary(rows, examples=examples, output=_shapes(outputs[""]) if "" in outputs else None)


def _layers(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    inside: str | None = None  # the placeholder whose holders come next (depth first)
    for name, sub in module.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue  # a placeholder's holders belong to its row
        if isinstance(sub, Deferred):
            inside = name
            yield name, sub
        elif not sub._modules or "_di" in sub.__dict__ or sub._parameters or sub._buffers:
            yield name, sub


def _row(name: str, layer: nn.Module, inferred: Mapping[str, Any], output: Any) -> Row:
    if isinstance(layer, Deferred):
        arguments, params, buffers = _deferred_parts(layer, inferred)
        cls_name = type(layer)._di_cls.__name__
        return Row(name, cls_name, arguments, output, params, buffers, "deferred")
    state = layer.__dict__.get("_di")
    arguments = {}
    if state is not None:
        built = state.values or {}
        arguments = {k: built.get(k, UNKNOWN) for k in state.deferred._di_rules}
    params = tuple(_info(n, t) for n, t in layer._parameters.items() if t is not None)
    buffers = tuple(_info(n, t) for n, t in layer._buffers.items() if t is not None)
    everything = [*layer.parameters(), *layer.buffers()]
    if waiting_lazy(layer):
        kind = LAZY
    elif any(isinstance(t, UninitializedTensorMixin) for t in everything):
        kind = "deferred"
    elif any(t.device.type == "meta" for t in everything):
        kind = "meta"
    else:
        kind = "built"
    return Row(name, type(layer).__name__, arguments, output, params, buffers, kind)


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    shape = None if isinstance(t, UninitializedTensorMixin) else tuple(t.shape)
    return TensorInfo(name, shape, t.dtype, t.requires_grad, (id(t), ""))


def _deferred_parts(
    layer: Deferred, inferred: Mapping[str, Any]
) -> tuple[dict[str, Any], tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Arguments and tensors of a placeholder: exact if every size is known (given
    or inferred by the shape pass), else with ``None`` for the sizes that move with
    the unknown arguments."""
    cls, state = type(layer), layer._di
    known = {**state.explicit, **inferred}
    arguments = {k: known.get(k, UNKNOWN) for k in cls._di_rules}
    placeholders = dict(placeholder_tensors(layer))
    shapes = _shapes_when_known(layer, known) if len(known) >= len(cls._di_rules) else None
    if shapes is None:
        shapes = _partial_shapes(layer)
    params: list[TensorInfo] = []
    buffers: list[TensorInfo] = []
    is_param = {n: isinstance(t, nn.Parameter) for n, t in placeholders.items()}
    for name, (shape, dtype, requires_grad, parameter) in shapes.items():
        held = placeholders.get(name)
        if held is not None:  # it keeps the dtype and flag the placeholder was given
            dtype, requires_grad = held.dtype, held.requires_grad
            parameter = is_param[name]
        key = (id(held), "") if held is not None else (id(layer), name)
        info = TensorInfo(name, shape, dtype, requires_grad and parameter, key)
        (params if parameter else buffers).append(info)
    return arguments, tuple(params), tuple(buffers)


_TensorSpecs = dict[str, tuple[tuple[int | None, ...] | None, torch.dtype, bool, bool]]


def _construct_on_meta(layer: Deferred, values: Mapping[str, Any]) -> nn.Module:
    cls = type(layer)
    arguments = dict(layer._di.arguments)
    if "device" in arguments:
        arguments["device"] = "meta"
    args, kwargs = constructor_call(cls, arguments, values)
    return construct_on_meta(lambda: cls._di_cls(*args, **kwargs))


def _tensor_specs_of(module: nn.Module) -> _TensorSpecs:
    specs: _TensorSpecs = {}
    for name, p in module.named_parameters():
        specs[name] = (tuple(p.shape), p.dtype, p.requires_grad, True)
    for name, b in module.named_buffers():
        specs[name] = (tuple(b.shape), b.dtype, False, False)
    return specs


_KNOWN: dict[Any, _TensorSpecs | None] = {}


def _shapes_when_known(layer: Deferred, values: Mapping[str, Any]) -> _TensorSpecs | None:
    try:
        key: Any = (
            type(layer),
            freeze(layer._di.arguments),
            freeze(dict(values)),
            torch.get_default_dtype(),
        )
        return _KNOWN[key]
    except KeyError:
        pass
    except TypeError:  # unhashable arguments: no caching
        key = None
    try:
        specs: _TensorSpecs | None = _tensor_specs_of(_construct_on_meta(layer, values))
    except Exception:  # the shape pass accepted these values; be safe all the same
        specs = None
    if key is not None:
        _KNOWN[key] = specs
    return specs


def _partial_shapes(layer: Deferred) -> _TensorSpecs:
    """Shapes at the provisional size and at twice it: dimensions that differ are unknown."""
    cls, state = type(layer), layer._di
    layout = state.layout
    specs: _TensorSpecs = {}
    if layout is None:
        return specs
    try:
        size = layout.size
    except ArgumentsError:  # arguments its class rejects: the build says so; shapes unknown
        return {
            t.name: (None, t.dtype, t.requires_grad, t.is_parameter)
            for t in layout.tensors
            if t.dtype is not None
        }
    doubled = {
        n: state.explicit[n] if n in state.explicit else _moved(r, size, state.options)
        for n, r in cls._di_rules.items()
    }
    # Some layers reject the doubled size: every size is then unknown.
    other = {n: spec[0] for n, spec in (_shapes_when_known(layer, doubled) or {}).items()}
    for tensor in layout.tensors:
        if tensor.dtype is None:
            continue
        base, moved = layout.shapes.get(tensor.name), other.get(tensor.name)
        shape: tuple[int | None, ...] | None = None
        if base is not None and moved is not None and len(base) == len(moved):
            shape = tuple(a if a == b else None for a, b in zip(base, moved, strict=True))
        specs[tensor.name] = (shape, tensor.dtype, tensor.requires_grad, tensor.is_parameter)
    return specs


def _moved(rule: Rule, size: int, options: Mapping[str, Any]) -> Any:
    """The value of an unknown argument for the second construction of
    :func:`_partial_shapes`: the provisional one at twice the size, and another rank
    for a rank-generic twin's ``spatial_dims`` (the rank of its weight moves too)."""
    if isinstance(rule, SpatialDims):
        return 1 if rule.provisional(size, options) != 1 else 2
    return rule.provisional(2 * size, options)


def _shapes(output: Any) -> Any:
    """Output shapes: a tensor becomes a tuple of ints, containers lists/dicts of those."""
    if isinstance(output, torch.Tensor):
        return tuple(int(s) for s in output.shape)
    if isinstance(output, list | tuple):
        return [_shapes(o) for o in output]
    if isinstance(output, dict):
        return {str(k): _shapes(v) for k, v in output.items()}
    if output is None:
        return "None"
    return type(output).__name__


def _bytes_by_dtype(tensors: Iterable[TensorInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        name = dtype_name(t.dtype)
        out[name] = out.get(name, 0) + (t.numel or 0) * t.dtype.itemsize
    return out
