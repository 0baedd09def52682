"""Object detection (AAL paper Sec. 4.2): VOC reader, SSD box machinery, multibox loss, VOC mAP,
the detection methods with the Trainer on real BCCD, configs and the figure.

Real-data tests use ``../shared/data/bccd`` (or ``$AAL_DATA/bccd``) and skip when it is absent.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

import aal
from aal.data import DataError
from aal.data.voc import (
    BCCD_CLASSES,
    DetectionLoader,
    DetectionSplit,
    hflip,
    load_voc,
    parse_voc_xml,
    photometric,
    read_image_set,
)
from aal.tasks.detection_metrics import DetectionMAP, mean_average_precision, voc_ap
from aal.methods import METHODS, create_method
from aal.models import MODELS, create_model
from aal.models.ssd import (
    IGNORE,
    batched_nms,
    box_iou,
    cxcywh_to_xyxy,
    decode,
    default_aspect_ratios,
    default_scales,
    encode,
    match,
    multibox_loss,
    nms,
    prior_boxes,
    split_outputs,
)
from aal.tasks.detection import DetectionTask, detector_of, load_detection_config
from aal.viz import detection_grid

REPO = Path(__file__).resolve().parents[1]


def _bccd_root() -> Path | None:
    for cand in (os.environ.get("AAL_DATA") and Path(os.environ["AAL_DATA"]) / "bccd", REPO.parent / "shared" / "data" / "bccd"):
        if cand and (Path(cand) / "BCCD" / "Annotations").is_dir():
            return Path(cand)
    return None


BCCD = _bccd_root()
needs_bccd = pytest.mark.skipif(BCCD is None, reason="BCCD not found (../shared/data/bccd or $AAL_DATA/bccd)")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- VOC reader
def _xml(objects: str, size: str = "<size><width>40</width><height>30</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>img.jpg</filename>{size}{objects}</annotation>"


def _obj(name: str, box: tuple, difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def test_voc_xml_parsing_converts_coordinates_and_keeps_difficult(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml(_obj("WBC", (1, 1, 10, 20)) + _obj("RBC", (5, 6, 40, 30), difficult=1)))
    ann = parse_voc_xml(p, BCCD_CLASSES)
    # 1-based inclusive -> 0-based half-open: pixels 1..10 are [0, 10)
    assert ann.boxes.tolist() == [[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 40.0, 30.0]]
    assert ann.labels.tolist() == [1, 0]
    assert ann.difficult.tolist() == [False, True]
    assert (ann.width, ann.height) == (40, 30)
    t = ann.target()
    torch.testing.assert_close(t["boxes"][0], torch.tensor([0.0, 0.0, 10 / 40, 20 / 30]))


@pytest.mark.parametrize(
    "text,needle",
    [
        ("<annotation><size><width>40</width>", "malformed XML"),  # truncated
        ("<annotation><object></annotation>", "malformed XML"),  # mismatched tag
        (_xml(_obj("RBC", (1, 1, 5, 5)), size=""), "no <size>"),
        (_xml("<object><name>RBC</name></object>"), "no <bndbox>"),
        (_xml("<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax></bndbox></object>"), "<ymax>"),
        (_xml(_obj("RBC", (1, "a", 5, 5))), "not a number"),
        (_xml(_obj("Neutrophil", (1, 1, 5, 5))), "not in the class list"),
        ("<notvoc/>", "root element"),
    ],
    ids=["truncated", "mismatched-tag", "no-size", "no-bndbox", "no-ymax", "non-numeric", "unknown-class", "not-voc"],
)
def test_malformed_voc_xml_raises_a_clear_error_naming_the_file(tmp_path, text, needle):
    p = tmp_path / "BloodImage_bad.xml"
    p.write_text(text)
    with pytest.raises(DataError) as err:
        parse_voc_xml(p, BCCD_CLASSES)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_missing_annotation_and_image_set_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.xml"):
        parse_voc_xml(tmp_path / "missing.xml", BCCD_CLASSES)
    with pytest.raises(DataError, match=r"ImageSets/Main/train\.txt"):
        read_image_set(tmp_path, "train")


def test_degenerate_boxes_are_dropped_with_a_warning_naming_the_file(tmp_path):
    p = tmp_path / "BloodImage_00338.xml"
    p.write_text(_xml(_obj("RBC", (504, 337, 504, 337)) + _obj("WBC", (2, 2, 9, 9)) + _obj("RBC", (9, 5, 3, 8))))
    with pytest.warns(UserWarning, match="BloodImage_00338.xml.*degenerate") as rec:
        ann = parse_voc_xml(p, BCCD_CLASSES)
    assert len([w for w in rec if "degenerate" in str(w.message)]) == 2
    assert ann.labels.tolist() == [1] and ann.dropped == 2


def test_unknown_classes_can_be_ignored(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml(_obj("cat", (1, 1, 5, 5)) + _obj("RBC", (1, 1, 5, 5))))
    assert parse_voc_xml(p, BCCD_CLASSES, unknown_class="ignore").labels.tolist() == [0]


def _make_voc(root: Path, sizes: list[tuple[int, int]], boxes: list[list[tuple]]) -> Path:
    from PIL import Image

    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for k, ((w, h), bxs) in enumerate(zip(sizes, boxes)):
        iid = f"im{k}"
        ids.append(iid)
        Image.new("RGB", (w, h), (200, 30, 30)).save(root / "JPEGImages" / f"{iid}.jpg")
        size = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        (root / "Annotations" / f"{iid}.xml").write_text(_xml("".join(_obj(n, b) for n, b in bxs), size))
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_load_voc_resizes_images_and_normalises_boxes(tmp_path):
    root = _make_voc(tmp_path / "VOC", [(40, 30), (20, 20)], [[("WBC", (1, 1, 20, 15))], [("Platelets", (11, 1, 20, 10))]])
    split = load_voc(tmp_path, "train", BCCD_CLASSES, image_size=16, name="x")  # the parent folder works too
    assert isinstance(split, DetectionSplit) and len(split) == 2
    assert split.images.shape == (2, 3, 16, 16) and split.images.dtype == torch.uint8
    torch.testing.assert_close(split.targets[0]["boxes"], torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
    torch.testing.assert_close(split.targets[1]["boxes"], torch.tensor([[0.5, 0.0, 1.0, 0.5]]))
    assert split.orig_sizes.tolist() == [[30, 40], [20, 20]]
    assert split.subset([1]).ids == ["im1"]
    # an image whose size contradicts its annotation is an error naming the image
    from PIL import Image

    Image.new("RGB", (10, 10)).save(root / "JPEGImages" / "im1.jpg")
    with pytest.raises(DataError, match="im1.jpg"):
        load_voc(root, "train", BCCD_CLASSES, image_size=16)


def test_hflip_moves_boxes_with_the_pixels():
    x = torch.zeros(2, 3, 20, 20)
    x[:, :, 4:10, 2:6] = 1.0  # object at columns 2..5 (normalised [0.1, 0.3))
    t = [{"boxes": torch.tensor([[0.1, 0.2, 0.3, 0.5]]), "labels": torch.tensor([0])}] * 2
    y, tf = hflip(x, t, torch.tensor([True, False]))
    torch.testing.assert_close(tf[0]["boxes"], torch.tensor([[0.7, 0.2, 0.9, 0.5]]))
    assert torch.equal(tf[1]["boxes"], t[1]["boxes"]) and torch.equal(y[1], x[1])
    b = (tf[0]["boxes"][0] * 20).round().long().tolist()
    assert bool((y[0, :, b[1] : b[3], b[0] : b[2]] == 1).all()) and float(y[0].sum()) == float(x[0].sum())
    p = photometric(torch.rand(3, 3, 8, 8), torch.Generator().manual_seed(0))
    assert p.shape == (3, 3, 8, 8) and p.min() >= 0 and p.max() <= 1


def test_detection_loader_is_repeatable_per_epoch_and_flips_consistently():
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(5, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.6]]), "labels": torch.tensor([k % 3]), "difficult": torch.tensor([False])} for k in range(5)]
    split = DetectionSplit(imgs, targets, [f"i{k}" for k in range(5)], torch.full((5, 2), 16), BCCD_CLASSES)
    loader = DetectionLoader(split, 2, shuffle=True, augment="flip", seed=3)
    loader.set_epoch(1)
    a = list(loader)
    loader.set_epoch(1)
    b = list(loader)
    assert [x.shape[0] for x, _ in a] == [2, 2, 1]
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and all(torch.equal(p["boxes"], q["boxes"]) for p, q in zip(ta, tb))
        for x, t in zip(xa, ta):  # each image is either flipped with its box or neither
            k = [i for i in range(5) if torch.equal(imgs[i].float() / 255, x) or torch.equal(imgs[i].flip(-1).float() / 255, x)]
            assert len(k) == 1
            flipped = not torch.equal(imgs[k[0]].float() / 255, x)
            expect = torch.tensor([[0.6, 0.1, 0.9, 0.6]]) if flipped else torch.tensor([[0.1, 0.1, 0.4, 0.6]])
            torch.testing.assert_close(t["boxes"], expect)


# ----------------------------------------------------------------------------- boxes
def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 0.8
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    return torch.cat([xy, xy + wh], 1)


def test_iou_hand_computed_and_against_a_brute_force_reference():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected)
    g = torch.Generator().manual_seed(0)
    p, q = _random_boxes(20, g), _random_boxes(15, g)
    ref = torch.tensor([[_iou(u, v) for v in q.tolist()] for u in p.tolist()])
    torch.testing.assert_close(box_iou(p, q), ref)


def test_box_encoding_decoding_round_trip():
    g = torch.Generator().manual_seed(1)
    priors = torch.cat([torch.rand(50, 2, generator=g), torch.rand(50, 2, generator=g) * 0.5 + 0.05], 1)
    boxes = _random_boxes(50, g)
    loc = encode(boxes, priors)
    torch.testing.assert_close(decode(loc, priors), boxes, rtol=1e-5, atol=1e-6)
    # a box equal to its prior encodes to zero offsets; the variances scale the code
    torch.testing.assert_close(encode(cxcywh_to_xyxy(priors), priors), torch.zeros(50, 4), atol=1e-5, rtol=0)
    shifted = cxcywh_to_xyxy(priors + torch.tensor([0.01, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(encode(shifted, priors)[:, 0], 0.01 / (0.1 * priors[:, 2]), rtol=1e-4, atol=1e-5)
    # batched (B,P,4) offsets decode per image
    torch.testing.assert_close(decode(loc.expand(3, -1, -1), priors)[2], boxes, rtol=1e-5, atol=1e-6)


def _iou(u: list, v: list) -> float:
    iw = max(0.0, min(u[2], v[2]) - max(u[0], v[0]))
    ih = max(0.0, min(u[3], v[3]) - max(u[1], v[1]))
    inter = iw * ih
    return inter / ((u[2] - u[0]) * (u[3] - u[1]) + (v[2] - v[0]) * (v[3] - v[1]) - inter)


def _nms_reference(boxes: list, scores: list, thr: float) -> list[int]:
    # the textbook greedy loop: visit by decreasing score (ties: lower index), keep unless it overlaps a kept box
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force_greedy_reference(seed, thr):
    g = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(60, g) * 0.5  # crowded: many overlaps
    scores = torch.rand(60, generator=g)
    scores[5] = scores[7]  # a tie: the lower index wins
    ref = _nms_reference(boxes.tolist(), scores.tolist(), thr)
    assert nms(boxes, scores, thr).tolist() == ref
    assert nms(boxes, scores, thr, max_keep=3).tolist() == ref[:3]
    labels = torch.randint(0, 3, (60,), generator=g)
    ref = sorted(
        (i for c in range(3) for i in (torch.nonzero(labels == c).flatten()[_nms_reference(boxes[labels == c].tolist(), scores[labels == c].tolist(), thr)]).tolist()),
        key=lambda i: (-float(scores[i]), i),
    )
    assert batched_nms(boxes, scores, labels, thr).tolist() == ref
    assert nms(torch.zeros(0, 4), torch.zeros(0), thr).numel() == 0


# ----------------------------------------------------------------------------- default boxes, matching, loss
def test_prior_boxes_reproduce_ssd300():
    # SSD300 (ssd.pytorch): maps 38,19,10,5,3,1; min sizes 30,60,111,162,213,264 (+315) on 300; 8732 boxes
    scales = default_scales(6)
    torch.testing.assert_close(torch.tensor(scales), torch.tensor([30, 60, 111, 162, 213, 264, 315]) / 300.0)
    # SSD512 (Caffe): min sizes 35.84, 76.8, 153.6, ..., 460.8 and the last max size 537.6 on 512
    torch.testing.assert_close(torch.tensor(default_scales(7, 0.07, 0.15, 0.9)), torch.tensor([35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]) / 512)
    assert default_aspect_ratios(6) == ((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,))
    priors = prior_boxes((38, 19, 10, 5, 3, 1), scales, default_aspect_ratios(6))
    assert priors.shape == (8732, 4)
    torch.testing.assert_close(priors[0], torch.tensor([0.5 / 38, 0.5 / 38, 0.1, 0.1]))
    torch.testing.assert_close(priors[1, 2:], torch.tensor([math.sqrt(0.02)] * 2))
    torch.testing.assert_close(priors[2, 2:], torch.tensor([0.1 * math.sqrt(2), 0.1 / math.sqrt(2)]))
    assert float(priors.min()) >= 0 and float(priors.max()) <= 1


def test_matching_threshold_forced_best_prior_and_difficult():
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.3, 0.3, 0.5, 0.5], [0.75, 0.75, 0.2, 0.2], [0.75, 0.25, 0.3, 0.3]])
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.7, 0.7, 0.95, 0.95], [0.6, 0.1, 0.9, 0.4]])
    labels = torch.tensor([2, 0, 1])
    iou = box_iou(gt, cxcywh_to_xyxy(priors))
    assert iou[1].max() < 0.5  # object 1 only gets its forced best prior
    loc, conf = match(gt, labels, priors, difficult=torch.tensor([False, False, True]))
    assert conf.tolist() == [3, 3, 1, IGNORE]  # label + 1; prior 3 overlaps the difficult object only
    torch.testing.assert_close(decode(loc[:3], priors[:3]), gt[[0, 0, 1]], rtol=1e-5, atol=1e-6)
    assert loc[3].abs().sum() == 0
    _, conf_empty = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), priors)
    assert conf_empty.tolist() == [0, 0, 0, 0]


def test_multibox_loss_is_finite_and_mines_three_negatives_per_positive():
    g = torch.Generator().manual_seed(0)
    priors = prior_boxes((8, 4, 2, 1), default_scales(4), default_aspect_ratios(4))
    P, K = priors.shape[0], 3
    out = torch.randn(3, P, 4 + K + 1, generator=g, requires_grad=True)
    targets = [
        {"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.2, 0.3, 0.3, 0.4]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # no object
    ]
    parts = multibox_loss(out, targets, priors)
    assert torch.isfinite(parts.total()) and torch.isfinite(parts.per_image()).all()
    from aal.models.ssd import match_targets

    loc_t, conf_t = match_targets(targets, priors)
    num_pos = (conf_t > 0).sum(1)
    assert parts.num_pos.tolist() == num_pos.tolist() and num_pos[2] == 0 and num_pos[0] > 0
    assert parts.num_neg.tolist() == torch.minimum(3 * num_pos, (conf_t == 0).sum(1)).tolist()
    # the mined negatives are the highest-CE background boxes: recompute the loss by hand
    loc_p, conf_p = split_outputs(out.detach())
    ce = torch.nn.functional.cross_entropy(conf_p.transpose(1, 2), conf_t, reduction="none")
    for i in range(3):
        pos = conf_t[i] > 0
        neg_ce = ce[i][~pos].sort(descending=True).values[: int(parts.num_neg[i])]
        conf_ref = ce[i][pos].sum() + neg_ce.sum()
        loc_ref = torch.nn.functional.smooth_l1_loss(loc_p[i][pos], loc_t[i][pos], reduction="sum")
        torch.testing.assert_close(parts.conf[i].detach(), conf_ref)
        torch.testing.assert_close(parts.loc[i].detach(), loc_ref)
    assert parts.per_image()[2] == 0  # an image without objects contributes nothing (as SSD)
    torch.testing.assert_close(parts.total(), (parts.conf.sum() + parts.loc.sum()) / num_pos.sum())
    parts.total().backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- mAP
def _det(boxes, scores, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32), "labels": labels}


def _gt(boxes, labels=None, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    out = {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.tensor(labels)}
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult)
    return out


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 8, 8]
FAR = [50, 50, 60, 60]


def test_map_perfect_detections_is_one():
    targets = [_gt([A, B], [0, 1]), _gt([C], [1])]
    dets = [_det([B, A], [0.8, 0.9], [1, 0]), _det([C], [0.7], [1])]
    r = mean_average_precision(dets, targets, num_classes=2, class_names=["a", "b"])
    assert r.map == 1.0 and r.ap == [1.0, 1.0] and r.num_gt.tolist() == [1, 2]
    assert r.as_dict() == {"map50": 1.0, "ap50/a": 1.0, "ap50/b": 1.0}


def test_map_known_precision_recall_curve():
    # 3 objects; ranked detections: TP, FP (no object), TP, FP (duplicate of A), TP
    targets = [_gt([A, B]), _gt([C])]
    dets = [_det([A, A, B], [0.9, 0.6, 0.5]), _det([FAR, C], [0.8, 0.7])]
    # recall 1/3,1/3,2/3,2/3,1; precision 1,1/2,2/3,1/2,3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45
    r = mean_average_precision(dets, targets, num_classes=1)
    assert r.ap[0] == pytest.approx(34 / 45, abs=1e-12)
    assert voc_ap(torch.tensor([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]), torch.tensor([1.0, 0.5, 2 / 3, 0.5, 0.6])) == pytest.approx(34 / 45)
    # accumulating batch by batch gives the same result
    metric = DetectionMAP(1)
    metric.update(dets[:1], targets[:1])
    metric.update(dets[1:], targets[1:])
    assert metric.compute().ap[0] == pytest.approx(34 / 45, abs=1e-12)


def test_map_difficult_boxes_threshold_and_missing_classes():
    # a detection on a difficult object is neither TP nor FP; difficult objects are not counted
    targets = [_gt([A, B], difficult=[False, True])]
    dets = [_det([B, A], [0.9, 0.8])]
    assert mean_average_precision(dets, targets, 1).ap[0] == 1.0
    # IoU exactly 0.5 is a match (VOC devkit VOCevaldet.m: ovmax >= minoverlap); so is just above
    half = [0, 0, 10, 5]  # IoU with A = 50/100: exactly the 0.5 threshold
    assert mean_average_precision([_det([half], [1.0])], [_gt([A])], 1).ap[0] == 1.0
    assert mean_average_precision([_det([[0, 0, 10, 4.9]], [1.0])], [_gt([A])], 1).ap[0] == 0.0  # just below
    assert mean_average_precision([_det([[0, 0, 10, 5.1]], [1.0])], [_gt([A])], 1).ap[0] == 1.0
    # a class with no ground truth has AP NaN and is left out of the mean; missed objects give 0
    r = mean_average_precision([_det([A], [0.9], [0])], [_gt([A, B], [0, 2])], 3)
    assert r.ap[0] == 1.0 and math.isnan(r.ap[1]) and r.ap[2] == 0.0 and r.map == 0.5


def _voc_eval_reference(dets, targets, c, thr=0.5):
    """py-faster-rcnn's voc_eval (use_07_metric=False), transcribed literally: one global loop."""
    recs = [{"bb": t["boxes"][t["labels"] == c].tolist(), "diff": t["difficult"][t["labels"] == c].tolist()} for t in targets]
    for r in recs:
        r["det"] = [False] * len(r["bb"])
    npos = sum(not x for r in recs for x in r["diff"])
    items = [(float(s), i, b) for i, d in enumerate(dets) for s, b, l in zip(d["scores"], d["boxes"].tolist(), d["labels"]) if l == c]
    items = sorted(enumerate(items), key=lambda e: (-e[1][0], e[0]))
    tp, fp = [], []
    for _, (_, i, b) in items:
        r = recs[i]
        ovs = [_iou(b, g) for g in r["bb"]]
        ovmax = max(ovs) if ovs else -1.0
        t, f = 0.0, 0.0
        if ovmax > thr:
            j = ovs.index(ovmax)
            if not r["diff"][j]:
                if not r["det"][j]:
                    t, r["det"][j] = 1.0, True
                else:
                    f = 1.0
        else:
            f = 1.0
        tp.append(t)
        fp.append(f)
    ctp, cfp = torch.tensor(tp, dtype=torch.float64).cumsum(0), torch.tensor(fp, dtype=torch.float64).cumsum(0)
    rec = ctp / npos
    prec = ctp / torch.clamp(ctp + cfp, min=torch.finfo(torch.float64).eps)
    mrec = [0.0] + rec.tolist() + [1.0]
    mpre = [0.0] + prec.tolist() + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


