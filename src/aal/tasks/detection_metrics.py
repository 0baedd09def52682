"""Pascal VOC detection metric: per-class average precision and mAP@0.5 (all-point interpolation).

This is the metric of the VOC devkit since 2010 (``VOCevaldet`` / py-faster-rcnn's
``voc_eval`` with ``use_07_metric=False``), which the AAL paper reports on Pascal VOC (Table 4):

* per class, all detections of the class over the whole set are sorted by decreasing score
  (ties keep their input order, a stable sort);
* a detection is a true positive if its best-overlapping ground-truth box of the same class in
  its image has ``IoU >= iou_threshold`` (as the devkit's ``VOCevaldet.m``: ``ovmax >= minoverlap``;
  py-faster-rcnn's ``voc_eval.py`` uses ``>``, which differs only at exactly 0.5) and
  that box was not already taken by a higher-scoring detection; otherwise a false positive;
* **difficult** ground-truth boxes are ignored: they do not count in the number of positives,
  and a detection whose best match is a difficult box is neither a true nor a false positive;
* AP is the area under the precision-recall curve with precision made monotonically
  non-increasing ("all-point interpolation"); mAP is the mean over classes that have at least
  one non-difficult ground-truth box (a class without any has AP = NaN and is left out).

Boxes are xyxy in continuous coordinates; IoU has no ``+1`` (with the 0-based half-open
conversion of :mod:`aal.data.voc` the ground-truth overlaps equal the devkit's). Boxes may be
normalised or in pixels, as long as detections and targets agree (IoU is invariant to the
resize of both).

torchmetrics' ``MeanAveragePrecision`` installs here but needs a COCO backend (pycocotools or
faster-coco-eval) and computes COCO's 101-point interpolated AP, not VOC's; we implement VOC's.

Example:
    >>> import torch
    >>> from aal.tasks.detection_metrics import DetectionMAP
    >>> metric = DetectionMAP(num_classes=2)
    >>> targets = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0])}]
    >>> dets = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    >>> metric.update(dets, targets)
    >>> r = metric.compute()
    >>> r.map, r.ap[0], r.num_gt.tolist()
    (1.0, 1.0, [1, 0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from aal.models.ssd import box_iou


def voc_ap(recall: Tensor, precision: Tensor) -> float:
    """All-point interpolated AP (VOC 2010+) of a PR curve given at each ranked detection.

    ``AP = sum_i (r_{i+1} - r_i) * max_{j >= i+1} p_j`` with sentinels ``r = [0, ..., 1]``,
    ``p = [0, ..., 0]``.

    Args:
        recall: (n,) non-decreasing recalls.
        precision: (n,) precisions.

    Example:
        >>> round(voc_ap(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2 / 3])), 6)   # 0.5 * 1 + 0.5 * 2/3
        0.833333
    """
    mrec = torch.cat([torch.zeros(1, dtype=torch.float64), recall.double().cpu(), torch.ones(1, dtype=torch.float64)])
    mpre = torch.cat([torch.zeros(1, dtype=torch.float64), precision.double().cpu(), torch.zeros(1, dtype=torch.float64)])
    # precision envelope: running maximum from the right
    mpre = mpre.flip(0).cummax(0).values.flip(0)
    change = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[change + 1] - mrec[change]) * mpre[change + 1]).sum())


@dataclass
class DetectionMetrics:
    """Result of :meth:`DetectionMAP.compute`.

    Attributes:
        map: mean AP over classes with ground truth (NaN if none has).
        ap: per-class AP (NaN for a class without non-difficult ground truth).
        num_gt: non-difficult ground-truth boxes per class.
        num_det: detections per class.
        iou_threshold: the IoU threshold used.
        class_names: names (``class_<i>`` when not given).
    """

    map: float
    ap: list[float]
    num_gt: Tensor
    num_det: Tensor
    iou_threshold: float
    class_names: list[str] = field(default_factory=list)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"map50": ..., "ap50/<class>": ...}`` (the key says the IoU threshold in percent)."""
        t = int(round(self.iou_threshold * 100))
        out = {f"{prefix}map{t}": self.map}
        out.update({f"{prefix}ap{t}/{n}": a for n, a in zip(self.class_names, self.ap)})
        return out


