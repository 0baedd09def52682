"""FAB / FAB-T (Croce & Hein 2020): the projection, the minimum it reaches, the mask, batching, targets.

The generic contract (budget, mask, per-sample eps, model state, dtype, ...) is checked for these
attacks by ``test_attacks.py`` and the agreement with torchattacks by ``test_apgd.py``; here what
is FAB's own.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aal.attacks import FAB, FABT, project_hyperplane_box

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- projection
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_reference(norm):
    """The same step as the reference's ``projection_linf`` / ``projection_l2`` (torchattacks'
    copy of ``autoattack/fab_projections.py``) on the box [0,1], including points on the faces,
    zero weights and hyperplanes that miss the box."""
    fab = pytest.importorskip("torchattacks.attacks.fab")
    ref = {"linf": fab.projection_linf, "l2": fab.projection_l2}[norm]
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        b, d = 16, int(torch.randint(2, 60, (1,), generator=g))
        t = torch.rand(b, d, generator=g, dtype=torch.float64)
        if trial % 3 == 0:
            t[:, : d // 3] = torch.randint(0, 2, (b, d // 3), generator=g).double()  # on the faces
        w = torch.randn(b, d, generator=g, dtype=torch.float64)
        if trial % 4 == 0:
            w[:, : d // 4] = 0
        off = (w * torch.rand(b, d, generator=g, dtype=torch.float64)).sum(1) * 2 * torch.rand(b, generator=g, dtype=torch.float64)
        ours = project_hyperplane_box(t, w, off, torch.zeros_like(t), torch.ones_like(t), norm)
        torch.testing.assert_close(ours, ref(t.clone(), w.clone(), off.clone()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_feasible_and_minimal_on_a_general_box(norm):
    """On a box [lo, hi] around t: the step lands on the hyperplane inside the box when they
    intersect, and no feasible random point of the hyperplane is closer."""
    g = torch.Generator().manual_seed(1)
    b, d = 64, 12
    t = torch.zeros(b, d, dtype=torch.float64)
    lo = -torch.rand(b, d, generator=g, dtype=torch.float64)
    hi = torch.rand(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, d, generator=g, dtype=torch.float64)
    target = lo + (hi - lo) * torch.rand(b, d, generator=g, dtype=torch.float64)  # a box point on each hyperplane
    off = (w * target).sum(1)
    step = project_hyperplane_box(t, w, off, lo, hi, norm)
    torch.testing.assert_close((w * step).sum(1), off, atol=1e-9, rtol=0)
    assert ((step >= lo - 1e-12) & (step <= hi + 1e-12)).all()
    size = step.abs().amax(1) if norm == "linf" else step.norm(dim=1)
    # other feasible points of the hyperplane: mix the found one with random box points, then fix
    # the offset along a coordinate with room; none may be smaller
    for _ in range(200):
        cand = lo + (hi - lo) * torch.rand(b, d, generator=g, dtype=torch.float64)
        cand = step + 0.3 * (cand - step)
        j = w.abs().argmax(1)
        rows = torch.arange(b)
        cand[rows, j] += (off - (w * cand).sum(1)) / w[rows, j]
        ok = ((cand >= lo) & (cand <= hi)).all(1)
        c_size = cand.abs().amax(1) if norm == "linf" else cand.norm(dim=1)
        assert (c_size[ok] >= size[ok] - 1e-9).all()


def test_projection_of_a_missed_hyperplane_is_the_nearest_corner():
    t = torch.zeros(1, 3)
    w = torch.tensor([[1.0, -2.0, 0.0]])
    lo, hi = torch.full((1, 3), -0.1), torch.full((1, 3), 0.2)
    step = project_hyperplane_box(t, w, torch.tensor([5.0]), lo, hi, "linf")
    assert torch.equal(step, torch.tensor([[0.2, -0.1, 0.0]]))  # <w, .> as large as the box allows


# ----------------------------------------------------------------------------- the minimum
def _linear_binary(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    return model.eval()


@pytest.mark.parametrize("cls", [FAB, FABT])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_reaches_the_closed_form_minimum_of_a_linear_model(cls, norm):
    """For a linear binary classifier away from the box edges the smallest adversarial
    perturbation has norm ``|f(x)| / ||w||_q`` (q the dual norm); FAB must get within 1 %."""
    model = _linear_binary()
    g = torch.Generator().manual_seed(2)
    x = 0.3 + 0.4 * torch.rand(32, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = out.argmax(1)
    w = (model[1].weight[1] - model[1].weight[0]).detach()
    margin = (out[:, 1] - out[:, 0]).abs()
    optimum = margin / (w.abs().sum() if norm == "linf" else w.norm())
    kw = {"n_target_classes": 1} if cls is FABT else {}
    x_adv = cls(1.0, norm=norm, steps=30, **kw)(model, x, y)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    assert (size >= optimum * (1 - 1e-9)).all() and (size <= optimum * 1.01).all(), (size / optimum)
    # the final check: with a budget below the minimum nothing counts, every point comes back clean
    assert torch.equal(cls(0.9 * float(optimum.min()), norm=norm, steps=30, **kw)(model, x, y), x)


# ----------------------------------------------------------------------------- mask
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constant_mask_is_a_smaller_budget(norm):
    """The mask scales the allowed perturbation per pixel: FAB with the constant mask c and budget
    eps finds the same examples as FAB without a mask and budget c * eps (it minimises
    ||delta / mask||)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    c, eps = 0.5, (0.3 if norm == "linf" else 1.5)
    masked = FABT(eps, norm=norm, steps=20, n_target_classes=3)(model, x, y, mask=torch.full_like(x, c))
    plain = FABT(c * eps, norm=norm, steps=20, n_target_classes=3)(model, x, y)
    torch.testing.assert_close(masked, plain, atol=1e-9, rtol=0)
    assert (masked != x).any() and (masked == x).all((1, 2, 3)).any()  # some broken, some not