@pytest.mark.parametrize("seed", range(3))
def test_map_matches_a_literal_transcription_of_voc_eval(seed):
    g = torch.Generator().manual_seed(seed)
    targets, dets = [], []
    for _ in range(6):
        n = int(torch.randint(0, 6, (1,), generator=g))
        gt = _random_boxes(n, g) * 100
        targets.append({"boxes": gt, "labels": torch.randint(0, 2, (n,), generator=g), "difficult": torch.rand(n, generator=g) < 0.2})
        jitter = gt.repeat(2, 1) + torch.randn(2 * n, 4, generator=g) * 4  # near hits, duplicates and misses
        boxes = torch.cat([jitter, _random_boxes(3, g) * 100])
        scores = (torch.rand(len(boxes), generator=g) * 10).round() / 10  # coarse: many ties
        dets.append({"boxes": boxes, "scores": scores, "labels": torch.randint(0, 2, (len(boxes),), generator=g)})
    r = mean_average_precision(dets, targets, 2)
    for c in range(2):
        assert r.ap[c] == pytest.approx(_voc_eval_reference(dets, targets, c), abs=1e-12)


# ----------------------------------------------------------------------------- model, task, methods
def _targets(b: int) -> list[dict]:
    return [
        {"boxes": torch.tensor([[0.1, 0.1, 0.45, 0.5], [0.55, 0.6, 0.8, 0.9]]), "labels": torch.tensor([k % 3, 2]), "difficult": torch.tensor([False, False])}
        for k in range(b)
    ]