class DetectionMAP:
    """Accumulates detections and ground truth over a dataset; :meth:`compute` gives VOC AP/mAP.

    Args:
        num_classes: K; labels are in ``0..K-1``.
        iou_threshold: 0.5 for mAP@0.5.
        class_names: optional K names for the report.
    """

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1), got {iou_threshold}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.iou_threshold = float(iou_threshold)
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self._dets: list[dict[str, Tensor]] = []
        self._gts: list[dict[str, Tensor]] = []

    def update(self, detections: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        """Add one batch: per image, detections ``{boxes (k,4), scores (k,), labels (k,)}`` and
        targets ``{boxes (n,4), labels (n,), difficult (n,) optional}``."""
        if len(detections) != len(targets):
            raise ValueError(f"{len(detections)} detection sets for {len(targets)} targets")
        for d, t in zip(detections, targets):
            for key in ("boxes", "scores", "labels"):
                if key not in d:
                    raise KeyError(f"a detection dict needs {key!r}; got {sorted(d)}")
            n = t["labels"].numel()
            diff = t.get("difficult")
            diff = torch.zeros(n, dtype=torch.bool) if diff is None else diff.detach().cpu().bool()
            self._dets.append({k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")})
            self._gts.append({"boxes": t["boxes"].detach().cpu().float(), "labels": t["labels"].detach().cpu().long(), "difficult": diff})

    def compute(self) -> DetectionMetrics:
        """Per-class AP and mAP over everything added so far."""
        aps, num_gt, num_det = [], [], []
        for c in range(self.num_classes):
            ap, npos, ndet = self._class_ap(c)
            aps.append(ap)
            num_gt.append(npos)
            num_det.append(ndet)
        valid = [a for a in aps if not math.isnan(a)]
        m = sum(valid) / len(valid) if valid else float("nan")
        return DetectionMetrics(
            map=m, ap=aps, num_gt=torch.tensor(num_gt), num_det=torch.tensor(num_det),
            iou_threshold=self.iou_threshold, class_names=list(self.class_names),
        )  # fmt: skip

    def _class_ap(self, c: int) -> tuple[float, int, int]:
        npos, scores, flags = 0, [], []
        for d, g in zip(self._dets, self._gts):
            sel = g["labels"] == c
            # IoUs in float64, as the devkit (MATLAB doubles): the >= threshold test is exact at 0.5
            gb, gdiff = g["boxes"][sel].reshape(-1, 4).double(), g["difficult"][sel].numpy()
            npos += int((~gdiff).sum())
            dsel = d["labels"] == c
            if not bool(dsel.any()):
                continue
            sc = d["scores"][dsel].double()
            db = d["boxes"][dsel].reshape(-1, 4).double()
            # The greedy assignment in an image depends only on that image's detections, taken in
            # decreasing score (ties: input order, as the global stable sort): so it is done per
            # image with one IoU matrix, then the flags are ranked globally.
            order = torch.sort(sc, descending=True, stable=True).indices
            flag = np.zeros(order.numel(), dtype=np.int8)  # 1 TP, -1 FP, 0 ignored (difficult)
            if gb.shape[0] == 0:
                flag[:] = -1
            else:
                ious = box_iou(db[order], gb)
                best_iou, best = ious.max(1)  # first maximum, as numpy's argmax in the devkit
                best_iou, best = best_iou.numpy(), best.numpy()
                taken = np.zeros(gb.shape[0], dtype=bool)
                for k in range(order.numel()):
                    j = best[k]
                    if best_iou[k] >= self.iou_threshold:
                        if gdiff[j]:
                            continue  # matched a difficult box: neither TP nor FP
                        if not taken[j]:
                            flag[k], taken[j] = 1, True
                        else:
                            flag[k] = -1  # a duplicate
                    else:
                        flag[k] = -1
            scores.append(sc[order])
            flags.append(torch.from_numpy(flag))
        if not scores:
            return (float("nan") if npos == 0 else 0.0), npos, 0
        score_t, flag_t = torch.cat(scores), torch.cat(flags)
        rank = torch.sort(score_t, descending=True, stable=True).indices
        flag_t = flag_t[rank]
        n = int(flag_t.numel())
        if npos == 0:
            return float("nan"), npos, n
        ctp = (flag_t == 1).double().cumsum(0)
        cfp = (flag_t == -1).double().cumsum(0)
        recall = ctp / npos
        precision = ctp / (ctp + cfp).clamp_min(torch.finfo(torch.float64).eps)
        return voc_ap(recall, precision), npos, n


def mean_average_precision(
    detections: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> DetectionMetrics:
    """VOC AP/mAP of per-image ``detections`` against ``targets`` in one call (see :class:`DetectionMAP`)."""
    metric = DetectionMAP(num_classes, iou_threshold, class_names)
    metric.update(detections, targets)
    return metric.compute()


__all__ = ["DetectionMAP", "DetectionMetrics", "mean_average_precision", "voc_ap"]
