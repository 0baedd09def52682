"""Few-shot learning (AAL paper Sec. 4.3): episodes, readers, the prototypical head, the support
attack on the background, evaluation with confidence intervals, and short real-data training runs.

Real data (Omniglot's minimal splits and one-shot runs in ../shared/data/omniglot, Fashion-MNIST
from the Debian package) is used when present; those tests skip cleanly otherwise.
"""

from __future__ import annotations

import doctest
import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.config import ConfigError
from aal.data import DataError, Split
from aal.data.fewshot import (
    FEWSHOT_DATASETS,
    Episode,
    EpisodeLoader,
    EpisodeSampler,
    class_subset,
    load_fewshot,
    read_csv_split,
    read_omniglot_runs,
    read_omniglot_zip,
    rotate_classes,
)
from aal.engine import Trainer, build_optimizer
from aal.methods import METHODS, Output, create_method
from aal.tasks import (
    FewShotTask,
    evaluate_fewshot,
    fewshot_config,
    is_fewshot_config,
    load_fewshot_config,
    mean_ci95,
)
from aal.engine.task_runs import load_fewshot_run, train_fewshot

REPO = Path(__file__).resolve().parents[1]


def _find_omniglot() -> Path:
    """``$AAL_DATA/omniglot[/python]`` or ``../shared/data/omniglot/python`` (the first with the small zips)."""
    cands = [REPO.parent / "shared" / "data" / "omniglot" / "python"]
    if os.environ.get("AAL_DATA"):
        base = Path(os.environ["AAL_DATA"]) / "omniglot"
        cands[:0] = [base, base / "python"]
    return next((c for c in cands if (c / "images_background_small1.zip").is_file()), cands[-1])


OMNIGLOT = _find_omniglot()
SMALL1 = OMNIGLOT / "images_background_small1.zip"
SMALL2 = OMNIGLOT / "images_background_small2.zip"
RUNS = OMNIGLOT / "one-shot-classification" / "all_runs.zip"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_omniglot = pytest.mark.skipif(not (SMALL1.is_file() and SMALL2.is_file() and RUNS.is_file()), reason="Omniglot files absent")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
EPISODIC = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", None) == "episode"]


# ----------------------------------------------------------------------------- helpers
def id_pool(n_classes: int = 10, per_class: int = 12, size: int = 4) -> Split:
    """Pool where image i carries its index i in pixels (0,0) and (0,1), label i % n_classes."""
    n = n_classes * per_class
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    idx = torch.arange(n)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    return Split(x, idx % n_classes)


def image_ids(x: torch.Tensor) -> list[int]:
    v = (x[:, 0, 0, :2] * 255).round().long()
    return (v[:, 0] * 256 + v[:, 1]).tolist()


def random_episode(n: int = 5, k: int = 2, q: int = 3, size: int = 28, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n)
    return Episode(
        torch.rand(n * k, 1, size, size, generator=g), lab.repeat_interleave(k),
        torch.rand(n * q, 1, size, size, generator=g), lab.repeat_interleave(q),
    )  # fmt: skip


