"""After recording: every fake tensor the module holds becomes a ``meta`` placeholder.

Fake tensors must not reach the user: the fake mode keeps weak references to
them, so ``torch.utils.swap_tensors`` would later refuse them, and any use outside
the mode fails. Each distinct fake tensor object gets exactly one placeholder, so a
tensor held at two places (a tied embedding, a buffer also kept as an attribute)
is one object at both places after recording and one real tensor after
``materialize``. Placeholders are found in parameters, buffers, plain tensor
attributes, and tensors inside lists, tuples and dicts held as attributes.

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init
>>> m = deferred_init(nn.Linear, 3, 4)
>>> m.weight.device.type, type(m.weight) is nn.Parameter
('meta', True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .._declare._recording import RECORD_KEY
from ._errors import RecordError
from ._tape import PART_KEY, Final, TensorRef

__all__ = ["python_state", "swap_in_placeholders"]

_TABLES = (("_parameters", "parameter"), ("_buffers", "buffer"))
_SKIP = {"_parameters", "_buffers", "_modules", RECORD_KEY, PART_KEY}
_PLAIN = (bool, int, str, bytes, type(None), torch.dtype, torch.device)


class _Swapper:
    """Makes one placeholder per fake tensor object and remembers what it views."""

    def __init__(self, describe: Callable[[torch.Tensor], TensorRef]) -> None:
        self.describe = describe
        self.made: dict[int, torch.Tensor] = {}
        self.finals: list[Final] = []

    def placeholder(self, fake: torch.Tensor, kind: str, name: str) -> torch.Tensor:
        found = self.made.get(id(fake))
        if found is not None:
            return found
        meta = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device="meta")
        grad = fake.requires_grad and fake.is_leaf
        new: torch.Tensor
        if isinstance(fake, nn.Parameter) or getattr(fake, "_is_param", False):
            new = nn.Parameter(meta, requires_grad=grad)
        else:
            new = meta.requires_grad_(grad)
        self.made[id(fake)] = new
        self.finals.append(Final(new, self.describe(fake), kind, name))
        return new

    def value(self, value: Any, name: str) -> Any:
        """``value`` with fake tensors swapped, one container level deep (lists of
        tensors, dicts of tensors); the container object is kept where it is mutable."""
        if isinstance(value, FakeTensor):
            return self.placeholder(value, "attribute", name)
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, FakeTensor):
                    value[i] = self.placeholder(v, "attribute", f"{name}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, FakeTensor):
                    value[k] = self.placeholder(v, "attribute", f"{name}[{k!r}]")
        elif isinstance(value, tuple) and any(isinstance(v, FakeTensor) for v in value):
            made = [self.value(v, f"{name}[{i}]") for i, v in enumerate(value)]
            return type(value)(*made) if hasattr(value, "_fields") else type(value)(made)
        return value


def swap_in_placeholders(
    root: nn.Module, describe: Callable[[torch.Tensor], TensorRef]
) -> list[Final]:
    """Replace every fake tensor below ``root`` by a meta placeholder, in
    ``named_modules`` order; return the placeholders with their descriptors."""
    swapper = _Swapper(describe)
    for prefix, module in root.named_modules(remove_duplicate=True):
        dotted = f"{prefix}." if prefix else ""
        for table, kind in _TABLES:
            tensors = getattr(module, table)
            for leaf, t in tensors.items():
                if isinstance(t, FakeTensor):
                    tensors[leaf] = swapper.placeholder(t, kind, dotted + leaf)
        for key, value in list(vars(module).items()):
            if key in _SKIP or key.startswith("__"):
                continue
            new = swapper.value(value, dotted + key)
            if new is not value:
                module.__dict__[key] = new
    left = _leftover(root)
    if left:
        raise RecordError(
            f"deferred_init: {left} still holds a fake tensor after recording (inside an "
            f"object deferred_init does not look into). Expected: tensors held as "
            f"parameters, buffers, attributes, or in lists/tuples/dicts of attributes. Fix: "
            f"keep the tensor as a buffer (register_buffer(..., persistent=False))."
        )
    return swapper.finals


def _leftover(root: nn.Module) -> str | None:
    """The first tensor slot that still holds a fake tensor (two levels deep)."""
    for prefix, module in root.named_modules():
        for key, value in vars(module).items():
            if key in _SKIP:
                continue
            inner = value.values() if isinstance(value, dict) else value
            items = inner if isinstance(inner, list | tuple) or isinstance(value, dict) else [value]
            if any(isinstance(v, FakeTensor) for v in items):
                return f"{prefix or '<root>'}.{key} ({type(module).__name__})"
    return None


def python_state(root: nn.Module) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """What a construction left in Python, comparable across two recordings: each
    module's name and class, and its attributes, plain values (numbers, strings,
    and containers of them, to three levels) by value, anything else (tensors
    included: the record's finals compare them) by its class.
    Two runs of one factory differ here only where a value read steered them.

    >>> python_state(nn.Linear(2, 3))[0][2][-2:]
    [('in_features', 2), ('out_features', 3)]
    """
    return [
        (
            name,
            type(module).__qualname__,
            [(key, _plain(v, 0)) for key, v in vars(module).items() if key not in _SKIP],
        )
        for name, module in root.named_modules(remove_duplicate=False)
    ]


def _plain(value: Any, depth: int) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, float | complex):
        return repr(value)  # nan equals itself this way
    if depth < 3 and isinstance(value, list | tuple):
        return (type(value).__qualname__, [_plain(v, depth + 1) for v in value])
    if depth < 3 and isinstance(value, dict):
        # Keys other than strings (hook handles' ids) come from global counters.
        return (
            "dict",
            [
                (k if isinstance(k, str) else type(k).__qualname__, _plain(v, depth + 1))
                for k, v in value.items()
            ],
        )
    return type(value).__qualname__
