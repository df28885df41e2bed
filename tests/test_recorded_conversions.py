"""A recorded model converted before ``di.materialize`` (``model.to(torch.bfloat16)``)
gets eager's values converted as that conversion after eager construction would;
a conversion inside the recorded factory, which torch cannot apply to the
recording's fake tensors, is a ``RecordError`` naming the fix, not torch's
``RuntimeError``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
def test_a_recorded_model_converted_before_materialize_equals_eager_converted(
    dtype: torch.dtype,
) -> None:
    model = di.deferred_init(_model)
    model.to(dtype)
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    eager = _model().to(dtype)
    ours, theirs = model.state_dict(), eager.state_dict()
    assert all(ours[k].dtype == dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_conversion_inside_the_factory_is_a_record_error_with_the_fix() -> None:
    with pytest.raises(di.DeferredInitError, match=r"converts a module while it is recorded.*Fix"):
        di.deferred_init(lambda: _model().to(torch.bfloat16))
