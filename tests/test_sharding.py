"""Few-shot and detection loaders under DDP sharding: every process's share of a step, put together,
is exactly the step of one process (images, augmentation, episodes), as for classification's BatchLoader;
and a meta-batch of episodes is one step whose loss is the mean of the episodes' losses."""

from __future__ import annotations

import pytest
import torch

import aal
from aal.data.fewshot import Episode, EpisodeBatch, EpisodeLoader, EpisodeSampler, episodes_of
from aal.data.loader import Split
from aal.data.voc import BCCD_CLASSES, DetectionLoader, DetectionSplit
from aal.methods import create_method


def _pool(n_classes: int = 8, per: int = 6, size: int = 8) -> Split:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n_classes * per, 1, size, size, generator=g) * 255).to(torch.uint8)
    return Split(x, torch.arange(n_classes).repeat_interleave(per))


def _flat(step) -> list[Episode]:
    return episodes_of(step)


def _same(a: Episode, b: Episode) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a.tensors(), b.tensors()))


@pytest.mark.parametrize("world", [2, 4])
def test_episode_shards_make_up_the_one_process_step(world):
    sampler = EpisodeSampler(_pool(), 3, 1, 2, seed=1)
    one = EpisodeLoader(sampler, episodes=8, seed=5, episodes_per_step=world)
    ranks = [EpisodeLoader(sampler, episodes=8, seed=5, episodes_per_step=world, rank=r, world_size=world)
             for r in range(world)]  # fmt: skip
    for loader in (one, *ranks):
        loader.set_epoch(3)
    assert len(one) == 8 // world and all(len(r) == len(one) for r in ranks)
    steps_one = [_flat(s) for s in one]
    steps_ranks = [[_flat(s) for s in r] for r in ranks]
    for s, ref in enumerate(steps_one):
        assert len(ref) == world
        for j, ep in enumerate(ref):  # episode j of the step is on rank j % world
            mine = steps_ranks[j % world][s]
            assert len(mine) == 1 and _same(mine[0], ep)
    # one episode per process per step is a plain Episode; several make an EpisodeBatch
    assert isinstance(next(iter(ranks[0])), Episode) and isinstance(next(iter(one)), EpisodeBatch)


def test_episode_loader_default_is_one_episode_per_step():
    sampler = EpisodeSampler(_pool(), 3, 1, 2, seed=1)
    a, b = EpisodeLoader(sampler, 4, seed=2), EpisodeLoader(sampler, 4, seed=2, episodes_per_step=2)
    flat_a = [ep for s in a for ep in _flat(s)]
    flat_b = [ep for s in b for ep in _flat(s)]
    assert len(a) == 4 and len(b) == 2 and all(_same(u, v) for u, v in zip(flat_a, flat_b))


@pytest.mark.parametrize("kwargs, match", [
    ({"episodes": 5, "episodes_per_step": 2}, "must divide"),
    ({"episodes": 4, "episodes_per_step": 2, "world_size": 4}, "multiple of the number of processes"),
    ({"episodes": 4, "rank": 2, "world_size": 2, "episodes_per_step": 2}, "rank"),
    ({"episodes": 4, "episodes_per_step": 0}, "episodes_per_step"),
])  # fmt: skip
def test_episode_loader_refuses_bad_sharding(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpisodeLoader(EpisodeSampler(_pool(), 3, 1, 2), **kwargs)


@pytest.mark.parametrize("name", ["protonet", "protonet_aal"])
def test_meta_batch_loss_and_gradient_are_the_episodes_mean(name):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", num_classes=0, in_channels=1, attention="cbam_nobn")
    model.eval()  # BatchNorm statistics fixed: the gradients must match exactly
    method = create_method(name, **({"eps": 0.1} if name == "protonet_aal" else {}))
    sampler = EpisodeSampler(_pool(size=28), 3, 1, 2, seed=1)
    eps = [sampler.episode(i) for i in range(2)]

    def grads(batch):
        model.zero_grad()
        out = method(model, batch)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (o0, g0), (o1, g1) = grads(eps[0]), grads(eps[1])
    ob, gb = grads(EpisodeBatch(tuple(eps)))
    assert torch.allclose(ob.loss, (o0.loss + o1.loss) / 2, atol=1e-6)
    assert all(torch.allclose(b, (u + v) / 2, atol=1e-6) for b, u, v in zip(gb, g0, g1))
    assert ob.logits.shape[0] == o0.logits.shape[0] + o1.logits.shape[0]
    assert ob.logs["acc"] == pytest.approx((o0.logs["acc"] + o1.logs["acc"]) / 2)


def _det_split(n: int) -> DetectionSplit:
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(n, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.6]]) + 0.01 * k, "labels": torch.tensor([k % 3]),
                "difficult": torch.tensor([False])} for k in range(n)]  # fmt: skip
    return DetectionSplit(imgs, targets, [f"i{k}" for k in range(n)], torch.full((n, 2), 8), BCCD_CLASSES)


@pytest.mark.parametrize("n, drop_last", [(12, False), (11, False), (11, True)])
@pytest.mark.parametrize("augment", ["none", "flip_photometric"])
def test_detection_shards_make_up_the_one_process_batch(n, drop_last, augment):
    split, world, per = _det_split(n), 2, 3
    common = dict(shuffle=True, drop_last=drop_last, augment=augment, seed=4)
    one = DetectionLoader(split, per * world, **common)
    ranks = [DetectionLoader(split, per, rank=r, world_size=world, **common) for r in range(world)]
    for loader in (one, *ranks):
        loader.set_epoch(2)
    assert all(len(r) == len(one) for r in ranks)
    for (x1, t1), *shards in zip(one, *ranks):
        m = len(x1)
        if n % world and not drop_last and m % world:
            continue  # the padded last batch repeats an image on one rank; checked below
        xs = torch.empty_like(x1)
        ts = [None] * m
        for r, (x, t) in enumerate(shards):
            xs[r::world] = x
            ts[r::world] = t
        assert torch.equal(xs, x1)
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ts, t1))
    seen = sum(len(x) for r in ranks for x, _ in r)
    assert seen == (n // (per * world) * per * world if drop_last else n + (-n) % world)


def test_detection_loader_one_process_unchanged_by_the_sharding_fields():
    split = _det_split(7)
    a = DetectionLoader(split, 3, shuffle=True, augment="flip_photometric", seed=1)
    b = DetectionLoader(split, 3, shuffle=True, augment="flip_photometric", seed=1, rank=0, world_size=1)
    for (xa, _), (xb, _) in zip(a, b):
        assert torch.equal(xa, xb)
    with pytest.raises(ValueError, match="rank"):
        DetectionLoader(split, 3, rank=1, world_size=1)
