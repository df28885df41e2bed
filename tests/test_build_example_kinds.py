"""What a shape example becomes in ``di.build`` (DESIGN §3.5, §3.10).

A shape says nothing of dtype: for a model whose first leaf layer (registration
order) takes indices, an ``nn.Embedding`` or ``nn.EmbeddingBag``, it is a
``torch.long`` example, as token ids would be. A shape with a negative size, or a
size that is no int (a float, a bool), is an ``InferenceError`` naming the
example and what a shape holds, with nothing built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def test_a_shape_for_an_embedding_first_is_token_ids(assert_same_state: AssertSameState) -> None:
    torch.manual_seed(0)
    built = di.build(nn.Sequential(nn.Embedding(10, 4), dnn.Linear(3)), (2, 7))
    torch.manual_seed(0)
    assert_same_state(built, nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
    assert built(torch.randint(10, (2, 7))).shape == (2, 7, 3)


class _Bagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 6)
        self.head = nn.Sequential(dnn.LayerNorm(), dnn.Linear(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.bag(ids))
        return out


def test_a_shape_for_an_embedding_bag_inside_a_block_is_token_ids() -> None:
    model = di.build(_Bagged(), (3, 5))
    assert model.head[1].in_features == 6


def test_a_deferred_embedding_first_takes_token_ids() -> None:
    embedding = di.defer(nn.Embedding, embedding_dim=lambda ids: ids.shape[-1])
    model = di.build(nn.Sequential(embedding(10), dnn.Linear(3)), (2, 4))
    assert model[0].embedding_dim == 4 and model[1].in_features == 4


def test_an_embedding_later_does_not_change_a_float_example() -> None:
    seen: list[torch.dtype] = []
    model = nn.Sequential(dnn.Linear(4), nn.Embedding(10, 4))
    model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with pytest.raises(Exception):  # noqa: B017, PT011 - torch's own indices error
        di.build(model, (2, 3))
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("shape", [(2, -1), (-2,), (2, 2.5), (2, True), (3.0, 4)])
def test_a_bad_size_in_a_shape_is_an_inference_error(shape: Any) -> None:
    model = nn.Sequential(dnn.Linear(3))
    with pytest.raises(di.InferenceError) as caught:
        di.build(model, shape)
    message = str(caught.value)
    assert "example" in message and "argument 0" in message and repr(shape) in message
    assert "Nothing was built" in message
    assert di.pending(model) == ["0"]


def test_a_bad_shape_given_by_keyword_is_named_by_keyword() -> None:
    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = dnn.Linear(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(x)
            return out

    model = Keyed()
    with pytest.raises(di.InferenceError, match="keyword 'x'"):
        di.build(model, x=(2, -5))
    assert di.pending(model) == ["fc"]


def test_a_tuple_of_floats_is_not_taken_for_a_shape() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = dnn.Linear(3)

        def forward(self, x: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
            out: torch.Tensor = self.fc(x) * scale[0]
            return out

    model = di.build(Scaled(), (2, 5), (0.5, 2.0))
    assert model.fc.in_features == 5
