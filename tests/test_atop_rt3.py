"""AToP's RT3: ``mix`` random-transform draws combined (paper Fig. 2b, or the public code's mix number).

Checked: ``mix=1`` is RT2 bit for bit (same draws, same purified images) in both modes; the
``disjoint`` masks never overlap, share one noise draw and each pixel of the result comes from
the copy that hid it; ``independent`` draws really differ and are averaged at the input; invalid
settings fail at construction; attacks differentiate through RT3.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aal
from aal.attacks import PGD
from aal.models.purifier import PurifiedClassifier, RandomTransform, build_atop_model


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class Identity(nn.Module):
    """A purifier that returns its (transformed) input and records the hole masks it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, holes):
        self.seen.append(holes)
        return x


def pipeline(purifier: nn.Module, mix: int, mode: str, seed: int | None = 5, **transform) -> PurifiedClassifier:
    torch.manual_seed(0)
    t = RandomTransform(block_size=4, seed=seed, **transform)
    return PurifiedClassifier(aal.create_model("small_cnn"), purifier, t, mix=mix, mix_mode=mode)


@pytest.mark.parametrize("mode", ["disjoint", "independent"])
def test_mix_one_is_rt2_exactly(mode):
    x = images()
    x_t, holes = RandomTransform(block_size=4, seed=5).forward(x)
    xs, hs = RandomTransform(block_size=4, seed=5).sample(x, 1, mode)
    assert torch.equal(xs[0], x_t) and torch.equal(hs[0], holes)
    # the whole pipeline, with a real purifier and the global RNG (seed=None): RT2's images
    torch.manual_seed(1)
    g = aal.create_model("purifier_unet", in_channels=1, width=8)
    rt2 = PurifiedClassifier(aal.create_model("small_cnn"), g, RandomTransform(block_size=4))
    rt3 = PurifiedClassifier(aal.create_model("small_cnn"), g, RandomTransform(block_size=4), mix=1, mix_mode=mode)
    torch.manual_seed(7)
    x_t, holes = rt2.transform(x)
    expected = g(x_t, holes)
    torch.manual_seed(7)
    assert torch.equal(rt3.purify(x), expected)


def test_disjoint_masks_share_one_noise_draw_and_each_pixel_comes_from_the_copy_that_hid_it():
    x, k = images(), 4
    xs, hs = RandomTransform(block_size=4, seed=5).sample(x, k, "disjoint")
    assert xs.shape == (k, 3, 1, 28, 28) and hs.shape == (k, 3, 1, 28, 28)
    assert hs.sum(0).max() == 1, "masks overlap"
    blocks = hs.sum((2, 3, 4)) / 16  # 4x4 blocks per mask and image
    assert torch.equal(blocks, torch.full((k, 3), 12.0))  # floor(0.25 * 49) each
    assert all(not torch.equal(hs[0], hs[i]) for i in range(1, k))
    # outside every hole all copies show the same noisy pixel: one noise draw
    visible = (hs.sum(0) == 0).expand_as(xs[0])
    assert all(torch.equal(xs[i][visible], xs[0][visible]) for i in range(k))

    g = torch.Generator().manual_seed(5)  # the transform's first draw is the noise
    noisy = (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    out = pipeline(Identity(), k, "disjoint").purify(x)
    # identity purifier: a hidden pixel is taken from the copy that hid it (there: the fill),
    # a pixel no mask hid is the mean of the copies (all equal to the noisy pixel)
    covered = hs.sum(0).bool().expand_as(out)
    assert torch.equal(out[covered], torch.full_like(out[covered], 0.5))
    assert torch.allclose(out[~covered], noisy[~covered], atol=1e-6)


def test_independent_draws_differ_and_are_averaged_at_the_input():
    x, k = images(), 3
    xs, hs = RandomTransform(block_size=4, seed=5).sample(x, k, "independent")
    assert all(not torch.equal(hs[0], hs[i]) for i in range(1, k)), "masks should be independent draws"
    both_visible = ((hs[0] == 0) & (hs[1] == 0)).expand_as(xs[0])
    assert not torch.equal(xs[0][both_visible], xs[1][both_visible]), "noise should be independent draws"
    purifier = Identity()
    out = pipeline(purifier, k, "independent").purify(x)
    assert torch.allclose(out, xs.mean(0), atol=1e-7)
    assert len(purifier.seen) == 1 and torch.allclose(purifier.seen[0], hs.mean(0))


@pytest.mark.parametrize(
    "kw, match",
    [({"mix": 0}, "mix"), ({"mix": 2.5}, "mix"), ({"mix_mode": "mean"}, "mix_mode"), ({"mix": 5}, "exceed")],
)
def test_invalid_rt3_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        build_atop_model(aal.create_model("small_cnn"), "purifier_ae", in_channels=1, **kw)


def test_rt3_without_sample_is_refused():
    with pytest.raises(ValueError, match="sample"):
        PurifiedClassifier(aal.create_model("small_cnn"), Identity(), nn.Identity(), mix=2)


@pytest.mark.parametrize("mode", ["disjoint", "independent"])
def test_attack_differentiates_through_rt3(mode):
    torch.manual_seed(0)
    model = build_atop_model(aal.create_model("small_cnn"), "purifier_ae", in_channels=1,
                             purifier_options={"width": 8}, mix=3, mix_mode=mode).eval()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    x_adv = PGD(0.1, steps=2, step_size=0.05)(model, x, y)
    assert not torch.equal(x_adv, x) and ((x_adv - x).abs() <= 0.1 + 1e-6).all()
