"""Transparent huge pages, and pages mapped at once, for a large layer's new CPU
tensors during ``di.materialize`` (Linux).

Filling a fresh tensor costs the kernel one page fault per 4 KiB page it touches
first: a third of a transformer layer's construction, as much as the random fill
of its weights. Where the kernel hands out transparent huge pages only on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``, a common
default), asking for them on a large tensor's memory before its first touch
(``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part of it, as torch itself does
with ``THP_MEM_ALLOC_ENABLE=1``, which it reads once at start-up) lets one fault
map 2 MiB: 128 MiB filled from fresh memory takes 118 ms instead of 150 ms here.

:func:`huge_pages` asks for them while a layer with a tensor of at least
:data:`LARGE` bytes is constructed and initialized: a :class:`TorchFunctionMode`
(which applies to the thread that enters it only) advises the memory of every
tensor of at least 2 MiB that ``torch.empty`` and its kin allocate there. Values
are untouched: the advice changes how memory is mapped, never what it holds.
Small layers pay nothing; where the advice is unavailable (not Linux, huge pages
``never`` or ``always`` already, no ``ctypes``, ``madvise`` failing) no huge page
is asked for. The advised range stays advised for as long as it is mapped (glibc may
later reuse it for other allocations once the tensor is freed).

Where every tensor a layer's construction allocates is about to be written whole
(a whole layer constructed for real, not a rank's stand-ins, which leave the
layer's own tensors untouched), the same tensors, from :data:`POPULATE` bytes,
are also *populated* before their first touch (``madvise(MADV_POPULATE_WRITE)``,
Linux 5.14 and later) where they lie on small pages: the kernel maps every such
page in one call instead of one trap per 4 KiB as the fill first writes each.
The pages are the ones the fill was about to fault in anyway, zeroed as always;
the call saves the traps, 3-5% of an exact ``di.materialize`` of a transformer
here. Where the kernel is older (``EINVAL``), nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["LARGE", "POPULATE", "advise", "huge_pages"]

LARGE = 4 << 20  # a layer with a tensor of this many bytes gets the advice
_HUGE = 2 << 20  # a transparent huge page on x86-64 and (4 KiB-page) arm64
POPULATE = 64 << 10  # a new tensor of this many bytes in a large layer is mapped at once
_PAGE = 4096  # the smallest page; madvise wants page-aligned ranges
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Allocations whose memory is not yet touched when they return.
_ALLOCATING = {
    torch.empty,
    torch.empty_strided,
    torch.empty_like,
    torch.Tensor.new_empty,
    torch.Tensor.new_empty_strided,
}

Madvise = Callable[[int, int, int], int]


@functools.cache
def _libc_madvise() -> Madvise | None:
    """libc's ``madvise`` on Linux, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    madvise: Madvise = function
    return madvise


@functools.cache
def _huge_pages_mode() -> str:
    """When the kernel hands out transparent huge pages: ``"always"``, on request
    (``"madvise"``), or ``"never"`` (also where it does not say)."""
    try:
        text = _MODE.read_text()
    except OSError:
        return "never"
    return next((mode for mode in ("always", "madvise") if f"[{mode}]" in text), "never")


def _huge_on_request() -> bool:
    """Whether the kernel hands out transparent huge pages on request only."""
    return _huge_pages_mode() == "madvise"


def advise(t: torch.Tensor, *, populate: bool = False) -> None:
    """Ask for huge pages on the 2 MiB-aligned part of ``t``'s memory (a CPU
    tensor's, not yet touched), where there is one and huge pages come on request;
    then, with ``populate`` (only for a tensor about to be written whole) and from
    :data:`POPULATE` bytes, have its small pages mapped at once. Errors are
    ignored: the advice changes how memory is mapped, never what it holds.

    >>> import torch
    >>> advise(torch.empty(1 << 20))  # 4 MiB: one aligned 2 MiB page at least
    """
    madvise = _libc_madvise()
    if madvise is None or t.device.type != "cpu":
        return
    storage = t.untyped_storage()
    address, nbytes = storage.data_ptr(), storage.nbytes()
    first = address // _PAGE * _PAGE  # the pages the tensor's bytes lie on
    last = -(-(address + nbytes) // _PAGE) * _PAGE
    # The tensor's pages are its own to advise (madvise changes no byte): the 2 MiB
    # blocks they cover whole, its last page (partly past its bytes) included.
    huge = -(-first // _HUGE) * _HUGE, last // _HUGE * _HUGE
    if huge[1] - huge[0] < _HUGE or _huge_pages_mode() == "never":
        huge = last, last  # no huge page: every page is populated
    with contextlib.suppress(OSError, ctypes.ArgumentError):
        # -1 (not advised, or a kernel without MADV_POPULATE_WRITE): as if never asked.
        if huge[0] < huge[1] and _huge_on_request():
            madvise(huge[0], huge[1] - huge[0], _MADV_HUGEPAGE)
        if populate and nbytes >= POPULATE:
            # Huge pages are left to fault as the fill reaches them: one fault maps
            # 2 MiB, and the fill then writes memory the kernel has just zeroed,
            # still in the cache (populating them first is slower for a 16 MiB
            # tensor). The small pages around them are what costs a trap each.
            for start, end in ((first, huge[0]), (huge[1], last)):
                if end > start:
                    madvise(start, end - start, _MADV_POPULATE_WRITE)


class _Advise(TorchFunctionMode):
    """Advises every tensor that an allocation returns, of at least 2 MiB, or of
    :data:`POPULATE` bytes where it also populates them."""

    def __init__(self, populate: bool) -> None:
        super().__init__()
        self.populate = populate
        self.smallest = POPULATE if populate else _HUGE

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in _ALLOCATING and isinstance(result, torch.Tensor):
            if result.numel() * result.element_size() >= self.smallest:
                advise(result, populate=self.populate)
        return result


def huge_pages(
    tensors: Iterable[torch.Tensor], device: torch.device, *, populate: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """Inside, in this thread, large new tensors get huge pages, and with
    ``populate`` their small pages mapped at once (see the module's docstring),
    where ``device`` is the CPU and one of ``tensors`` (a layer's meta tensors)
    holds at least :data:`LARGE` bytes; else nothing happens. ``populate`` only
    where every tensor the layer's construction allocates is written whole (not
    where a rank's stand-ins take the writes and the layer's own stay untouched).

    >>> import torch
    >>> with huge_pages([torch.empty(2, device="meta")], torch.device("cpu")):
    ...     torch.empty(2).shape
    torch.Size([2])
    """
    if device.type != "cpu" or _libc_madvise() is None:
        return contextlib.nullcontext()
    if not any(t.numel() * t.element_size() >= LARGE for t in tensors):
        return contextlib.nullcontext()
    return _Advise(populate)