def test_masked_pixels_stay_and_the_budget_is_per_pixel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    mask = torch.zeros(16, 1, 8, 8, dtype=torch.float64)
    mask[..., 2:6, 2:6] = torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64)
    x_adv = FAB(0.5, steps=20)(model, x, y, mask=mask)
    assert torch.equal(x_adv[mask == 0], x[mask == 0])
    assert ((x_adv - x).abs() <= 0.5 * mask + 1e-9).all()
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).any()


# ----------------------------------------------------------------------------- batching, restarts
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("cls", [FAB, FABT])
def test_batch_equals_single(cls, norm):
    """Each sample's result is its own: in a batch as alone (one run: no random draw), and with
    random restarts the first sample's (its start is drawn batch-size independently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    mask = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    kw = {"n_target_classes": 2} if cls is FABT else {}
    eps = 0.2 if norm == "linf" else 1.0
    attack = cls(eps, norm=norm, steps=10, **kw)
    for m in (None, mask):
        x_adv = attack(model, x, y, mask=m)
        for i in range(len(x)):
            one = attack(model, x[i : i + 1], y[i : i + 1], mask=None if m is None else m[i : i + 1])
            torch.testing.assert_close(x_adv[i : i + 1], one, atol=1e-9, rtol=0)
    restarts = cls(eps / 4, norm=norm, steps=10, restarts=3, seed=7, **kw)
    x_adv = restarts(model, x, y)
    torch.testing.assert_close(x_adv[:1], restarts(model, x[:1], y[:1]), atol=1e-9, rtol=0)
    assert torch.equal(restarts(model, x, y), x_adv)  # seeded: repeatable


def test_restarts_never_lose_a_broken_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)

    def broken(a):
        with torch.no_grad():
            return model(a(model, x, y)).argmax(1) != y

    one, more = broken(FAB(0.05, steps=5, seed=0)), broken(FAB(0.05, steps=5, restarts=4, seed=0))
    assert (more | ~one).all() and more.sum() >= one.sum()


# ----------------------------------------------------------------------------- targets
class OneWay(nn.Module):
    """Logits ``bias + (sum of pixels) / 2`` for class ``reach`` only, ``bias`` elsewhere: the clean
    order is the bias order (3, 2, 1, 0, -1) and only the boundary toward ``reach`` can be crossed."""

    def __init__(self, reach: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64))
        self.reach = reach

    def forward(self, x):
        out = self.bias.expand(x.shape[0], 5).clone()
        out[:, self.reach] = out[:, self.reach] + x.flatten(1).sum(1) / 2
        return out


def test_fab_t_targets_the_top_classes_in_order():
    """FAB-T follows the boundaries toward the classes with the 2nd, 3rd, ... highest clean logits,
    ``n_target_classes`` of them: a class outside them is never reached (its boundary is never
    followed), one inside is; the number is capped at C - 1."""
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)

    def lands(reach, k):
        model = OneWay(reach).eval()
        with torch.no_grad():
            return model(FABT(10.0, steps=10, n_target_classes=k)(model, x, y)).argmax(1)

    assert (lands(1, 1) == 1).all()  # the runner-up is the first target
    assert (lands(2, 1) == 0).all()  # the 3rd class is not among 1 target
    assert (lands(2, 2) == 2).all() and (lands(3, 3) == 3).all()
    assert (lands(4, 3) == 0).all() and (lands(4, 30) == 4).all()  # 30 targets: capped at the 4 others


def test_arguments_are_checked():
    for bad in ({"steps": 0}, {"restarts": 0}, {"alpha_max": 1.5}, {"eta": 0.0}, {"beta": 0.0}, {"targeted": True}):
        with pytest.raises(ValueError):
            FAB(0.1, **bad)
    with pytest.raises(ValueError):
        FABT(0.1, n_target_classes=0)
    with pytest.raises(ValueError, match="logits"):  # a model whose outputs are not (B, C) logits
        FAB(0.1, steps=1)(nn.Identity(), torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
