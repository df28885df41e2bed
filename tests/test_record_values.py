"""Values read while recording: known ones answered, random ones refused by name."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deferinit._record import ReplayError, ValueReadError, deferred_init
from test_record_support import differing, materialize_recorded, recorded_and_eager


def test_trunc_normal_reads_a_literal_and_is_bitwise_eager() -> None:
    # nn.init.trunc_normal_ calls tensor.new_tensor(a, device="cpu").item() (HF ViT).
    def vit_like() -> nn.Module:
        m = nn.Linear(8, 8)
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
        m.cls = nn.Parameter(torch.zeros(1, 1, 8))
        nn.init.trunc_normal_(m.cls, std=0.02)
        return m

    eager, model = recorded_and_eager(vit_like)
    assert differing(eager, model) == []


def test_a_value_computed_from_literals_steers_control_flow() -> None:
    class Steered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = torch.tensor([3, 5]) * torch.arange(1, 3)  # [3, 10]
            self.width = int(sizes.sum())  # 13: not a literal, computed
            self.layer = nn.Linear(self.width, 2)
            if bool((torch.zeros(4) + 1).all()):
                self.extra = nn.Linear(2, 2)
            self.steps = torch.linspace(0, 1, 3).tolist()

    eager, model = recorded_and_eager(Steered)
    assert model.width == 13 and hasattr(model, "extra")
    assert model.steps == [0.0, 0.5, 1.0]
    assert differing(eager, model) == []


class Steered(nn.Module):
    """Python control flow steered by a random value, as in a rejection sampler."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        if self.w.sum() > 0:
            self.extra = nn.Parameter(torch.randn(3))
        self.scale = nn.Parameter(self.w.detach() / self.w.abs().max().item())


def _seeds_with_both_branches() -> tuple[int, int]:
    taken: dict[bool, int] = {}
    for seed in range(20):
        torch.manual_seed(seed)
        taken.setdefault(bool(torch.randn(4).sum() > 0), seed)
    return taken[True], taken[False]


def test_a_random_read_is_simulated_exactly_when_seeded_before_recording() -> None:
    for seed in _seeds_with_both_branches():
        torch.manual_seed(seed)
        eager = Steered()
        torch.manual_seed(seed)
        model: Any = deferred_init(Steered)
        assert hasattr(model, "extra") == hasattr(eager, "extra")
        materialize_recorded(model)
        assert differing(eager, model) == []


def test_a_random_read_steering_another_path_at_materialize_raises_and_leaves_meta() -> None:
    up, down = _seeds_with_both_branches()
    torch.manual_seed(up)
    model: Any = deferred_init(Steered)
    torch.manual_seed(down)
    state = torch.get_rng_state()
    with pytest.raises(
        ReplayError,
        match=r"steered by random numbers \(aten\._local_scalar_dense.default in "
        r".*Steered\.__init__ \(.*test_record_values.py:\d+\)\); while recording it was "
        r"True.*it is False.*Fix: set the seed before deferred_init",
    ):
        materialize_recorded(model)
    assert model.w.is_meta and torch.equal(torch.get_rng_state(), state)


def test_trunc_normal_is_never_silently_different_under_another_seed() -> None:
    def tight() -> nn.Module:
        m = nn.Linear(64, 64)
        nn.init.trunc_normal_(m.weight, std=1.0, a=-1.0, b=1.0)  # rejections are likely
        return m

    for seed in range(3):
        torch.manual_seed(100 + seed)
        model: Any = deferred_init(tight)
        torch.manual_seed(seed)
        eager = tight()
        torch.manual_seed(seed)
        try:
            materialize_recorded(model)
        except ReplayError:
            continue
        assert differing(eager, model) == []


def test_a_random_read_after_a_draw_with_its_own_generator_raises_naming_the_module() -> None:
    class OwnGenerator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.w = nn.Parameter(torch.randn(4, generator=g))
            self.big = bool(self.w.sum() > 0)

    with pytest.raises(
        ValueReadError,
        match=r"in .*OwnGenerator\.__init__ \(.*\): an earlier draw \(aten\.randn.*its own "
        r"generator\) is too costly to replay at record time.*Fix: move this read",
    ):
        deferred_init(OwnGenerator)


def test_a_data_dependent_shape_from_literals_is_computed_now() -> None:
    def masked() -> nn.Module:
        m = nn.Linear(4, 4)
        keep = torch.tensor([1, 0, 1, 1]).nonzero().flatten()  # shape known only from values
        m.register_buffer("keep", keep)
        return m

    eager, model = recorded_and_eager(masked)
    assert torch.equal(model.keep, torch.tensor([0, 2, 3]))
    assert differing(eager, model) == []
