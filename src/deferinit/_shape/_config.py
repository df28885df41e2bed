"""Build configs: every built layer's inferred arguments, as JSON-able data, and
the plan that builds a model from one (``di.build(module, config=cfg)``).

The format (version 1)::

    {
      "format": "deferinit.build_config",
      "version": 1,
      "layers": {                       # registration order
        "0": {
          "class": "deferinit.nn.Linear",   # the deferred class, module.qualname
          "arguments": {"in_features": 20}, # every inferred argument, by name
          "dtype": "float32",               # what the built layer holds (for reading)
          "device": "cpu"
        },
        ...
      }
    }

Only JSON values: an argument that is a tuple (``normalized_shape``) is a list,
and comes back as a tuple. ``dtype`` and ``device`` say what the layer held when
the config was made; a build from the config constructs each layer under the
model's own declared defaults and ``device=``, as a build from examples does, so
a config made on a GPU builds on a CPU-only machine and values equal eager
construction under the same seed. A class is matched by its name (the part
after the last dot), so a config written where a class lived in ``__main__``
fits the same class imported from a module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._declare._deferred import Deferred
from .._declare._rules import Rule, _Function
from .._declare._state import State
from .._errors import ArgumentsError, DeferredInitError, NotBuiltError
from ..nn import SpatialDims

__all__ = ["BUILT_FROM", "FORMAT", "VERSION", "ConfigPlan", "build_config", "class_name", "plan"]

FORMAT = "deferinit.build_config"
VERSION = 1
BUILT_FROM = "the build config"


def build_config(module: nn.Module) -> dict[str, Any]:
    """Every built layer's inferred arguments by qualified name, with its class,
    dtype and device: JSON data (``json.dumps`` round-trips it) from which
    ``di.build(module, config=cfg)`` builds the same model without data, a
    checkpoint or a forward pass.

    Every deferred layer below ``module`` must be built (a ``NotBuiltError``
    names those that are not). Layers are listed in registration order.

    >>> import json, torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = di.build(nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.LayerNorm()), (2, 20))
    >>> cfg = di.build_config(net)
    >>> list(cfg["layers"]), cfg["layers"]["0"]["class"], cfg["layers"]["0"]["arguments"]
    (['0', '2'], 'deferinit.nn.Linear', {'in_features': 20})
    >>> cfg["layers"]["2"]["arguments"], cfg["layers"]["2"]["dtype"], cfg["layers"]["2"]["device"]
    ({'normalized_shape': [8]}, 'float32', 'cpu')
    >>> again = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.LayerNorm())
    >>> di.build(again, config=json.loads(json.dumps(cfg)))[2]
    LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.build_config expects an nn.Module, got {type(module).__name__}. Fix: pass "
            f"the model."
        )
    layers: dict[str, Any] = {}
    unbuilt: list[str] = []
    for name, sub in _outside_placeholders(module):
        if isinstance(sub, Deferred):
            unbuilt.append(name)
            continue
        state = _built_state(sub)
        if state is None:
            continue
        deferred = state.deferred
        values = state.values or {}
        layers[name] = {
            "class": class_name(deferred),
            "arguments": {k: _to_json(name, k, values[k]) for k in deferred._di_rules},
            **_held(sub, state),
        }
    if unbuilt:
        listed = ", ".join(repr(n) for n in unbuilt)
        raise NotBuiltError(
            f"di.build_config: the deferred layer(s) {listed} are not built yet, so their "
            f"sizes are unknown and the config would not build the model. Fix: build the "
            f"model first (a forward pass, di.build or di.load_state_dict)."
        )
    return {"format": FORMAT, "version": VERSION, "layers": layers}


def class_name(deferred: type[Deferred]) -> str:
    """How a config names a layer's deferred class: ``deferinit.nn.Linear``."""
    return f"{deferred.__module__}.{deferred.__qualname__}"


def _built_state(module: nn.Module) -> State | None:
    """The record of a layer deferinit built, or None."""
    state = module.__dict__.get("_di")
    if not isinstance(state, State) or state.values is None:
        return None
    return state


def _held(layer: nn.Module, state: State) -> dict[str, str]:
    """The dtype (of its first floating-point tensor) and device the built layer
    holds; for a layer without tensors, the defaults it was constructed under."""
    tensors = list(itertools.chain(layer.parameters(), layer.buffers()))
    floating = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    dtype = floating[0].dtype if floating else state.dtype
    device = tensors[0].device if tensors else (state.device or torch.device("cpu"))
    return {"dtype": str(dtype).removeprefix("torch."), "device": str(device)}


