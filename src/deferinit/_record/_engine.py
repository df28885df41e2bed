"""Running recorded operations on real tensors.

One engine serves both the replay in ``materialize`` (every needed operation, in
program order, on the target device) and the record-time evaluation of a value
read during construction (only the operations it depends on, on the CPU).

Each storage lives as one real ``UntypedStorage``; every tensor an operation
reads is rebuilt as a strided view of it from its descriptor, so an in-place
initialization of a slice (``weight[:, :k].normal_()``) lands where it should,
and views never need replaying.

>>> import torch
>>> from deferinit._record._tape import Op, TensorRef
>>> ref = TensorRef(0, (2,), (1,), 0, torch.float32)
>>> full = Op(torch.ops.aten.full.default, ([2], 3.0), {"dtype": torch.float32},
...           (ref,), ((0, 8),), frozenset(), frozenset(), False)
>>> engine = Engine(torch.device("cpu"), torch.device("cpu"), {})
>>> engine.run(full)
>>> engine.tensor(ref)
tensor([3., 3.])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._random import draw
from ._errors import ReplayError
from ._tape import Op, TensorRef, map_refs, refs_in

__all__ = ["Engine", "same"]

_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class Engine:
    """Real storages by recorded storage number, and the operations that fill them.

    Args:
        device: where tensors the construction made on ``recorded_device`` go.
        recorded_device: the default device while recording (``cpu``).
        externals: real tensors the construction was given, by storage number.
        generator: random operations draw from it instead of the default generator
            (record-time simulation; later, ``seed=``).
    """

    def __init__(
        self,
        device: torch.device,
        recorded_device: torch.device,
        externals: dict[int, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> None:
        self.device = device
        self.generator = generator
        self.recorded_device = recorded_device
        self.env: dict[int, torch.UntypedStorage] = {
            sid: t.untyped_storage() for sid, t in externals.items()
        }
        # Storages whose memory may come from, and go back to, a pool of buffers: the
        # full values of sharded tensors, of which a rank keeps only a slice. Reusing
        # one buffer spares the page faults of fresh memory for every tensor.
        self.pooled: set[int] = set()
        self.pool: list[torch.UntypedStorage] = []

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """A fresh tensor object viewing the real storage as ``ref`` describes."""
        storage = self.env[ref.storage]
        empty = torch.empty(0, dtype=ref.dtype, device=storage.device)
        return empty.set_(storage, ref.offset, ref.shape, ref.stride)

    def _device(self, value: torch.device) -> torch.device:
        return self.device if value == self.recorded_device else value

    def _from_pool(self, op: Op) -> bool:
        """An ``empty`` whose storage is pooled: a view of a free buffer (its values
        are undefined either way). Whether it was done."""
        if op.func not in _EMPTY or len(op.creates) != 1 or op.creates[0][0] not in self.pooled:
            return False
        device = op.kwargs.get("device")
        if device is not None and self._device(device) != self.device:
            return False
        sid, nbytes = op.creates[0]
        fits = [b for b in self.pool if b.nbytes() >= nbytes]
        if fits:
            buffer = min(fits, key=lambda b: b.nbytes())
            self.pool.remove(buffer)
        else:  # none fits: give the smaller ones back first (peak: about one tensor)
            self.pool.clear()
            buffer = torch.UntypedStorage(nbytes, device=self.device)
        self.env[sid] = buffer
        return True

    def run(self, op: Op) -> None:
        """Run one operation; bind the storages it creates."""
        if self._from_pool(op):
            return
        if op.literal is not None:
            out: Any = op.literal.to(self.device, copy=True)
        else:
            args = map_refs(op.args, self.tensor, TensorRef)
            kwargs = map_refs(
                map_refs(op.kwargs, self.tensor, TensorRef), self._device, torch.device
            )
            args = map_refs(args, self._device, torch.device)
            if op.random and self.generator is not None and kwargs.get("generator") is None:
                out = draw(self.generator, op.func, args, kwargs)
            else:
                out = op.func(*args, **kwargs)
        if op.guard is not None:
            self._check(op, out)
        if not op.creates:
            return
        sizes = dict(op.creates)
        for ref, real in zip(op.outs, refs_in(out, torch.Tensor), strict=True):
            if ref is not None and ref.storage in sizes and ref.storage not in self.env:
                self.env[ref.storage] = self._bind(ref, real, sizes[ref.storage])

    @staticmethod
    def _check(op: Op, value: Any) -> None:
        """A value construction read from random numbers must be the one the record
        followed; otherwise eager construction would have taken another path."""
        expected, where = op.guard
        if same(value, expected):
            return
        raise ReplayError(
            f"materialize: construction read a value steered by random numbers ({op.func} "
            f"{where}); while recording it was {expected!r} (simulated from the generator "
            f"state at deferred_init), under the generator state at materialize it is "
            f"{value!r}, so eager construction would take another path. The model was "
            f"left on meta. Fix: set the seed before deferred_init and draw nothing "
            f"between deferred_init and materialize (the usual order), or construct "
            f"this module eagerly."
        )

    def _bind(self, ref: TensorRef, real: torch.Tensor, nbytes: int) -> torch.UntypedStorage:
        """The storage of ``real``, or a copy laid out as recorded where a kernel chose
        other strides than the fake (meta) kernel did: later views are rebuilt from the
        recorded layout."""
        storage = real.untyped_storage()
        same = (
            tuple(real.shape) == ref.shape
            and tuple(real.stride()) == ref.stride
            and real.storage_offset() == ref.offset
            and storage.nbytes() >= nbytes
        )
        if same:
            return storage
        fresh = torch.UntypedStorage(nbytes, device=real.device)
        self.env[ref.storage] = fresh
        self.tensor(ref).copy_(real)
        return fresh

    def free(self, storages: Iterable[int]) -> None:
        """Drop storages nothing later reads (their memory goes once no view holds it;
        a pooled one's buffer goes back to the pool)."""
        for sid in storages:
            storage = self.env.pop(sid, None)
            if storage is not None and sid in self.pooled:
                self.pool.append(storage)


def same(a: Any, b: Any) -> bool:
    """Equality of read values: scalars, sequences of them, or tensors (bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