def png_bytes(arr: np.ndarray, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode if mode != "1" else "L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def glyph(seed: int, size: int = 105) -> np.ndarray:
    """A white 105x105 drawing with a black stroke block at a seed-dependent place."""
    a = np.full((size, size), 255, np.uint8)
    r = 10 + 7 * (seed % 10)
    a[r : r + 20, 20:60] = 0
    return a


# ----------------------------------------------------------------------------- sampler
def test_sampler_counts_disjointness_and_labels():
    pool = id_pool()
    s = EpisodeSampler(pool, n_way=5, k_shot=3, n_query=4, seed=1)
    for i in range(20):
        ep = s.episode(i)
        assert ep.support_x.shape == (15, 1, 4, 4) and ep.query_x.shape == (20, 1, 4, 4)
        assert ep.support_x.dtype == torch.float32 and 0 <= ep.support_x.min() and ep.support_x.max() <= 1
        assert ep.support_y.tolist() == [c for c in range(5) for _ in range(3)]
        assert ep.query_y.tolist() == [c for c in range(5) for _ in range(4)]
        sid, qid = image_ids(ep.support_x), image_ids(ep.query_x)
        assert len(set(sid)) == 15 and len(set(qid)) == 20 and not set(sid) & set(qid), "an image in support and query"
        # relabelling: each episode label is one pool class, the N classes are distinct, and the
        # support and query of a label come from the same pool class
        sup_cls = {lab: {int(pool.labels[j]) for j, l2 in zip(sid, ep.support_y.tolist()) if l2 == lab} for lab in range(5)}
        qry_cls = {lab: {int(pool.labels[j]) for j, l2 in zip(qid, ep.query_y.tolist()) if l2 == lab} for lab in range(5)}
        assert all(len(v) == 1 for v in sup_cls.values()) and sup_cls == qry_cls
        assert len({next(iter(v)) for v in sup_cls.values()}) == 5
    assert ep.n_way == 5


def test_sampler_is_repeatable_and_seeded_per_episode():
    pool = id_pool()
    a, b = EpisodeSampler(pool, 5, 1, 2, seed=3), EpisodeSampler(pool, 5, 1, 2, seed=3)
    for i in (0, 7, 599):
        ea, eb = a.episode(i), b.episode(i)
        assert all(torch.equal(u, v) for u, v in zip(ea.tensors(), eb.tensors()))
    # episode i does not depend on which episodes were drawn before
    a.episode(5)
    assert torch.equal(a.episode(6).query_x, b.episode(6).query_x)
    assert not torch.equal(a.episode(0).support_x, a.episode(1).support_x)
    assert not torch.equal(a.episode(0).support_x, EpisodeSampler(pool, 5, 1, 2, seed=4).episode(0).support_x)


def test_sampler_skips_small_classes_and_rejects_too_few():
    pool = id_pool(n_classes=6, per_class=5)
    keep = torch.nonzero((pool.labels != 2) | (torch.arange(len(pool)) < 6)).flatten()  # class 2 keeps 1 image
    small = pool.subset(keep)
    s = EpisodeSampler(small, n_way=5, k_shot=2, n_query=3)
    assert s.num_classes == 5 and 2 not in s.classes
    with pytest.raises(ValueError, match="needs 6 classes"):
        EpisodeSampler(small, n_way=6, k_shot=2, n_query=3)
    with pytest.raises(ValueError, match="k_shot"):
        EpisodeSampler(pool, 5, 0, 3)


def test_episode_loader_epochs_len_and_device():
    s = EpisodeSampler(id_pool(), 3, 1, 2)
    loader = EpisodeLoader(s, episodes=4, seed=0)
    assert len(loader) == 4
    loader.set_epoch(2)
    e2 = list(loader)
    loader.set_epoch(2)
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(e2, list(loader)))
    loader.set_epoch(3)
    assert not all(torch.equal(a.support_x, b.support_x) for a, b in zip(e2, list(loader)))
    assert e2[0].to("cpu").support_x.shape == e2[0].support_x.shape


def test_class_subset_and_rotations():
    pool = id_pool(4, 3)
    sub = class_subset(pool, [3, 1])
    assert sub.labels.tolist() == [1, 0, 1, 0, 1, 0] and len(sub) == 6
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    rot, names = rotate_classes(Split(x.repeat(2, 1, 1, 1), torch.tensor([0, 1])), ["a", "b"], (0, 90))
    assert names == ["a/rot0", "b/rot0", "a/rot90", "b/rot90"] and rot.labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(rot.images[2, 0], torch.rot90(x[0, 0], 1))


# ----------------------------------------------------------------------------- the head
def test_prototypical_logits_and_loss_on_a_hand_built_case():
    task = FewShotTask()
    # embeddings are the images themselves (Flatten): support 0 -> (0,0),(2,0); 1 -> (0,4)
    d = torch.float64  # exact enough to compare the loss with its closed form
    ep = Episode(
        torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=d).view(3, 1, 1, 2), torch.tensor([0, 0, 1]),
        torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=d).view(2, 1, 1, 2), torch.tensor([0, 1]),
    )  # fmt: skip
    logits = task.forward(nn.Flatten(), ep)
    # prototypes (1,0) and (0,4); query (1,1): d^2 = 1, 10; query (0,3): d^2 = 10, 1
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0], [-10.0, -1.0]], dtype=d))
    expected = math.log(1 + math.exp(-9.0))
    assert task.loss(logits, ep.query_y).item() == pytest.approx(expected, rel=1e-9)
    out = create_method("protonet")(nn.Flatten(), ep)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9) and out.logs["acc"] == 1.0
    # temperature divides; cosine: cos((1,1),(1,0)) = 1/sqrt2, cos((1,1),(0,4)) = 1/sqrt2
    assert torch.allclose(FewShotTask(temperature=2.0).forward(nn.Flatten(), ep), logits / 2)
    cos = FewShotTask(metric="cosine", temperature=0.5).forward(nn.Flatten(), ep)
    assert torch.allclose(cos[0], torch.full((2,), 2 / math.sqrt(2), dtype=d)) and torch.allclose(cos[1], torch.tensor([0.0, 2.0], dtype=d))
    with pytest.raises(ValueError, match="metric"):
        FewShotTask(metric="l1")
    with pytest.raises(ValueError, match="support image"):
        task.prototypes(torch.zeros(2, 3), torch.tensor([0, 2]), 3)


