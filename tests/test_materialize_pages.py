"""``di.materialize`` asks the kernel for transparent huge pages for a large
layer's new CPU tensors, and to map their pages at once
(:mod:`deferinit._fill._hugepages`): only for layers with a tensor of at least
4 MiB, only in the thread that fills them, bitwise the same values as eager, and
silently nothing where the advice is unavailable or fails."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill import _hugepages

Call = tuple[int, int, int]
_MiB = 1 << 20


def _deferred(width: int) -> nn.Sequential:
    model = nn.Sequential(dnn.Linear(width), nn.ReLU(), dnn.Linear(8))
    built: nn.Sequential = di.build(model, (2, width), device="meta")
    return built


def _eager(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))


def _first_weight(model: nn.Sequential) -> torch.Tensor:
    weight = model[0].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _same(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Every madvise call, recorded (and not made)."""
    made: list[Call] = []

    def record(address: int, length: int, advice: int) -> int:
        made.append((address, length, advice))
        return 0

    monkeypatch.setattr(_hugepages, "_libc_madvise", lambda: record)
    monkeypatch.setattr(_hugepages, "_huge_pages_mode", lambda: "madvise")
    yield made


_HUGEPAGE, _POPULATE_WRITE = 14, 23


def _advised(calls: list[Call], advice: int) -> list[Call]:
    return [call for call in calls if call[2] == advice]


def _failing(result: int | None) -> Callable[[int, int, int], int]:
    def madvise(address: int, length: int, advice: int) -> int:
        if result is None:
            raise OSError("madvise is not there")
        return result

    return madvise


def test_a_large_layers_tensors_are_advised_on_their_aligned_part(calls: list[Call]) -> None:
    weight = _first_weight(di.materialize(_deferred(1024)))  # 4 MiB
    start, end = weight.data_ptr(), weight.data_ptr() + weight.numel() * 4
    huge = _advised(calls, _HUGEPAGE)
    assert len(huge) == 1  # the 4 MiB weight only: the rest is under 2 MiB
    address, length, _ = huge[0]
    assert address % (2 * _MiB) == 0 and length % (2 * _MiB) == 0 and length > 0
    assert start <= address and address + length <= end


