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

import functools
import types
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

    def value(self, value: Any, name: str, depth: int = 0, seen: set[int] | None = None) -> Any:
        """``value`` with fake tensors swapped, in containers and plain objects too
        (lists, dicts, tuples, named tuples, dataclasses, a helper object's
        attributes), to :data:`_DEPTH` levels; a mutable container or object is kept
        and changed in place, a tuple made anew where it held one."""
        if isinstance(value, FakeTensor):
            return self.placeholder(value, "attribute", name)
        if depth >= _DEPTH:
            return value
        seen = set() if seen is None else seen
        if id(value) in seen:
            return value
        if isinstance(value, list):
            seen.add(id(value))
            for i, v in enumerate(value):
                new = self.value(v, f"{name}[{i}]", depth + 1, seen)
                if new is not v:
                    value[i] = new
        elif isinstance(value, dict):
            seen.add(id(value))
            for k, v in list(value.items()):
                new = self.value(v, f"{name}[{k!r}]", depth + 1, seen)
                if new is not v:
                    value[k] = new
        elif isinstance(value, tuple):
            made = [self.value(v, f"{name}[{i}]", depth + 1, seen) for i, v in enumerate(value)]
            if any(a is not b for a, b in zip(made, value, strict=True)):
                return type(value)(*made) if hasattr(value, "_fields") else type(value)(made)
        elif _walkable(value):
            seen.add(id(value))
            attributes: dict[str, Any] = getattr(value, "__dict__", None) or {}
            for k, v in list(attributes.items()):
                new = self.value(v, f"{name}.{k}", depth + 1, seen)
                if new is not v:
                    attributes[k] = new  # as the object holds it (a frozen dataclass too)
            for k in _slots_of(value):
                v = getattr(value, k, None)
                new = self.value(v, f"{name}.{k}", depth + 1, seen)
                if new is not v:
                    object.__setattr__(value, k, new)
        return value


_DEPTH = 16  # how deep placeholders are looked for inside an attribute
# Objects whose attributes are not looked into: classes, code, Python modules, tensors.
# (A torch module held in a plain attribute, not registered, is: its tables are
# attributes too.)
_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    functools.partial,
    torch.Tensor,
)


def _walkable(value: object) -> bool:
    """Whether ``value`` is an object whose attributes may hold tensors (a helper
    class's instance, a dataclass, one with ``__slots__``)."""
    if isinstance(value, _OPAQUE):
        return False
    return hasattr(value, "__dict__") or bool(_slots_of(value))


def _slots_of(value: object) -> tuple[str, ...]:
    return _slots(type(value))  # type: ignore[arg-type]  # classes hash


@functools.lru_cache(maxsize=1024)
def _slots(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` names of ``cls`` and its bases (not ``__dict__`` or
    ``__weakref__``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        declared = klass.__dict__.get("__slots__", ())
        for name in (declared,) if isinstance(declared, str) else declared:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


def swap_in_placeholders(
    root: nn.Module, describe: Callable[[torch.Tensor], TensorRef]
) -> list[Final]:
    """Replace every fake tensor below ``root`` by a meta placeholder, in
    ``named_modules`` order; return the placeholders with their descriptors."""
    swapper = _Swapper(describe)
    modules = list(root.named_modules(remove_duplicate=True))
    # Every parameter and buffer first, as such: an attribute may lead to another
    # module's tables (a reference to a parent or a sibling).
    for prefix, module in modules:
        dotted = f"{prefix}." if prefix else ""
        for table, kind in _TABLES:
            tensors = getattr(module, table)
            for leaf, t in tensors.items():
                if isinstance(t, FakeTensor):
                    tensors[leaf] = swapper.placeholder(t, kind, dotted + leaf)
    for prefix, module in modules:
        dotted = f"{prefix}." if prefix else ""
        for key, value in list(vars(module).items()):
            if key in _SKIP or key.startswith("__"):
                continue
            new = swapper.value(value, dotted + key)
            if new is not value:
                module.__dict__[key] = new
    left = _leftover(root)
    if left:
        raise RecordError(
            f"deferred_init: {left} still holds a fake tensor after recording (in a set, "
            f"deeper than {_DEPTH} levels, or on a class, which the replay cannot fill). "
            f"Expected: tensors held as parameters, buffers, attributes, or inside "
            f"containers and plain objects held as attributes. Fix: keep the tensor as a "
            f"buffer (register_buffer(..., persistent=False)) or an instance attribute."
        )
    return swapper.finals


def _leftover(root: nn.Module) -> str | None:
    """Where a fake tensor is still held below ``root`` after the swap (a set, or
    deeper than :data:`_DEPTH`), or on a module's class (an attribute set on the
    class in ``__init__``), or ``None``."""
    classes: set[type] = set()
    for prefix, module in root.named_modules():
        where = f"{prefix or '<root>'} ({type(module).__name__})"
        for key, value in vars(module).items():
            if key not in _SKIP and _holds_fake(value, 0, set()):
                return f"{where}.{key}"
        for cls in type(module).__mro__:
            if cls in classes:
                continue
            classes.add(cls)
            for key, value in vars(cls).items():
                if isinstance(value, FakeTensor) or (
                    isinstance(value, list | tuple | dict) and _holds_fake(value, 0, set())
                ):
                    return f"{where}: its class {cls.__name__}.{key}"
    return None


def _holds_fake(value: Any, depth: int, seen: set[int]) -> bool:
    """Whether ``value`` holds a fake tensor, looking deeper than the swap does (so
    that one it left is found)."""
    if isinstance(value, FakeTensor):
        return True
    if depth > 4 * _DEPTH or id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    elif _walkable(value):
        attributes = getattr(value, "__dict__", None) or {}
        items = [*attributes.values()]
        items += [getattr(value, k, None) for k in _slots_of(value)]
    else:
        return False
    return any(_holds_fake(v, depth + 1, seen) for v in items)


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