def test_ssd_registered_forward_attention_and_detect():
    assert {"ssd_resnet18", "ssd_resnet34"} <= set(MODELS.names())
    assert getattr(MODELS.get("ssd_resnet18"), "task", None) == "detection"
    torch.manual_seed(0)
    model = create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    out, m = model(x, return_attention=True)
    assert out.shape == (2, model.num_priors, 4 + 4) and m.shape == (2, 1, 32, 32)
    assert model.feature_sizes == (8, 4, 2, 1)
    other = torch.rand(2, 1, 32, 32)
    out_o, m_o = model(x, attention_map=other, return_attention=True)
    assert torch.equal(m_o, other) and not torch.allclose(out_o, out)
    dets = model.detect(x, score_threshold=0.0, top_k=7)
    assert len(dets) == 2 and dets[0]["boxes"].shape == (7, 4) and dets[0]["labels"].max() < 3
    assert bool((dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all())
    with pytest.raises(ValueError, match="64x64"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError):
        create_model("ssd_resnet18", num_classes=0)


def test_attack_loss_is_per_image_and_drives_attacks():
    torch.manual_seed(0)
    model = create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=64).eval()
    task = DetectionTask()
    x, t = torch.rand(3, 3, 64, 64), _targets(3)
    loss_fn = task.attack_loss(model)
    with torch.no_grad():
        full = loss_fn(model(x), t)
        single = loss_fn(model(x[1:2]), t[1:2])
    assert full.shape == (3,)
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)  # eval mode: independent of the batch
    x_adv = aal.attacks.PGD(eps=4 / 255, steps=3, loss=loss_fn)(model, x, t)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    with torch.no_grad():
        assert bool((loss_fn(model(x_adv), t) > full).all())
    assert detector_of(model) is model