def _pages(t: torch.Tensor) -> tuple[int, int]:
    """The first and past-the-last byte of the 4 KiB pages ``t``'s bytes lie on."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return start // 4096 * 4096, -(-end // 4096) * 4096


def _covered(calls: list[Call]) -> list[tuple[int, int]]:
    return sorted((address, address + length) for address, length, _ in calls)


@pytest.mark.parametrize("mode", ["madvise", "always"])
def test_a_large_layers_tensors_are_populated_on_their_small_pages(
    calls: list[Call], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(_hugepages, "_huge_pages_mode", lambda: mode)
    weight = _first_weight(di.materialize(_deferred(1024)))  # 4 MiB; bias 4 KiB
    first, last = _pages(weight)
    huge = -(-first // (2 * _MiB)) * (2 * _MiB), last // (2 * _MiB) * (2 * _MiB)
    populated = _covered(_advised(calls, _POPULATE_WRITE))
    # The pages around the huge ones, each range once; the bias (under 64 KiB) not.
    assert populated == [r for r in ((first, huge[0]), (huge[1], last)) if r[0] < r[1]]
    assert _covered(_advised(calls, _HUGEPAGE)) == ([huge] if mode == "madvise" else [])
    assert all(address % 4096 == 0 and length % 4096 == 0 for address, length, _ in calls)


def test_every_page_is_populated_where_huge_pages_never_come(
    calls: list[Call], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_hugepages, "_huge_pages_mode", lambda: "never")
    weight = _first_weight(di.materialize(_deferred(1024)))
    assert [advice for _, _, advice in calls] == [_POPULATE_WRITE]
    assert _covered(calls) == [_pages(weight)]


def test_a_tensor_with_no_whole_huge_page_is_populated_whole(calls: list[Call]) -> None:
    meta = [torch.empty(4 * _MiB, dtype=torch.uint8, device="meta")]
    with _hugepages.huge_pages(meta, torch.device("cpu"), populate=True):
        small = torch.empty(1 * _MiB, dtype=torch.uint8)
    assert [advice for _, _, advice in calls] == [_POPULATE_WRITE]
    assert _covered(calls) == [_pages(small)]


def test_seed_advises_too(calls: list[Call]) -> None:
    di.materialize(_deferred(1024), seed=0)
    advices = [advice for _, _, advice in calls]
    assert advices[0] == _HUGEPAGE and set(advices) == {_HUGEPAGE, _POPULATE_WRITE}


def test_small_layers_are_not_advised(calls: list[Call]) -> None:
    di.materialize(_deferred(512))  # weight 1 MiB
    di.materialize(_deferred(512), seed=0)
    assert calls == []


def test_other_threads_are_not_advised(calls: list[Call]) -> None:
    meta = [torch.empty(4 * _MiB, dtype=torch.uint8, device="meta")]
    made: list[torch.Tensor] = []
    with _hugepages.huge_pages(meta, torch.device("cpu")):
        other = threading.Thread(target=lambda: made.append(torch.empty(4 * _MiB)))
        other.start()
        other.join()
    assert len(made) == 1 and calls == []


@pytest.mark.parametrize("result", [-1, None], ids=["madvise fails", "madvise raises"])
def test_a_failing_madvise_is_silent_and_changes_no_value(
    monkeypatch: pytest.MonkeyPatch, result: int | None
) -> None:
    monkeypatch.setattr(_hugepages, "_libc_madvise", lambda: _failing(result))
    model = _deferred(1024)
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert _same(model, _eager(1024))


def test_unavailable_advice_is_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hugepages, "_libc_madvise", lambda: None)
    meta = [torch.empty(4 * _MiB, dtype=torch.uint8, device="meta")]
    assert not isinstance(_hugepages.huge_pages(meta, torch.device("cpu")), _hugepages._Advise)


def test_values_are_eagers_with_the_advice() -> None:
    model = _deferred(1024)
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert _same(model, _eager(1024))


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags of the mapping that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


@pytest.mark.skipif(
    _hugepages._libc_madvise() is None or not _hugepages._huge_on_request(),
    reason="transparent huge pages on request only (Linux, THP 'madvise') are not here",
)
def test_the_kernel_holds_the_advice_on_linux() -> None:
    assert sys.platform.startswith("linux")
    weight = _first_weight(di.materialize(_deferred(1024)))
    aligned = -(-weight.data_ptr() // (2 * _MiB)) * (2 * _MiB)
    assert "hg" in _vm_flags(aligned)  # VM_HUGEPAGE: madvise(MADV_HUGEPAGE) applied


def test_a_ranks_kept_slices_and_scratch_are_advised_and_exact(calls: list[Call]) -> None:
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 - DTensor stack on demand

    width = 2048  # a 16 MiB weight, written in the scratch buffer; rank 0 keeps 8 MiB
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        model = _deferred(width)
        for layer in model:
            fully_shard(layer)
        torch.manual_seed(3)
        di.materialize(model)
        local = _first_weight(model).to_local()  # type: ignore[attr-defined]
    finally:
        dist.destroy_process_group()
    torch.manual_seed(3)
    eager = nn.Linear(width, width)
    assert torch.equal(local, eager.weight[: width // 2])
    lengths = sorted(length for _, length, _ in _advised(calls, _HUGEPAGE))
    # A rank's stand-ins take the writes; the layer's own new tensors stay untouched,
    # so nothing is populated (it would make them resident: peak memory).
    assert not _advised(calls, _POPULATE_WRITE)
    assert any(6 * _MiB <= n <= 8 * _MiB for n in lengths), lengths  # the kept slice
    assert any(n >= 14 * _MiB for n in lengths), lengths  # the scratch buffer


def _resident_pages(address: int, length: int) -> int:
    """How many of the pages of ``[address, address + length)`` are in memory."""
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = length // 4096
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(address, length, vector) == 0
    return sum(byte & 1 for byte in vector.raw)


def _populate_works() -> bool:
    """Whether this kernel maps pages on ``MADV_POPULATE_WRITE`` (Linux 5.14+)."""
    madvise = _hugepages._libc_madvise()
    if madvise is None:
        return False
    probe = torch.empty(16, dtype=torch.uint8)
    address = probe.data_ptr() // 4096 * 4096
    return madvise(address, 4096, _POPULATE_WRITE) == 0


@pytest.mark.skipif(not _populate_works(), reason="MADV_POPULATE_WRITE (Linux 5.14+) is not here")
def test_the_kernel_maps_a_new_tensors_small_pages_before_its_first_write() -> None:
    meta = [torch.empty(4 * _MiB, dtype=torch.uint8, device="meta")]
    with _hugepages.huge_pages(meta, torch.device("cpu"), populate=True):
        fresh = torch.empty(1 * _MiB, dtype=torch.uint8)  # no whole huge page; unwritten
    first = -(-fresh.data_ptr() // 4096) * 4096
    length = (fresh.data_ptr() + fresh.numel()) // 4096 * 4096 - first
    assert _resident_pages(first, length) == length // 4096


def test_without_populate_a_new_tensor_is_only_advised(calls: list[Call]) -> None:
    meta = [torch.empty(4 * _MiB, dtype=torch.uint8, device="meta")]
    with _hugepages.huge_pages(meta, torch.device("cpu")):
        torch.empty(1 * _MiB, dtype=torch.uint8)  # under 2 MiB: nothing
        torch.empty(4 * _MiB, dtype=torch.uint8)
    assert [advice for _, _, advice in calls] == [_HUGEPAGE]


class _Storage:
    def __init__(self, address: int, nbytes: int) -> None:
        self.address, self.size = address, nbytes

    def data_ptr(self) -> int:
        return self.address

    def nbytes(self) -> int:
        return self.size


class _Placed:
    """What ``advise`` reads of a CPU tensor: its storage's address and size."""

    device = torch.device("cpu")

    def __init__(self, address: int, nbytes: int) -> None:
        self.storage = _Storage(address, nbytes)

    def untyped_storage(self) -> _Storage:
        return self.storage


def test_huge_pages_cover_every_2_mib_block_of_the_tensors_own_pages(calls: list[Call]) -> None:
    # 16 bytes past a 2 MiB boundary (a heap chunk's header), ending within the last
    # 4 KiB page below the next-but-one boundary: both 2 MiB blocks are its pages.
    base = 512 * 2 * _MiB
    placed = _Placed(base + 16, 4 * _MiB - 16 - 100)
    _hugepages.advise(placed, populate=True)  # type: ignore[arg-type]
    assert calls == [(base, 4 * _MiB, _HUGEPAGE)]  # no small page left to populate