def _to_json(layer: str, argument: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_to_json(layer, argument, v) for v in value]
    raise DeferredInitError(
        f"di.build_config: layer {layer!r} was built with {argument}={value!r} (a "
        f"{type(value).__name__}), which a build config cannot hold: it keeps only JSON "
        f"values (numbers, strings, booleans, None, and lists or tuples of them). Fix: "
        f"make the rule for {argument} return such a value."
    )


def _from_json(value: Any) -> Any:
    """A config's argument as the layer takes it: JSON lists are tuples."""
    if isinstance(value, list | tuple):
        return tuple(_from_json(v) for v in value)
    return value


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, list | tuple) and all(_json_value(v) for v in value)


@dataclass(frozen=True)
class _Entry:
    cls: str
    arguments: dict[str, Any]


@dataclass
class ConfigPlan:
    """How ``di.build(module, config=cfg)`` builds: the values each deferred layer
    takes (:meth:`values_of`, asked by the registration-order walk), and every way
    the config does not fit the model (:attr:`problems`).

    :func:`plan` checks the model as it stands before anything is built, so every
    difference it shows is reported with nothing built. Layers that a block
    constructs when it is built are checked as the walk meets them; :meth:`finish`
    then raises if anything did not fit, and the walk undoes every build.
    """

    module: nn.Module
    layers: dict[str, _Entry]
    problems: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def values_of(self, name: str, layer: Deferred) -> dict[str, Any] | None:
        """The arguments ``layer`` is built with, or None (a difference noted)."""
        values = self.check_deferred(name, layer)
        if values is not None:
            self.used.add(name)
        return values

    def finish(self) -> None:
        """Check the entries the walk did not use, then raise if anything did not fit."""
        for name in self.layers:
            if name not in self.used:
                self.check_other(name)
        self.raise_if_any()

    def raise_if_any(self) -> None:
        """One ``DeferredInitError`` listing every difference noted, if any."""
        if not self.problems:
            return
        count = len(self.problems)
        raise DeferredInitError(
            f"di.build: the build config does not fit {type(self.module).__name__} "
            f"({count} difference{'s' if count > 1 else ''}): {'; '.join(self.problems)}. "
            f"Nothing was built. Fix: build with the config di.build_config made for this "
            f"model (the same layer names, classes and inferred arguments), or from examples."
        )

    def check_deferred(self, name: str, layer: Deferred) -> dict[str, Any] | None:
        """The arguments of ``layer``'s entry if it fits; else None, differences noted."""
        entry = self.layers.get(name)
        if entry is None:
            self._note(f"{_shown(name, type(layer))} is deferred and the config has no entry")
            return None
        found = _differences(name, layer, entry)
        for problem in found:
            self._note(problem)
        return None if found else dict(entry.arguments)

    def check_other(self, name: str) -> None:
        """An entry for a layer that is not deferred: it must be one deferinit built,
        with the same arguments."""
        try:
            layer = self.module.get_submodule(name) if name else self.module
        except AttributeError:
            self._note(f"{name!r}: the model has no layer of that name")
            return
        if isinstance(layer, Deferred):
            return  # met by the walk, which noted why it was not built
        if _built_state(layer) is None:
            self._note(f"{name!r} is a {type(layer).__name__}, which deferinit does not build")
            return
        for problem in _differences(name, layer, self.layers[name]):
            self._note(problem)

    def _note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)


def plan(module: nn.Module, config: Any) -> ConfigPlan:
    """Read ``config`` and check it against ``module`` as it stands, building
    nothing: every deferred layer needs an entry; every entry needs a layer of its
    class with the same inferred argument names (and, where the layer is built or
    an argument was given, the same values). Entries below a deferred layer wait
    for the walk: the layer's build may construct them."""
    layers, problems = _parse(config)
    result = ConfigPlan(module, layers, problems)
    unbuilt: set[str] = set()
    for name, sub in _outside_placeholders(module):
        if isinstance(sub, Deferred):
            unbuilt.add(name)
            result.check_deferred(name, sub)
    for name in layers:
        if name not in unbuilt and not _below(name, unbuilt):
            result.check_other(name)
            result.used.add(name)
    return result


