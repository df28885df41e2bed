"""Small facts about a module's tensors, written once for every stage: its own
tensors, the table that holds one, the tensor under a qualified name, whether any
is still on ``meta``, and constructing a layer on ``meta``.

A module's *own* tensors are those in its ``_parameters`` and ``_buffers``
tables (not its children's); a ``None`` entry (``bias=False``) is no tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "kind_of",
    "construct_on_meta",
    "has_meta_tensors",
    "is_meta",
    "own_tensors",
    "table_of",
    "tensor_at",
    "tensors_by_name",
]

T = TypeVar("T")


def is_meta(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on the ``meta`` device (a shape without memory).

    >>> is_meta(torch.empty(2, device="meta")), is_meta(torch.empty(2))
    (True, False)
    """
    return t.device.type == "meta"


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s own parameters, then its own buffers, by leaf name; ``None``
    entries left out.

    >>> list(own_tensors(nn.BatchNorm1d(2)))
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    >>> list(own_tensors(nn.Linear(2, 2, bias=False)))
    ['weight']
    """
    out: dict[str, torch.Tensor] = {n: p for n, p in module._parameters.items() if p is not None}
    out.update((n, b) for n, b in module._buffers.items() if b is not None)
    return out


def tensors_by_name(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, then every buffer, below ``module`` by qualified name (a
    tied tensor under its first name only, as ``named_parameters`` gives it).

    >>> list(tensors_by_name(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))[:3]
    ['0.weight', '0.bias', '1.weight']
    """
    return dict([*module.named_parameters(), *module.named_buffers()])


def table_of(owner: nn.Module, leaf: str) -> dict[str, Any]:
    """The table of ``owner`` holding ``leaf``: ``_parameters`` where it is a
    parameter name there, else ``_buffers``.

    >>> bn = nn.BatchNorm1d(2)
    >>> table_of(bn, "weight") is bn._parameters, table_of(bn, "running_mean") is bn._buffers
    (True, True)
    """
    return owner._parameters if leaf in owner._parameters else owner._buffers


def tensor_at(module: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer at qualified ``name`` below ``module``; ``None``
    where there is no such submodule or tensor.

    >>> net = nn.Sequential(nn.Linear(2, 3))
    >>> tensor_at(net, "0.weight").shape, tensor_at(net, "1.weight")
    (torch.Size([3, 2]), None)
    """
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return None
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers.get(leaf)


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any of ``module``'s *own* tensors is on ``meta`` (children not
    looked at).

    >>> net = construct_on_meta(lambda: nn.Sequential(nn.Linear(2, 2)))
    >>> has_meta_tensors(net), has_meta_tensors(net[0])
    (False, True)
    """
    return any(is_meta(t) for t in own_tensors(module).values())


def construct_on_meta(factory: Callable[[], T]) -> T:
    """``factory()`` with ``torch.device("meta")`` as the default device: every
    tensor it makes has a shape and no memory.

    >>> construct_on_meta(lambda: nn.Linear(4, 3)).weight.device
    device(type='meta')
    """
    with torch.device("meta"):
        return factory()


def kind_of(t: torch.Tensor) -> str:
    """``"parameter"`` or ``"buffer"``, for messages.

    >>> kind_of(torch.nn.Parameter(torch.zeros(1))), kind_of(torch.zeros(1))
    ('parameter', 'buffer')
    """
    return "parameter" if isinstance(t, torch.nn.Parameter) else "buffer"
