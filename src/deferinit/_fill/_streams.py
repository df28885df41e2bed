"""``seed=`` in one run: every registered tensor of a layer draws from its own
generator, seeded from the seed and its qualified name, as if it were initialized
alone (:func:`deferinit._fill._each.each_tensor` with seeds gives the same values, tensor
by tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from .._declare._state import on_device
from .._random import RANDOM, draw
from ._dispatch import (
    Fallback,
    RegisteredStorageMode,
    lends_default,
    named_tensors,
    registration_order,
    registrations,
    written_args,
)

__all__ = ["seeded_whole", "streams"]

# Registration orders learnt by dry runs on meta, by what was constructed (class,
# arguments, dtype): a model's repeated layers (a transformer's blocks) each
# need the dry run otherwise, about a third of a small layer's seeded time. An
# order taken from here is a guess, checked against the registrations of the run
# it served; one that was wrong is never used for that key again.
_ORDERS: dict[Hashable, dict[str, int] | None] = {}
_MOST_ORDERS = 256


class _Streams(RegisteredStorageMode):
    """Every random fill of a registered tensor draws from that tensor's own
    generator (seeded from its name on its first fill), as if it were initialized
    alone, never from the default one (other threads' draws cannot shift it); any
    other random operation gives up (:class:`Fallback`) before it draws, so the
    process-wide generators are never touched and need no putting back. A
    registered tensor with no name in ``names`` (one whose value nobody wants)
    draws from a spare generator, or gives up too where ``spare`` is false."""

    def __init__(
        self,
        seen: list[torch.Tensor],
        names: dict[int, str],
        seeds: Callable[[str], int],
        spare: bool = False,
    ) -> None:
        super().__init__(seen)
        self.names = names  # registration position -> qualified name
        self.seeds = seeds
        self.spare = spare
        self.generators: dict[int, torch.Generator] = {}  # position -> its own

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if RANDOM not in func.tags:
            return func(*args, **kwargs)
        written = written_args(func._schema, args, kwargs)
        if len(written) != 1:
            raise Fallback(f"{func} is not a fill of one tensor")
        if lends_default(func, kwargs):  # draw would lend it the process-wide generator
            raise Fallback(f"{func} draws only from the default generator")
        position = self.position(written[0])
        if position is None or (position not in self.names and not self.spare):
            raise Fallback(f"{func} fills a tensor the layer does not register")
        generator = self.generators.get(position)
        if generator is None:
            generator = torch.Generator(written[0].device)
            if position in self.names:
                generator.manual_seed(self.seeds(self.names[position]))
            self.generators[position] = generator
        return draw(generator, func, args, kwargs)


def seeded_whole(
    make: Callable[[], nn.Module],
    device: torch.device,
    seeds: Callable[[str], int],
    *,
    construct: Callable[[], nn.Module] | None = None,
    key: Hashable | None = None,
) -> nn.Module | None:
    """The module ``make`` builds on ``device``, each of its tensors holding what
    :func:`each_tensor` with ``seeds`` gives it, in one run; ``None`` where the
    initialization fills something else at random (then go tensor by tensor).
    CPU only: elsewhere ``None``. ``construct`` (default ``make``) builds the module
    without its registered initializer, for the dry run on meta that learns the
    registration order: the initializer then runs once. ``key`` (hashable, or
    ``None``) says what ``construct`` constructs: modules constructed alike are
    registered in the same order, so the dry run is made once per key (checked:
    where the run's registrations differ, the dry run is made after all). Draws
    from no process-wide generator, and so puts none back: another thread's draws
    meanwhile stand.

    >>> import torch
    >>> from torch import nn
    >>> from deferinit._fill._each import each_tensor
    >>> seeds = {"weight": 1, "bias": 2}.__getitem__
    >>> whole = seeded_whole(lambda: nn.Linear(3, 2), torch.device("cpu"), seeds)
    >>> alone = dict(each_tensor(lambda: nn.Linear(3, 2), ["bias"], torch.device("cpu"), seeds))
    >>> torch.equal(whole.bias, alone["bias"])
    True
    """
    if device.type != "cpu":
        return None
    guess = _ORDERS.get(key) if key is not None else None
    if guess is not None:
        whole = _seeded_run(make, device, seeds, guess)
        if whole is not None and whole[1]:
            return whole[0]
        _ORDERS[key] = None  # wrong, or it gave up: a dry run every time for this key
    order = registration_order(make if construct is None else construct)
    if order is None:
        return None
    whole = _seeded_run(make, device, seeds, order)
    if key is not None and key not in _ORDERS and whole is not None and whole[1]:
        if len(_ORDERS) >= _MOST_ORDERS:
            _ORDERS.clear()
        _ORDERS[key] = order
    return whole[0] if whole is not None else None


def _seeded_run(
    make: Callable[[], nn.Module],
    device: torch.device,
    seeds: Callable[[str], int],
    order: dict[str, int],
) -> tuple[nn.Module, bool] | None:
    """The module ``make`` builds with each registered tensor drawing from its own
    generator, by ``order``, and whether ``order`` is the order of this run's
    registrations; ``None`` where it cannot (:class:`Fallback`)."""
    try:
        with registrations() as seen, on_device(device), streams(order, seeds)(seen):
            module = make()
    except Fallback:
        return None
    return module, _order_of(module, seen) == order


def _order_of(module: nn.Module, seen: list[torch.Tensor]) -> dict[str, int]:
    """Qualified name -> position of its first registration in ``seen``."""
    position: dict[int, int] = {}
    for i, t in enumerate(seen):
        position.setdefault(id(t), i)
    tensors = named_tensors(module)
    return {n: position[id(t)] for n, t in tensors.items() if id(t) in position}


def streams(
    order: dict[str, int], seeds: Callable[[str], int], wanted: Sequence[str] | None = None
) -> Callable[[list[torch.Tensor]], _Streams]:
    """The dispatch mode, given the registrations list, in which each registered
    tensor draws from its own generator, seeded with ``seeds`` of its name (the
    first of its names in ``order``, the registration positions). With ``wanted``,
    only those names are seeded; the other tensors draw from spare generators."""
    names: dict[int, str] = {}
    for name, position in order.items():
        if wanted is None or name in wanted:
            names.setdefault(position, name)
    spare = wanted is not None
    return lambda seen: _Streams(seen, names, seeds, spare)