def test_attack_losses():
    ep = random_episode(3, 2, 2, size=2)
    model = nn.Flatten()
    task = FewShotTask()
    fn = task.attack_loss_fn(model, ep)
    feats = model(ep.support_x)
    v = fn(feats, ep.support_y)
    assert v.shape == (6,) and v.sum().item() == pytest.approx(task.loss(task.forward(model, ep), ep.query_y).item(), rel=1e-5)
    sup = FewShotTask(attack_loss="support").attack_loss_fn(model, ep)
    protos = task.prototypes(feats, ep.support_y)
    ref = F.cross_entropy(task.logits_to_prototypes(feats, protos), ep.support_y, reduction="none")
    assert torch.allclose(sup(feats, ep.support_y), ref)


# ----------------------------------------------------------------------------- methods
def feature_model(attention: str | None = "cbam", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return aal.create_model("small_cnn", num_classes=0, attention=attention)


def build(name: str, **kw):
    if name == "protonet_aal":
        kw.setdefault("eps", 0.1)
    return create_method(name, **kw)


def test_episodic_methods_registered():
    assert {"protonet", "protonet_aal"} <= set(EPISODIC)


@pytest.mark.parametrize("name", EPISODIC)
def test_episodic_contract(name):
    """test_methods.py's contract, for methods whose batch is an Episode."""
    model, ep = feature_model(), random_episode()
    before = [t.clone() for t in ep.tensors()]
    method = build(name)
    assert method.name == name
    repr(method)
    model.train()
    out = method(model, ep)
    assert isinstance(out, Output) and out.loss.dim() == 0 and math.isfinite(out.loss.item())
    assert out.logits.shape == (15, 5)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values()) and "acc" in out.logs
    assert all(torch.equal(a, b) for a, b in zip(ep.tensors(), before)), "the method modified its input"
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()), "crafting left parameter gradients"
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    method(model, ep)
    assert not any(m.training for m in model.modules())
    # a dict with the four keys works, a classification batch is a clear TypeError
    assert math.isfinite(method(model, dict(zip(("support_x", "support_y", "query_x", "query_y"), ep.tensors()))).loss.item())
    with pytest.raises(TypeError, match="Episode"):
        method(model, (ep.query_x, ep.query_y))


def test_protonet_aal_validation():
    for kw, arg in (({"eps": -1}, "eps"), ({"kernel": "foo"}, "kernel"), ({"attack": "cw"}, "attack"),
                    ({"steps": 3}, "steps"), ({"attack_loss": "x"}, "attack_loss"), ({"clean_weight": 2}, "clean_weight"),
                    ({"temperature": 0}, "temperature"), ({"mask_control": "x"}, "mask_control")):  # fmt: skip
        with pytest.raises(ValueError, match=arg):
            create_method("protonet_aal", **kw)
    with pytest.raises(ValueError, match="attention"):  # the background kernel needs a map
        create_method("protonet_aal")(feature_model(None), random_episode())
    out = create_method("protonet_aal", kernel="one", eps=0.1)(feature_model(None), random_episode())
    assert out.logs["mask_mean"] == 1.0


