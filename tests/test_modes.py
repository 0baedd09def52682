"""``aal.utils.eval_mode``: the one place a model's mode is set for a block and restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aal.attacks.base import attack_mode
from aal.utils import eval_mode


def mixed_model() -> nn.Sequential:
    """Train mode with one BatchNorm deliberately in eval mode and one parameter frozen."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[1].eval()
    model[3].bias.requires_grad_(False)
    return model


def state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("raises", [False, True])
def test_eval_mode_sets_then_restores_exactly(freeze, raises):
    model = mixed_model()
    before = state(model)
    inside = []

    def block():
        with eval_mode(model, freeze=freeze) as m:
            assert m is model
            inside.append(state(model))
            if raises:
                raise RuntimeError("boom")

    if raises:
        with pytest.raises(RuntimeError, match="boom"):
            block()
    else:
        block()
    modes, grads = inside[0]
    assert not any(modes)
    assert (not any(grads)) if freeze else grads == before[1]
    assert state(model) == before  # the mixed BatchNorm and the frozen bias included


@pytest.mark.parametrize("training,expect", [(True, True), (None, None)])
def test_eval_mode_train_and_keep(training, expect):
    model = mixed_model()
    before = state(model)
    with eval_mode(model, training=training):
        modes = state(model)[0]
    assert modes == ([True] * len(modes) if expect else before[0])
    assert state(model) == before


def test_attack_mode_is_eval_mode_with_frozen_parameters():
    model = mixed_model()
    before = state(model)
    with attack_mode(model):
        assert state(model) == ([False] * len(before[0]), [False] * len(before[1]))
    assert state(model) == before
    with pytest.raises(ValueError, match="mode must be"):
        with attack_mode(model, "test"):
            pass
    assert state(model) == before


def test_uncompiled_unwraps_a_compile_wrapper_only():
    from aal.utils.modes import uncompiled

    net = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = net  # what torch.compile's OptimizedModule holds
    assert uncompiled(wrapper) is net and uncompiled(net) is net