def _outside_placeholders(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without what lies below a deferred layer (its holders)."""
    inside: str | None = None  # the deferred layer whose holders come next (preorder)
    for name, sub in module.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        inside = name if isinstance(sub, Deferred) else None
        yield name, sub


def _below(name: str, prefixes: set[str]) -> bool:
    """Whether ``name`` lies below one of ``prefixes`` (qualified names)."""
    if "" in prefixes and name:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _parse(config: Any) -> tuple[dict[str, _Entry], list[str]]:
    """The config's entries, and what is malformed in it."""
    if not isinstance(config, Mapping) or not isinstance(config.get("layers"), Mapping):
        raise DeferredInitError(
            f"di.build: config= takes what di.build_config returns (a dict with a "
            f"'layers' mapping), got {_kind(config)}. Nothing was built. Fix: pass "
            f"di.build_config(built_model), or that read back with json.load."
        )
    problems: list[str] = []
    if config.get("format", FORMAT) != FORMAT or config.get("version", VERSION) != VERSION:
        problems.append(
            f"its format is {config.get('format')!r} version {config.get('version')!r}; this "
            f"deferinit reads {FORMAT!r} version {VERSION}"
        )
    entries: dict[str, _Entry] = {}
    for name, raw in config["layers"].items():
        if not isinstance(name, str):
            problems.append(f"layer name {name!r} is not a string")
            continue
        arguments = raw.get("arguments") if isinstance(raw, Mapping) else None
        cls = raw.get("class") if isinstance(raw, Mapping) else None
        if (
            not isinstance(cls, str)
            or not isinstance(arguments, Mapping)
            or not all(isinstance(k, str) and _json_value(v) for k, v in arguments.items())
        ):
            problems.append(
                f"{name!r}: an entry needs 'class' (a string) and 'arguments' (JSON values "
                f"by name), got {raw!r}"
            )
            continue
        entries[name] = _Entry(cls, {k: _from_json(v) for k, v in arguments.items()})
    return entries, problems


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {', '.join(map(repr, value)) or 'none'}"
    return f"a {type(value).__name__}"


def _shown(name: str, deferred: type[Deferred]) -> str:
    return f"{name!r} ({deferred.__name__})" if name else f"the root ({deferred.__name__})"


def _differences(name: str, layer: nn.Module, entry: _Entry) -> list[str]:
    """How ``entry`` does not fit ``layer`` (deferred, or built by deferinit)."""
    state: State = layer.__dict__["_di"]
    deferred = state.deferred
    shown = _shown(name, deferred)
    if entry.cls.rpartition(".")[2] != deferred.__name__:
        return [f"{shown}: the config's class is {entry.cls}"]
    rules = list(deferred._di_rules)
    if set(entry.arguments) != set(rules):
        given = ", ".join(entry.arguments) or "none"
        return [f"{shown}: the config gives arguments {given}; the layer infers {', '.join(rules)}"]
    built = not isinstance(layer, Deferred)
    fixed = (state.values or {}) if built else state.explicit
    how = "built with" if built else "given"
    found = [
        f"{shown}: {how} {k}={value!r}, the config says {k}={entry.arguments[k]!r}"
        for k, value in fixed.items()
        if _from_json(value) != entry.arguments[k]
    ]
    for k in rules:
        if k in fixed:
            continue
        expected = _value_problem(deferred._di_rules[k], state.options, entry.arguments[k])
        if expected is not None:
            found.append(
                f"{shown}: the config says {k}={entry.arguments[k]!r}, which no input gives "
                f"({k} is {expected})"
            )
    return found


def _value_problem(rule: Rule, options: Mapping[str, Any], value: Any) -> str | None:
    """What ``rule`` infers, where ``value`` is not something a forward could have
    made it infer (a zero, negative, bool or float size, a rank no input has);
    None where it could. A user's rule class is not second-guessed; a callable
    rule's value is checked as its forward checks it.

    >>> from deferinit import nn as dnn
    >>> _value_problem(dnn.Linear._di_rules["in_features"], {}, True)
    'a positive int (a size)'
    >>> _value_problem(dnn.LayerNorm._di_rules["normalized_shape"], {"ndim": 2}, (4, 3)) is None
    True
    """
    if isinstance(rule, SpatialDims):
        allowed = [spatial for _, spatial in rule.ranks]
        if _size(value) and value in allowed:
            return None
        return f"one of {', '.join(map(str, allowed))} (the number of spatial dimensions)"
    if isinstance(rule, _Function):
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            return "a positive size (what the rule returns)"
        return None
    if not type(rule).__module__.startswith("deferinit."):
        return None
    like = rule.provisional(1, options)
    if like is None:  # a size only where it differs from another (kdim, vdim)
        return None if value is None or _size(value) else "None or a positive int (a size)"
    if isinstance(like, tuple):
        if isinstance(value, tuple) and len(value) == len(like) and all(map(_size, value)):
            return None
        return f"{len(like)} positive int(s) (sizes)"
    return None if _size(value) else "a positive int (a size)"


def _size(value: Any) -> bool:
    """Whether ``value`` could be an inferred size: a positive int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
