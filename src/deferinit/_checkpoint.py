"""Building a placeholder from a checkpoint: sizes come from the saved tensors.

Which saved dimension carries which constructor argument is learnt from the
layer itself: it is constructed on ``meta`` twice per argument with different
stand-in sizes, and a tensor dimension that moves with the argument gives a
linear relation ``dim = a * size + b`` (``4 * hidden`` for an LSTM's gates,
``in1`` and ``in2`` for a Bilinear). Solving it for the saved shape gives the size.
"""

from __future__ import annotations

from typing import Any

import torch

from ._deferred import Deferred, constructor_call
from ._layout import probe_shapes
from ._naming import label

__all__ = ["infer_from_shapes", "load_into_placeholder"]


def _flat(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def infer_from_shapes(
    module: Deferred, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """Constructor values solved from saved tensor shapes, and the problems found."""
    cls = type(module)
    state = module._di
    assert state.layout is not None  # a placeholder always has a layout
    size = state.layout.size
    arguments = dict(state.arguments)
    if "device" in arguments:
        arguments["device"] = "meta"
    base = {
        n: state.explicit[n] if n in state.explicit else r.provisional(size, state.options)
        for n, r in cls._di_rules.items()
    }

    def shapes_for(values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        args, kwargs = constructor_call(cls, arguments, values)
        return probe_shapes(lambda: cls._di_cls(*args, **kwargs))

    base_shapes = state.layout.shapes
    values = dict(state.explicit)
    problems: list[str] = []
    for name in cls._di_rules:
        if name in values:
            continue
        flat = _flat(base[name])
        if flat is None:  # e.g. MultiheadAttention's kdim=None: "same as embed_dim"
            values[name] = base[name]
            continue
        solved: list[int] = []
        for i, v0 in enumerate(flat):
            moved = list(flat)
            moved[i] = 2 * v0
            trial = dict(base)
            trial[name] = moved[0] if isinstance(base[name], int) else type(base[name])(moved)
            found = _solve(base_shapes, shapes_for(trial), shapes, v0, 2 * v0)
            if not found:
                problems.append(f"no saved tensor determines {name}")
                break
            if len(set(found.values())) != 1 or min(found.values()) <= 0:
                detail = ", ".join(
                    f"{k} says {v}"
                    if v > 0
                    else f"{k.split('[')[0]} has shape {shapes[k.split('[')[0]]}"
                    for k, v in found.items()
                )
                problems.append(f"saved tensors disagree on {name}: {detail}")
                break
            solved.append(next(iter(found.values())))
        else:
            values[name] = solved[0] if isinstance(base[name], int) else type(base[name])(solved)
    return values, problems


def _solve(
    base: Any,
    moved: dict[str, tuple[int, ...]],
    saved: dict[str, tuple[int, ...]],
    v0: int,
    v1: int,
) -> dict[str, int]:
    found: dict[str, int] = {}
    for key, shape0 in base.items():
        shape1 = moved.get(key)
        if key not in saved or shape1 is None or len(shape0) != len(shape1):
            continue
        if len(saved[key]) != len(shape0):
            found[key] = -1  # a rank mismatch: reported as a disagreement
            continue
        for d, (s0, s1) in enumerate(zip(shape0, shape1, strict=True)):
            if s0 == s1:
                continue
            slope, rem = divmod(s1 - s0, v1 - v0)
            offset = s0 - slope * v0
            value, rem2 = divmod(saved[key][d] - offset, slope)
            found[f"{key}[{d}]"] = value if rem == 0 and rem2 == 0 else -1
    return found


def load_into_placeholder(
    module: Deferred,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``Module._load_from_state_dict`` for a placeholder: build from the saved
    shapes, then load as the built layer would."""
    from ._become import become  # noqa: PLC0415 - cyclic by nature
    from ._deferred import placeholder_tensors  # noqa: PLC0415

    names = {name for name, _ in placeholder_tensors(module)}
    shapes = {
        key[len(prefix) :]: tuple(value.shape)
        for key, value in state_dict.items()
        if key.startswith(prefix)
        and key[len(prefix) :] in names
        and isinstance(value, torch.Tensor)
    }
    values, problems = infer_from_shapes(module, shapes)
    if problems:
        # As torch: missing keys are listed (strict loading raises on them, a
        # non-strict load leaves the layer deferred). Keys that are there but do
        # not determine the sizes are an error either way.
        missing_keys.extend(prefix + n for n in sorted(names - set(shapes)))
        if not shapes:
            return
        error_msgs.append(
            f"{label(module, type(module).__name__)} at {prefix[:-1] or 'the root'!r} is not "
            f"built and cannot take its sizes from the checkpoint: {'; '.join(problems)}. "
            f"Fix: load a checkpoint that holds this layer's tensors, or build the model "
            f"first with a forward pass."
        )
        return
    become(module, values, built_from="a checkpoint")
    type(module)._load_from_state_dict(  # the built class's own loader
        module,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    )
