"""``di.materialize(seed=)`` learns a layer's registration order by a dry run on
meta once per kind of layer (:mod:`deferinit._fill._streams`): repeated layers
reuse it, and a remembered order that does not fit a run is never trusted, so the
values are always those of each tensor initialized alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill import _dispatch, _streams
from deferinit._fill._each import each_tensor

CPU = torch.device("cpu")


def _blocks(depth: int) -> nn.Sequential:
    layers = [dnn.TransformerEncoderLayer(nhead=2, dim_feedforward=16) for _ in range(depth)]
    built: nn.Sequential = di.build(nn.Sequential(*layers), (3, 8), device="meta")
    return built


@pytest.fixture
def dry_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the dry runs on meta, from an empty memory of orders, in one thread
    (workers starting together would each make the first dry run)."""
    monkeypatch.setattr(_streams, "_ORDERS", {})
    counted: list[int] = []
    real = _dispatch.registration_order

    def counting(*args: object, **kwargs: object) -> dict[str, int] | None:
        counted.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_streams, "registration_order", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield counted
    finally:
        torch.set_num_threads(threads)


def test_repeated_layers_make_one_dry_run(dry_runs: list[int]) -> None:
    di.materialize(_blocks(3), seed=0)
    assert len(dry_runs) == 1


def test_values_are_each_tensor_alone_with_remembered_orders(dry_runs: list[int]) -> None:
    model = di.materialize(_blocks(3), seed=0)
    again = di.materialize(_blocks(3), seed=0)
    assert len(dry_runs) == 1
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_wrong_remembered_order_is_found_out_and_changes_no_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def seeds(name: str) -> int:
        return len(name) * 7 + ord(name[0])

    def make() -> nn.Module:
        return nn.Linear(3, 2)

    wrong = {"weight": 1, "bias": 0}  # Linear registers weight first
    monkeypatch.setattr(_streams, "_ORDERS", {"linear": wrong})
    whole = _streams.seeded_whole(make, CPU, seeds, key="linear")
    assert isinstance(whole, nn.Linear)
    alone = dict(each_tensor(make, ["weight", "bias"], CPU, seeds))
    assert torch.equal(whole.weight, alone["weight"]) and torch.equal(whole.bias, alone["bias"])
    assert _streams._ORDERS["linear"] is None  # never guessed again
