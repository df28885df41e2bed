"""``di.build`` and layers whose forward depends on tensor values (DESIGN §2).

A shape-only pass has shapes but no values. ``nn.AdaptiveLogSoftmaxWithLoss``
selects rows by target value (``nonzero``), so the pass answers it from shapes
(an output of shape ``(batch,)``, or ``()`` unbatched, in the input's dtype, and
a scalar loss): it builds like any layer, on the CPU or on meta, and equals the
eager layer bitwise under the same seed. Any other forward that reads values
fails with an error that says so, names the layer and gives the fixes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]

X, TARGET = torch.randn(4, 16), torch.tensor([0, 3, 7, 9])


def test_adaptive_log_softmax_builds_from_examples_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    built = di.build(dnn.AdaptiveLogSoftmaxWithLoss(10, [4, 8]), X, TARGET)
    assert isinstance(built, nn.AdaptiveLogSoftmaxWithLoss)
    torch.manual_seed(0)
    eager = nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8])
    assert_same_state(built, eager)
    ours, theirs = built(X, TARGET), eager(X, TARGET)
    assert torch.equal(ours.output, theirs.output) and torch.equal(ours.loss, theirs.loss)


def test_adaptive_log_softmax_builds_from_shapes_and_unbatched_examples(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    built = di.build(dnn.AdaptiveLogSoftmaxWithLoss(10, [4, 8]), (16,), torch.tensor(3))
    torch.manual_seed(0)
    assert_same_state(built, nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8]))


def test_adaptive_log_softmax_builds_on_meta_then_materializes_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    model = di.build(dnn.AdaptiveLogSoftmaxWithLoss(10, [4, 8]), X, TARGET, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert_same_state(model, nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8]))


class Classifier(nn.Module):
    """A body, the adaptive softmax on its features, and a head on its output."""

    def __init__(self, adaptive: nn.Module) -> None:
        super().__init__()
        self.body = dnn.Linear(16)
        self.adaptive = adaptive
        self.head = dnn.Linear(2)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.adaptive(self.body(x), target)
        assert out.output.shape == target.shape and out.loss.shape == ()
        assert out.output.dtype == x.dtype and out.loss.dtype == x.dtype
        result: torch.Tensor = self.head(out.output.unsqueeze(-1)) + out.loss
        return result


def test_the_shapes_it_answers_feed_the_layers_after_it(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    built = di.build(Classifier(dnn.AdaptiveLogSoftmaxWithLoss(10, [4, 8])), (4, 8), TARGET)
    torch.manual_seed(0)
    # Eager's order: Classifier's argument is constructed before Classifier's own layers.
    adaptive = nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8])
    eager = nn.Module()
    eager.body = nn.Linear(8, 16)
    eager.adaptive = adaptive
    eager.head = nn.Linear(1, 2)
    assert_same_state(built, eager)


def test_a_built_adaptive_log_softmax_is_answered_from_shapes_too() -> None:
    model = Classifier(nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8]))
    di.build(model, (4, 8), TARGET)
    assert di.is_built(model)


def test_a_target_of_the_wrong_rank_is_refused_and_nothing_is_built() -> None:
    layer = dnn.AdaptiveLogSoftmaxWithLoss(10, [4, 8])
    with pytest.raises(di.InferenceError, match=r"AdaptiveLogSoftmaxWithLoss.*0D or 1D target"):
        di.build(layer, X, TARGET.reshape(2, 2))
    assert isinstance(layer, di.Deferred)


class Positives(nn.Module):
    """Keeps the positive entries: how many depends on the values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0].reshape(-1, 1)


def test_a_forward_that_reads_values_says_so_and_builds_nothing() -> None:
    model = nn.Sequential(dnn.Linear(4), Positives(), dnn.Linear(3))
    with pytest.raises(
        di.InferenceError,
        match=r"Positives layer '1'.* reads tensor values.*depends on data values.*"
        r"Nothing was built.*first forward.*explicitly",
    ):
        di.build(model, (2, 5))
    assert isinstance(model[0], di.Deferred) and isinstance(model[2], di.Deferred)


def test_a_deferred_layer_whose_forward_reads_values_is_named() -> None:
    class Gate(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.proj = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kept: torch.Tensor = self.proj(x)[x.sum(-1) > 0]
            return kept

    model = nn.Sequential(nn.Identity(), di.defer(Gate, width=di.dim(-1))())
    with pytest.raises(
        di.InferenceError, match=r"Gate layer '1'.* reads tensor values.*depends on data values"
    ):
        di.build(model, (2, 5))
    assert isinstance(model[1], di.Deferred)