def test_detection_aal_attacks_only_within_the_foreground_budget():
    torch.manual_seed(0)
    model = create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=64)
    x, t = torch.rand(2, 3, 64, 64), _targets(2)
    method = create_method("detection_aal", eps=8 / 255)
    x_adv, res, mask = method.craft(model, x, t)
    assert mask.shape == (2, 1, 64, 64)
    torch.testing.assert_close(mask, res.m_a_input**2)  # the M^a o M^a kernel
    assert bool(((x_adv - x).abs() <= 8 / 255 * mask + 1e-6).all())
    assert (x_adv - x).abs().sum() > 0
    x0, _, _ = create_method("detection_aal", eps=0.0).craft(model, x, t)
    assert torch.equal(x0, x)
    with pytest.raises(ValueError):
        create_method("detection_aal", kernel="nope")
    with pytest.raises(TypeError, match="targets"):
        method(model, (x, torch.tensor([0, 1])))


@needs_bccd
@pytest.mark.parametrize("name", ["detection", "detection_aal"])
def test_few_training_iterations_on_real_bccd_with_the_trainer(name, tmp_path):
    from aal.engine import Trainer, build_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        split = load_voc(BCCD, "train", BCCD_CLASSES, image_size=96, max_images=4)
    torch.manual_seed(0)
    model = create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=96, mean=split.channel_stats()[0], std=split.channel_stats()[1])
    loader = DetectionLoader(split, batch_size=2, shuffle=True, augment="flip_photometric")
    opt = build_optimizer(model, lr=0.01)
    task = DetectionTask(score_threshold=0.05, top_k=50)
    trainer = Trainer(
        model, create_method(name), loader, opt, epochs=1, run_dir=tmp_path, progress=False,
        evaluate_fn=lambda m: task.evaluate(m, split, batch_size=4).as_dict(),
    )  # fmt: skip
    (record,) = trainer.fit()
    assert math.isfinite(record["train_loss"]) and record["images"] == 4 and record["train_acc"] is None
    assert record["logs"]["num_pos"] > 0
    if name == "detection_aal":
        assert 0 < record["logs"]["mask_mean"] < 1 and "loss_adv" in record["logs"]
    ev = record["eval"]
    assert 0.0 <= ev["map50"] <= 1.0 and set(ev) == {"map50", "ap50/RBC", "ap50/WBC", "ap50/Platelets"}
    assert (tmp_path / "checkpoints" / "last").exists()