class FixedMap(nn.Module):
    """Attention layer whose map is a fixed (1,1,H,W) pattern (kept in the autograd graph)."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("m", m)

    def forward(self, h, override=None):
        m = self.m.expand(h.shape[0], 1, *h.shape[-2:]) + 0.0 * h.mean(1, keepdim=True) if override is None else override
        return h * m, m


def fixed_map_resnet12(seed: int = 0) -> nn.Module:
    """A narrow ResNet-12 with input-level attention: M = 1 on the centre (foreground), 0.3 around."""
    torch.manual_seed(seed)
    model = aal.create_model("resnet12", num_classes=0, in_channels=1, attention="cbam", channels=(8, 8, 8, 8))
    m = torch.full((1, 1, 28, 28), 0.3)
    m[..., 7:21, 7:21] = 1.0
    model.attention = FixedMap(m)
    return model


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_background_kernel_leaves_the_foreground_untouched(attack):
    model, ep = fixed_map_resnet12(), random_episode(5, 1, 3)
    kw = {"steps": 3} if attack == "pgd" else {}
    # xi1 = xi2 = 0: M^a = M exactly, so the budget 1 - M^2 is 0 on the foreground
    method = create_method("protonet_aal", eps=0.1, xi1=0.0, xi2=0.0, attack=attack, **kw)
    s_adv, res, mask = method.craft(model, ep)
    fg = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    fg[..., 7:21, 7:21] = True
    delta = s_adv - ep.support_x
    assert torch.equal(delta[fg.expand_as(delta)], torch.zeros(int(fg.sum()) * 5)), "foreground perturbed"
    assert delta[~fg.expand_as(delta)].abs().max() > 0.05, "background not attacked"
    assert torch.allclose(mask[~fg.expand_as(mask)], torch.full_like(mask[~fg.expand_as(mask)], 0.91))
    # default xi1/xi2 (M^a moves): the budget bound holds everywhere, and where M^a = 1 nothing moves
    method = create_method("protonet_aal", eps=0.1, attack=attack, **kw)
    s_adv, res, mask = method.craft(model, ep)
    delta = (s_adv - ep.support_x).abs()
    assert (delta <= 0.1 * (1 - res.m_a_input**2) + 1e-6).all()
    full = (res.m_a_input == 1.0).expand_as(delta)
    assert full.any() and (delta[full] == 0).all()
    # the queries are never attacked: the training pass sees them as they are
    out = method(model, ep)
    assert out.logs["mask_mean"] < 1.0


def test_protonet_aal_attack_raises_the_episode_loss():
    model, ep = fixed_map_resnet12(1), random_episode(5, 2, 4, seed=3)
    method = create_method("protonet_aal", eps=0.2, kernel="one", xi1=0.0, xi2=0.0)
    s_adv, _, _ = method.craft(model, ep)
    task = method.task
    model.eval()
    with torch.no_grad():
        clean = task.loss(task.forward(model, ep), ep.query_y).item()
        adv = task.loss(task.forward(model, ep, support_x=s_adv), ep.query_y).item()
    assert adv > clean


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_fewshot_ci_and_repeatability():
    pool = Split(torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), torch.arange(120) % 8)
    model = feature_model()
    model.train()
    s = EpisodeSampler(pool, 5, 1, 3, seed=0)
    r1 = evaluate_fewshot(model, s, episodes=12)
    assert all(m.training for m in model.modules()), "evaluation must restore the mode"
    assert r1 == evaluate_fewshot(model, s, episodes=12)
    assert (r1["n"], r1["n_way"], r1["k_shot"], r1["n_query"]) == (12, 5, 1, 3)
    model.eval()
    with torch.no_grad():
        accs = [FewShotTask.accuracy(FewShotTask().forward(model, s.episode(i)), s.episode(i).query_y) for i in range(12)]
    assert r1["mean"] == pytest.approx(np.mean(accs))
    assert r1["ci95"] == pytest.approx(1.96 * np.std(accs, ddof=1) / math.sqrt(12))
    eps = [s.episode(i) for i in range(4)]
    assert evaluate_fewshot(model, eps)["n"] == 4 and evaluate_fewshot(model, eps, episodes=2)["n"] == 2
    assert mean_ci95([1.0, 1.0])[1] == 0.0


# ----------------------------------------------------------------------------- readers
def write_fake_omniglot(path: Path, stem: str, alphabets: dict[str, int], drawings: int = 3) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{stem}/", b"")
        zf.writestr(f"__MACOSX/{stem}/._junk.png", b"junk")
        for a, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                for d in range(1, drawings + 1):
                    zf.writestr(f"{stem}/{a}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png", png_bytes(glyph(c), "1"))


def test_omniglot_zip_reader_on_a_fake_zip(tmp_path):
    path = tmp_path / "images_background.zip"
    write_fake_omniglot(path, "images_background", {"Alpha": 2, "Beta": 3})
    split, names = read_omniglot_zip(path)
    assert names == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02", "Beta/character03"]
    assert split.images.shape == (15, 1, 28, 28) and split.labels.tolist() == [i for i in range(5) for _ in range(3)]
    # inverted: background 0, strokes bright
    assert split.images[0, 0, 0, 0] == 0 and split.images[0].max() > 200
    raw, _ = read_omniglot_zip(path, image_size=None, invert=False, exclude_alphabets=["Alpha"])
    assert raw.images.shape == (9, 1, 105, 105) and raw.images[0, 0, 0, 0] == 255
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.zip"):
        read_omniglot_zip(tmp_path / "bad.zip")
    with zipfile.ZipFile(tmp_path / "corrupt.zip", "w") as zf:
        zf.writestr("x/A/character01/1.png", b"\x89PNG broken")
    with pytest.raises(DataError, match="character01/1.png"):
        read_omniglot_zip(tmp_path / "corrupt.zip")


def write_fake_runs(path: Path, n_runs: int = 2, n: int = 4, bad_line: bool = False) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for r in range(1, n_runs + 1):
            lines = []
            for c in range(1, n + 1):
                zf.writestr(f"run{r:02d}/training/class{c:02d}.png", png_bytes(glyph(c)))
                target = (c % n) + 1  # item c is of class c+1 (cyclic)
                zf.writestr(f"run{r:02d}/test/item{c:02d}.png", png_bytes(glyph(target)))
                lines.append(f"run{r:02d}/test/item{c:02d}.png run{r:02d}/training/class{target:02d}.png")
            if bad_line:
                lines.append("only-one-field")
            zf.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")


def test_omniglot_runs_reader_on_a_fake_zip(tmp_path):
    write_fake_runs(tmp_path / "all_runs.zip")
    runs = read_omniglot_runs(tmp_path / "all_runs.zip")
    assert len(runs) == 2
    ep = runs[0]
    assert ep.support_x.shape == (4, 1, 28, 28) and ep.support_y.tolist() == [0, 1, 2, 3]
    assert ep.query_y.tolist() == [1, 2, 3, 0]
    # a query is the same drawing as the support image of its class
    assert torch.equal(ep.query_x[0], ep.support_x[1])
    write_fake_runs(tmp_path / "bad_runs.zip", bad_line=True)
    with pytest.raises(DataError, match=r"run01/class_labels.txt line 5"):
        read_omniglot_runs(tmp_path / "bad_runs.zip")


def test_omniglot_loader_missing_files_message(tmp_path):
    with pytest.raises(DataError, match="images_background.zip not found"):
        load_fewshot("omniglot", root=tmp_path)
    write_fake_omniglot(tmp_path / "images_background.zip", "images_background", {"A": 3})
    write_fake_omniglot(tmp_path / "images_evaluation.zip", "images_evaluation", {"A": 1, "B": 2})
    write_fake_runs(tmp_path / "all_runs.zip", n_runs=1)
    d = load_fewshot("omniglot", root=tmp_path, rotate=True)
    assert len(d.train_classes) == 12 and d.test_classes == ("B/character01", "B/character02")  # overlap A dropped
    assert len(d.runs) == 1 and d.in_channels == 1 and d.image_size == (28, 28)


@needs_omniglot
def test_real_omniglot_minimal_splits_and_runs():
    d = load_fewshot("omniglot", root=OMNIGLOT, background="images_background_small1", evaluation="images_background_small2")
    assert len(d.train) == 2720 and len(d.train_classes) == 136
    assert d.train.class_counts().tolist() == [20] * 136
    alph = {c.split("/")[0] for c in d.test_classes}
    assert alph == {"Japanese_(katakana)", "Sanskrit", "Tagalog"} and len(d.test_classes) == 106
    assert not set(d.train_classes) & set(d.test_classes)
    assert len(d.runs) == 20
    for ep in d.runs:
        assert ep.support_x.shape == (20, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
        assert sorted(ep.query_y.tolist()) == list(range(20))
    assert d.runs[0].query_y[0].item() == 7  # run01/test/item01.png -> run01/training/class08.png
    mean, std = d.stats()
    assert 0.03 < mean[0] < 0.2  # inverted: mostly dark background


def write_csv_layout(root: Path, classes: dict[str, list[str]], per_class: int = 3, sizes=((20, 16), (12, 12))) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, names in classes.items():
        rows = ["filename,label"]
        for c in names:
            for i in range(per_class):
                fname = f"{c}{i:08d}.jpg"
                w, h = sizes[k % len(sizes)]
                k += 1
                Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "images" / fname)
                rows.append(f"{fname},{c}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_mini_imagenet_csv_layout(tmp_path):
    write_csv_layout(tmp_path, {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06"]})
    split, names = read_csv_split(tmp_path, "train", image_size=8)
    assert names == ["n01", "n02", "n03"] and split.images.shape == (9, 3, 8, 8) and split.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    d = load_fewshot("mini_imagenet", root=tmp_path, image_size=8)
    assert d.test_classes == ("n05", "n06") and len(d.val) == 3 and d.in_channels == 3
    ep = EpisodeSampler(d.train, 3, 1, 2).episode(0)
    assert ep.support_x.shape == (3, 3, 8, 8)
    with pytest.raises(DataError, match="download"):
        load_fewshot("tiered_imagenet", root=tmp_path, download=True)


def test_csv_reader_errors_name_the_file(tmp_path):
    write_csv_layout(tmp_path, {"train": ["n01"], "test": ["n02"]})
    bad = tmp_path / "train.csv"
    bad.write_text("filename,label\nn0100000000.jpg,n01\nn0100000001.jpg\n")
    with pytest.raises(DataError, match=r"train\.csv line 3"):
        read_csv_split(tmp_path, "train")
    bad.write_text("file,class\nn0100000000.jpg,n01\n")
    with pytest.raises(DataError, match=r"train\.csv line 1.*header"):
        read_csv_split(tmp_path, "train")
    bad.write_text("filename,label\nmissing.jpg,n01\n")
    with pytest.raises(DataError, match="missing.jpg"):
        read_csv_split(tmp_path, "train")
    with pytest.raises(DataError, match="val.csv"):
        read_csv_split(tmp_path, "val")
    bad.write_text("filename,label\nn0200000000.jpg,n02\n")
    with pytest.raises(DataError, match="appear in train.csv"):
        load_fewshot("mini_imagenet", root=tmp_path, image_size=8)
    with pytest.raises(DataError, match="train.csv and test.csv"):
        load_fewshot("mini_imagenet", root=tmp_path / "nowhere")


@needs_fmnist
def test_fashion_mnist_class_split():
    d = load_fewshot("fashion_mnist_split")
    assert (len(d.train), len(d.test)) == (30000, 5000)
    assert d.train_classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
    assert not set(d.train_classes) & set(d.test_classes)
    assert d.train.class_counts().tolist() == [6000] * 5 and d.test.class_counts().tolist() == [1000] * 5
    with pytest.raises(ValueError, match="train_classes"):
        load_fewshot("fashion_mnist_split", train_classes=tuple(range(10)))


# ----------------------------------------------------------------------------- config and runs
def tiny_cfg(method: dict, data: dict | None = None, eval: dict | None = None) -> dict:
    d = {"name": "omniglot", "root": str(OMNIGLOT), "n_way": 5, "k_shot": 1, "n_query": 3, "episodes": 3,
         "options": {"background": "images_background_small1", "evaluation": "images_background_small2"}} | (data or {})  # fmt: skip
    e = {"shots": [1], "episodes": 10, "epoch_episodes": 5} | (eval or {})
    return {"task": "fewshot", "seed": 0, "epochs": 2, "progress": False, "data": d, "eval": e,
            "model": {"name": "small_cnn", "attention": "cbam"}, "method": method,
            "optim": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"}}  # fmt: skip


def test_fewshot_config_validation():
    cfg = fewshot_config(tiny_cfg({"name": "protonet_aal", "eps": "8/255"}))
    assert cfg.method.params["eps"] == pytest.approx(8 / 255) and cfg.eval.shots == (1,) and cfg.data.k_shot == 1
    assert is_fewshot_config(tiny_cfg({"name": "protonet"})) and not is_fewshot_config({"task": "detection"})
    assert fewshot_config(cfg.to_dict()) == cfg  # the saved form re-loads to the same config
    for raw, match in (
        (tiny_cfg({"name": "protonet"}, {"shots": 3}), "data.shots"),
        (tiny_cfg({"name": "protonet"}, {"name": "nope"}), "data.name"),
        (tiny_cfg({"name": "protonet"}, {"options": {"colour": 1}}), "data.options.colour"),
        (tiny_cfg({"name": "protonet"}, {"n_way": 0}), "data.n_way"),
        (tiny_cfg({"name": "protonet"}, eval={"shots": []}), "eval.shots"),
        (tiny_cfg({"name": "pgd_at"}), "episodic"),
        (tiny_cfg({"name": "protonet", "metric": "l1"}), "metric"),
        (tiny_cfg({"name": "protonet"}) | {"model": {"name": "nonet"}}, "model.name"),
        (tiny_cfg({"name": "protonet"}) | {"task": "detection"}, "task"),
        (tiny_cfg({"name": "protonet"}) | {"batch": 3}, "unknown key 'batch'"),
    ):
        with pytest.raises(ConfigError, match=match):
            fewshot_config(raw)


def test_shipped_fewshot_configs_validate():
    paths = sorted((REPO / "configs" / "fewshot").glob("*.yaml"))
    assert len(paths) >= 4
    for p in paths:
        cfg = load_fewshot_config(p, ["epochs=1"])
        assert cfg.epochs == 1 and METHODS.get(cfg.method.name).batch_type == "episode"


@needs_omniglot
@pytest.mark.parametrize("method", [{"name": "protonet"}, {"name": "protonet_aal", "eps": 0.1}])
def test_trainer_runs_fewshot_methods_on_omniglot(tmp_path, method):
    run_dir, res = train_fewshot(tiny_cfg(method), run_dir=tmp_path / "run", log=lambda s: None)
    assert [r["epoch"] for r in res["history"]] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in res["history"]) and "acc" in res["history"][0]["logs"]
    assert "test_5way1shot_acc" in res["history"][-1]["eval"]
    fs = res["fewshot"]
    assert set(fs) == {"5way1shot", "runs_20way1shot"} and fs["5way1shot"]["n"] == 10 and fs["runs_20way1shot"]["n"] == 20
    assert 0.0 <= fs["5way1shot"]["mean"] <= 1.0 and fs["5way1shot"]["ci95"] >= 0
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["fewshot"]["5way1shot"]["mean"] == fs["5way1shot"]["mean"]
    assert (run_dir / "checkpoints" / "last").exists() and (run_dir / "config.yaml").is_file()
    cfg = load_fewshot_config(run_dir / "config.yaml")  # the saved config re-loads
    assert cfg.data.name == "omniglot" and cfg.method.name == method["name"]
    if method["name"] == "protonet":  # the trained weights, evaluated again on the same episodes
        exp = load_fewshot_run(run_dir)
        assert exp.final_eval()["5way1shot"]["mean"] == fs["5way1shot"]["mean"]


@needs_fmnist
def test_trainer_steps_on_fashion_mnist_split():
    d = load_fewshot("fashion_mnist_split")
    model = feature_model()
    loader = EpisodeLoader(EpisodeSampler(d.train, 5, 1, 4), episodes=3)
    trainer = Trainer(model, create_method("protonet_aal", eps=0.1, attack="pgd", steps=2), loader,
                      build_optimizer(model, lr=0.01), epochs=1, progress=False)  # fmt: skip
    rec = trainer.fit()[0]
    assert math.isfinite(rec["train_loss"]) and rec["logs"]["mask_mean"] < 1


@pytest.mark.slow
@needs_omniglot
def test_protonet_learns_on_omniglot():
    """A few dozen episodes lift 5-way 1-shot accuracy on unseen alphabets well above the start."""
    d = load_fewshot("omniglot", root=OMNIGLOT, background="images_background_small1", evaluation="images_background_small2")
    model = feature_model(None)
    test = EpisodeSampler(d.test, 5, 1, 5, seed=0)
    before = evaluate_fewshot(model, test, episodes=100)["mean"]
    loader = EpisodeLoader(EpisodeSampler(d.train, 20, 1, 5), episodes=60)
    Trainer(model, create_method("protonet"), loader, build_optimizer(model, lr=0.01), epochs=2, progress=False).fit()
    after = evaluate_fewshot(model, test, episodes=100)["mean"]
    assert after > before + 0.1


@pytest.mark.parametrize("module", ["aal.data.fewshot", "aal.tasks.fewshot", "aal.methods.protonet", "aal.tasks"])
def test_docstring_examples(module):
    mod = __import__(module, fromlist=["_"])
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_registry():
    assert {"omniglot", "mini_imagenet", "tiered_imagenet", "fashion_mnist_split"} <= set(FEWSHOT_DATASETS.names())