@needs_bccd
def test_bccd_quirks_and_figure(tmp_path):
    # the two one-click "boxes" of the real data are dropped, with a warning naming the file
    for image_id in ("BloodImage_00338", "BloodImage_00343"):
        with pytest.warns(UserWarning, match=f"{image_id}.xml.*degenerate"):
            ann = parse_voc_xml(BCCD / "BCCD" / "Annotations" / f"{image_id}.xml", BCCD_CLASSES)
        assert ann.dropped == 1 and float(ann.boxes.min()) >= 0 and float(ann.boxes[:, 2].max()) <= 640
    assert len(read_image_set(BCCD / "BCCD", "trainval")) == 292 and len(read_image_set(BCCD / "BCCD", "test")) == 72
    split = load_voc(BCCD, "test", BCCD_CLASSES, image_size=64, max_images=3)
    assert split.images.shape == (3, 3, 64, 64) and split.orig_sizes.tolist() == [[480, 640]] * 3
    torch.manual_seed(0)
    model = create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=64)
    x = split.images.float() / 255
    path = detection_grid(model, x, split.targets, tmp_path / "det.png", n=2, class_names=BCCD_CLASSES, eps=4 / 255, score_threshold=0.3)
    assert path.is_file() and path.stat().st_size > 1000


def test_detection_configs_validate(tmp_path):
    from aal.config import ConfigError

    for name in ("bccd_ssd.yaml", "bccd_ssd_aal.yaml"):
        cfg = load_detection_config(REPO / "configs" / "detection" / name, ["epochs=2", "data.image_size=128"])
        assert cfg.task == "detection" and cfg.epochs == 2 and cfg.data.image_size == 128
        assert cfg.method.name in ("detection", "detection_aal")
    aal_cfg = load_detection_config(REPO / "configs" / "detection" / "bccd_ssd_aal.yaml")
    assert aal_cfg.method.params["eps"] == pytest.approx(2 / 255) and aal_cfg.method.params["kernel"] == "m2"
    with pytest.raises(ConfigError, match="data.nope"):
        load_detection_config(None, ["data.nope=1"])
    with pytest.raises(ConfigError, match="not a detector"):
        load_detection_config(None, ["model.name=resnet18"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_detection_config(REPO / "configs" / "detection" / "bccd_ssd_aal.yaml", ["model.attention=none"])
    with pytest.raises(ConfigError, match="not a detection method"):
        load_detection_config(None, ["method.name=pgd_at"])
    assert {"detection", "detection_aal"} <= set(METHODS.names())


@needs_bccd
def test_train_detection_writes_a_run_that_reloads(tmp_path):
    import json

    from aal.engine.task_runs import load_detection_run, train_detection
    from aal.viz import detection_grid_for_run

    cfg = load_detection_config(
        REPO / "configs" / "detection" / "bccd_ssd_aal.yaml",
        [f"data.root={BCCD}", "epochs=1", "data.image_size=64", "data.batch_size=2", "data.train_n=2", "data.val_split=null",
         "data.test_n=2", "progress=false", "eval.top_k=20"],
    )  # fmt: skip
    run_dir, res = train_detection(cfg, run_dir=tmp_path / "run", log=lambda s: None, device="cpu")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["test"]["map50"] == pytest.approx(res["test"]["map50"]) and saved["method"] == "detection_aal"
    exp = load_detection_run(run_dir, device="cpu")
    assert exp.final_eval() == pytest.approx(res["test"], nan_ok=True)  # the same weights, the same numbers
    assert set(exp.final_eval(n=1)) == set(res["test"])
    path = detection_grid_for_run(exp, n=2, out_path=tmp_path / "viz.png")
    assert path.is_file()


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("aal.data.voc", "aal.models.ssd", "aal.tasks.detection_metrics", "aal.methods.detection", "aal.tasks.detection"):
        mod = importlib.import_module(name)
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"doctest failed in {name}"
