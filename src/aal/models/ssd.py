"""SSD (Liu et al., ECCV 2016) on a ResNet backbone with AAL's attention hook, and its box machinery.

Everything a single-shot detector needs, in plain torch (torchvision is not available here):

* box utilities: :func:`box_iou`, :func:`xyxy_to_cxcywh`, :func:`cxcywh_to_xyxy`,
  :func:`encode` / :func:`decode` (SSD's offsets with variances (0.1, 0.2)),
  :func:`nms` (greedy) and :func:`batched_nms` (per class);
* :func:`prior_boxes` (SSD's default boxes), :func:`match` (IoU >= 0.5 plus the best prior of
  every ground-truth box), :func:`multibox_loss` (smooth L1 + cross-entropy with 3:1
  hard-negative mining);
* :class:`SSD`, registered as ``ssd_resnet18`` (and ``ssd_resnet34``, the paper's backbone),
  with :meth:`SSD.detect` (decode, score threshold, per-class NMS, top-k).

**Output format.** ``model(x)`` returns ONE tensor ``(B, P, 4 + K + 1)`` for P default boxes:
``[..., :4]`` are the box offsets and ``[..., 4:]`` the class logits, index 0 = background,
index ``c + 1`` = class ``c`` of the dataset. A single tensor (rather than a tuple) keeps every
generic piece of :mod:`aal` working unchanged: attacks (``loss_fn(outputs, y) -> (B,)``),
:func:`aal.attention.associative_attention`, ``attention_map`` overrides. Use
:func:`split_outputs` to get ``(loc, conf)``.

**Boxes** are ``[x1, y1, x2, y2]`` normalised to [0,1] (see :mod:`aal.data.voc`); targets are
dicts with ``boxes``, ``labels`` in ``0..K-1`` and optional ``difficult``.

**Architecture** (``image_size`` S; the attention slot after the first convolution):
``normalize -> conv7x7/2 (stem) -> attention -> BN-ReLU-maxpool -> layer1 -> layer2 (S/8) ->
layer3 (S/16) -> layer4 (S/32) -> extras (conv1x1 + conv3x3/2 with BN, until 1x1)``; a 3x3 conv
head for offsets and one for class logits on each source map (layer2, layer3, layer4, extras).
For S = 512 the maps are 64, 32, 16, 8, 4, 2, 1 (SSD512's seven maps), for S = 300:
38, 19, 10, 5, 3, 2, 1, for S = 160: 20, 10, 5, 3, 2, 1.

**Simplified vs. SSD512 of the paper** (SSD512 on ImageNet-pretrained ResNet-34):

* No pretrained backbone (no download here): ``pretrained`` is not an option; a user can load
  weights into ``model.stem`` / ``model.trunk`` (torchvision's ResNet names minus ``conv1``).
* Source maps are ResNet's layer2/3/4 (strides 8/16/32) instead of VGG's conv4_3/fc7; no L2Norm
  on the first map (BatchNorm already scales it); extras carry BatchNorm.
* Default-box scales follow Caffe SSD (:func:`default_scales`: first map ``first_scale``, then
  linear from ``min_scale`` to ``max_scale``, plus the ``sqrt(s_k s_{k+1})`` box), aspect ratios
  {2} on the first and last two maps and {2, 3} elsewhere, all options. The defaults are
  SSD300's (0.1; 0.2 to 0.9); SSD512 used ``first_scale=0.07, min_scale=0.15``.
* Augmentation is resize + flip + photometric (:mod:`aal.data.voc`); SSD's random crops and
  zoom-out ("expand") are not implemented.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=128)
    >>> out, m = model(torch.rand(2, 3, 128, 128), return_attention=True)
    >>> out.shape[0], out.shape[2], tuple(m.shape)
    (2, 8, (2, 1, 64, 64))
    >>> dets = model.detect(torch.rand(2, 3, 128, 128))
    >>> sorted(dets[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.models.base import AttentionNet
from aal.models.layers import init_weights
from aal.utils.distributed import all_reduce_, get_world_size

VARIANCES = (0.1, 0.2)
"""SSD's box-coding variances (centre, size)."""


# ----------------------------------------------------------------------------- box utilities
def box_area(boxes: Tensor) -> Tensor:
    """Areas of (n,4) xyxy boxes (0 for inverted boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (n,m) of xyxy boxes ``a`` (n,4) and ``b`` (m,4); 0 where the union is 0."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[x1,y1,x2,y2] -> [cx,cy,w,h]`` (any leading shape)."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[cx,cy,w,h] -> [x1,y1,x2,y2]`` (any leading shape)."""
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)


def encode(boxes: Tensor, priors: Tensor, variances: Sequence[float] = VARIANCES) -> Tensor:
    """SSD offsets of xyxy ``boxes`` (..., P, 4) w.r.t. cxcywh ``priors`` (P, 4).

    ``((cx - pcx) / (v0 pw), (cy - pcy) / (v0 ph), log(w / pw) / v1, log(h / ph) / v1)``.
    """
    g = xyxy_to_cxcywh(boxes)
    centre = (g[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    size = torch.log(g[..., 2:].clamp_min(1e-12) / priors[..., 2:]) / variances[1]
    return torch.cat([centre, size], dim=-1)


def decode(loc: Tensor, priors: Tensor, variances: Sequence[float] = VARIANCES) -> Tensor:
    """Inverse of :func:`encode`: xyxy boxes (..., P, 4) from offsets ``loc`` (..., P, 4)."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    # the exponent is clamped so that an untrained head cannot overflow to inf
    size = priors[..., 2:] * torch.exp((loc[..., 2:] * variances[1]).clamp(max=math.log(1000.0)))
    return cxcywh_to_xyxy(torch.cat([centre, size], dim=-1))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """Greedy non-maximum suppression (as torchvision's ``nms``).

    Repeatedly keep the highest-scoring remaining box and drop every remaining box whose IoU
    with it is *greater than* ``iou_threshold``. Ties in score are broken by the lower index.

    Args:
        boxes: (n,4) xyxy.
        scores: (n,).
        iou_threshold: suppression threshold.
        max_keep: stop after this many kept boxes (the first ``max_keep`` of the full result;
            0 keeps none).

    Returns:
        int64 indices of the kept boxes, by decreasing score.
    """
    if max_keep is not None and int(max_keep) < 0:
        raise ValueError(f"max_keep must be >= 0 or None, got {max_keep}")
    if boxes.numel() == 0 or (max_keep is not None and int(max_keep) == 0):
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    # The greedy scan is sequential; it runs in NumPy (float64) with one IoU row per *kept* box
    # against the boxes after it: ~10 us per kept box, against ~100 ms per image for the full
    # (n,n) IoU matrix of n = 1200 candidates in torch (measured here).
    b = boxes[order].detach().cpu().double().numpy()
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    n = b.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep = []
    limit = n if max_keep is None else int(max_keep)
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit or i + 1 == n:
            break
        r = b[i + 1 :]
        iw = np.clip(np.minimum(b[i, 2], r[:, 2]) - np.maximum(b[i, 0], r[:, 0]), 0, None)
        ih = np.clip(np.minimum(b[i, 3], r[:, 3]) - np.maximum(b[i, 1], r[:, 1]), 0, None)
        inter = iw * ih
        union = area[i] + area[i + 1 :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        removed[i + 1 :] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """:func:`nms` independently per label (boxes of different labels never suppress each other).

    Done in one call by shifting each label's boxes to a disjoint region (torchvision's trick).
    The shift is computed in float64 from the boxes' minimum: in float32, a label offset of
    ``label * span`` rounds the coordinates to the float32 spacing at that magnitude (2 px at
    1.6e7), which changes IoUs and hence the result. Returns kept indices by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    b = boxes.detach().double()
    lo = b.min()
    span = float(b.max() - lo) + 1.0
    shifted = (b - lo) + (labels.to(device=b.device, dtype=torch.float64) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_keep)


# ----------------------------------------------------------------------------- default boxes
def default_aspect_ratios(num_maps: int) -> tuple[tuple[float, ...], ...]:
    """SSD's choice generalised: {2} on the first and the last two maps, {2, 3} in between."""
    return tuple((2.0,) if (k == 0 or k >= num_maps - 2) else (2.0, 3.0) for k in range(num_maps))


def default_scales(num_maps: int, first_scale: float = 0.1, min_scale: float = 0.2, max_scale: float = 0.9) -> tuple[float, ...]:
    """``num_maps + 1`` default-box scales, as Caffe SSD (and ssd.pytorch) compute them.

    ``first_scale`` for the first map, then ``min_scale + k * step`` for the others and one more
    (which only serves the ``sqrt(s_k s_{k+1})`` box of the last map), with the step
    ``(max_scale - min_scale) / (num_maps - 2)`` floored to a whole percent as in Caffe SSD.
    SSD300: ``default_scales(6)`` = 0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05 (min sizes 30, 60,
    111, 162, 213, 264 and 315 on 300 pixels); SSD512: ``default_scales(7, 0.07, 0.15, 0.9)``.
    """
    if num_maps < 1:
        raise ValueError(f"num_maps must be >= 1, got {num_maps}")
    if not (0 < first_scale and 0 < min_scale <= max_scale):
        raise ValueError(f"need 0 < first_scale and 0 < min_scale <= max_scale, got {first_scale}, {min_scale}, {max_scale}")
    if num_maps == 1:
        return (first_scale, max_scale)
    if num_maps == 2:
        return (first_scale, min_scale, max_scale)
    step = math.floor(round(100 * (max_scale - min_scale) / (num_maps - 2), 6)) / 100
    return tuple([first_scale] + [round(min_scale + step * k, 10) for k in range(num_maps)])


def prior_boxes(
    feature_sizes: Sequence[int],
    scales: Sequence[float],
    aspect_ratios: Sequence[Sequence[float]],
    clip: bool = True,
) -> Tensor:
    """SSD default boxes, cxcywh normalised, (P,4), in the order the heads emit them.

    For map k of size f (cells centred at ``((j + 0.5) / f, (i + 0.5) / f)``, row-major), each
    cell gets, in this order: a square of side ``s_k``, a square of side ``sqrt(s_k s_{k+1})``,
    and for each ratio r the pair ``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose. So
    ``2 + 2 len(ratios_k)`` boxes per cell.

    Args:
        feature_sizes: side of each (square) source map.
        scales: ``len(feature_sizes) + 1`` scales.
        aspect_ratios: ratios (> 1; the transpose is added) per map.
        clip: clip the cxcywh values to [0,1] (ssd.pytorch's default).
    """
    if len(scales) != len(feature_sizes) + 1:
        raise ValueError(f"need {len(feature_sizes) + 1} scales for {len(feature_sizes)} maps, got {len(scales)}")
    if len(aspect_ratios) != len(feature_sizes):
        raise ValueError(f"need aspect ratios for {len(feature_sizes)} maps, got {len(aspect_ratios)}")
    out = []
    for k, f in enumerate(feature_sizes):
        s, s_next = scales[k], scales[k + 1]
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in aspect_ratios[k]:
            if not r > 0:
                raise ValueError(f"aspect ratios must be positive, got {r}")
            q = math.sqrt(r)
            shapes += [(s * q, s / q), (s / q, s * q)]
        wh = torch.tensor(shapes, dtype=torch.float32)  # (A,2)
        c = (torch.arange(f, dtype=torch.float32) + 0.5) / f
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(shapes), 2)
        out.append(torch.cat([centres, wh.expand(f * f, -1, -1)], dim=-1).reshape(-1, 4))
    priors = torch.cat(out)
    return priors.clamp(0.0, 1.0) if clip else priors


# ----------------------------------------------------------------------------- matching and loss
IGNORE = -1
"""Label of default boxes excluded from the loss (matched to a *difficult* object only)."""


def match(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    priors: Tensor,
    iou_threshold: float = 0.5,
    difficult: Tensor | None = None,
    variances: Sequence[float] = VARIANCES,
) -> tuple[Tensor, Tensor]:
    """SSD matching of one image's objects to the default boxes.

    Each default box is matched to the object it overlaps most if that IoU is ``>=
    iou_threshold``; in addition every object gets its best default box (so no object is left
    unmatched; later objects win a contested box, as in ssd.pytorch). Difficult objects are not
    matched (VOC practice); default boxes whose best overlap is a difficult object with IoU
    ``>= iou_threshold`` get the label :data:`IGNORE` (neither positive nor negative).

    Args:
        gt_boxes: (G,4) xyxy normalised.
        gt_labels: (G,) in ``0..K-1``.
        priors: (P,4) cxcywh.
        iou_threshold: positive threshold (SSD: 0.5).
        difficult: optional bool (G,).

    Returns:
        ``(loc_t (P,4), conf_t (P,))``: encoded offsets of the matched objects (0 for
        background) and labels in ``{IGNORE, 0 (background), 1..K}``.
    """
    P = priors.shape[0]
    dev = priors.device
    loc_t = torch.zeros(P, 4, device=dev, dtype=priors.dtype)
    conf_t = torch.zeros(P, dtype=torch.int64, device=dev)
    if gt_boxes.numel() == 0:
        return loc_t, conf_t
    if difficult is None:
        difficult = torch.zeros(gt_labels.shape, dtype=torch.bool, device=dev)
    iou = box_iou(gt_boxes, cxcywh_to_xyxy(priors))  # (G,P)
    easy = ~difficult
    if bool(easy.any()):
        iou_e = iou[easy]
        boxes_e, labels_e = gt_boxes[easy], gt_labels[easy]
        best_gt_iou, best_gt = iou_e.max(0)  # per prior
        best_prior = iou_e.argmax(1)  # per object
        best_gt_iou[best_prior] = 2.0  # forced matches always pass the threshold
        for j, p in enumerate(best_prior.tolist()):
            best_gt[p] = j
        conf_t = torch.where(best_gt_iou >= iou_threshold, labels_e[best_gt] + 1, conf_t)
        loc_t = encode(boxes_e[best_gt], priors, variances)
        loc_t = torch.where(conf_t[:, None] > 0, loc_t, torch.zeros_like(loc_t))
    if bool(difficult.any()):
        near_difficult = iou[difficult].max(0).values >= iou_threshold
        conf_t = torch.where((conf_t == 0) & near_difficult, torch.full_like(conf_t, IGNORE), conf_t)
    return loc_t, conf_t


def match_targets(
    targets: Sequence[dict[str, Tensor]], priors: Tensor, iou_threshold: float = 0.5, variances: Sequence[float] = VARIANCES
) -> tuple[Tensor, Tensor]:
    """:func:`match` for a batch of target dicts: ``(loc_t (B,P,4), conf_t (B,P))``."""
    locs, confs = [], []
    for t in targets:
        loc, conf = match(
            t["boxes"].to(priors), t["labels"].to(priors.device), priors, iou_threshold,
            t.get("difficult", None), variances,
        )  # fmt: skip
        locs.append(loc)
        confs.append(conf)
    return torch.stack(locs), torch.stack(confs)


@dataclass
class MultiBoxLossOutput:
    """Per-image parts of the multibox loss (all (B,) tensors).

    Attributes:
        loc: summed smooth-L1 of the positive boxes.
        conf: summed cross-entropy of positives and mined negatives.
        num_pos: positives per image.
        num_neg: mined negatives per image.
    """

    loc: Tensor
    conf: Tensor
    num_pos: Tensor
    num_neg: Tensor
    loc_weight: float = 1.0

    def per_image(self) -> Tensor:
        """(B,) ``(conf_i + a loc_i) / max(N_i, 1)``: each image normalised by its own positives."""
        return (self.conf + self.loc_weight * self.loc) / self.num_pos.clamp_min(1).to(self.loc.dtype)

    def total(self) -> Tensor:
        """SSD's batch loss ``(sum conf + a sum loc) / N`` with N the positives of the batch (0 if N = 0).

        Under DDP (a process group of W > 1 processes, gradients on), N is the mean of the
        processes' positives (an all-reduce): DDP averages the gradients over processes, so the
        update is that of SSD's loss over the *global* batch, not a mean of per-process losses
        each normalised by its own positives. Every process calls it in the same step.
        """
        n = self.num_pos.sum()
        world = get_world_size()
        if world > 1 and torch.is_grad_enabled():
            n = all_reduce_(n.detach().clone()).to(self.loc.dtype) / world
        n = n.clamp_min(1).to(self.loc.dtype)
        return (self.conf.sum() + self.loc_weight * self.loc.sum()) / n


def split_outputs(out: Tensor) -> tuple[Tensor, Tensor]:
    """``(loc (B,P,4), conf logits (B,P,K+1))`` from the detector's packed output (B,P,4+K+1)."""
    return out[..., :4], out[..., 4:]


def multibox_loss(
    out: Tensor,
    targets: Sequence[dict[str, Tensor]] | tuple[Tensor, Tensor],
    priors: Tensor,
    *,
    iou_threshold: float = 0.5,
    neg_pos_ratio: float = 3.0,
    loc_weight: float = 1.0,
    variances: Sequence[float] = VARIANCES,
) -> MultiBoxLossOutput:
    """SSD's multibox loss, per image (Liu et al. 2016, Eq. 1-3 and "hard negative mining").

    ``L_i = L_conf,i + a L_loc,i`` with the smooth-L1 (beta = 1) offset loss over positives and
    the softmax cross-entropy over positives and the ``min(neg_pos_ratio * N_i, #negatives)``
    negatives of highest cross-entropy (hard-negative mining, 3:1). Default boxes labelled
    :data:`IGNORE` count neither way. Images without positives contribute 0 (as SSD).

    Args:
        out: packed outputs (B,P,4+K+1) (see :func:`split_outputs`).
        targets: B target dicts (``boxes``, ``labels``, optional ``difficult``), or the result
            of :func:`match_targets` (to match once and reuse).
        priors: (P,4) cxcywh default boxes.
        iou_threshold: matching threshold.
        neg_pos_ratio: negatives mined per positive.
        loc_weight: a.

    Returns:
        a :class:`MultiBoxLossOutput`; ``.total()`` is SSD's scalar, ``.per_image()`` the (B,)
        loss an attack ascends.
    """
    loc_p, conf_p = split_outputs(out)
    if isinstance(targets, tuple) and len(targets) == 2 and isinstance(targets[0], Tensor):
        loc_t, conf_t = targets
    else:
        if len(targets) != out.shape[0]:
            raise ValueError(f"{out.shape[0]} images but {len(targets)} targets")
        loc_t, conf_t = match_targets(targets, priors, iou_threshold, variances)
    pos = conf_t > 0
    num_pos = pos.sum(1)
    loc = F.smooth_l1_loss(loc_p, loc_t.to(loc_p.dtype), reduction="none").sum(-1)
    loc = (loc * pos).sum(1)
    ce = F.cross_entropy(conf_p.transpose(1, 2), conf_t.clamp_min(0), reduction="none")  # (B,P)
    # hard-negative mining: rank candidate negatives by their CE (no gradient through the ranking)
    is_neg = conf_t == 0
    with torch.no_grad():
        rank_loss = torch.where(is_neg, ce.detach(), torch.full_like(ce, -1.0))
        order = torch.sort(rank_loss, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        num_neg = torch.minimum((neg_pos_ratio * num_pos).floor().long(), is_neg.sum(1))
        neg = (rank < num_neg[:, None]) & is_neg
    conf = (ce * (pos | neg)).sum(1)
    return MultiBoxLossOutput(loc=loc, conf=conf, num_pos=num_pos, num_neg=neg.sum(1), loc_weight=loc_weight)


# ----------------------------------------------------------------------------- the detector
def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SSD(AttentionNet):
    """Single-shot multibox detector on a ResNet with the attention slot after its first convolution.

    Built by :func:`build_ssd` (registered ``ssd_resnet18``, ``ssd_resnet34``); see the module
    doc for the architecture, the output format and what is simplified w.r.t. SSD512.

    ``forward(x, attention_map=None, return_attention=False)`` as every
    :class:`~aal.models.base.AttentionNet`, returning the packed ``(B, P, 4 + K + 1)`` outputs.

    Attributes:
        priors: (P,4) cxcywh default boxes (a buffer, not saved in checkpoints).
        image_size: the input side S the default boxes were laid out for.
        feature_sizes: sides of the source maps.
        num_classes: K object classes (the background is extra).
        variances: box-coding variances.
    """

    def __init__(
        self,
        backbone: AttentionNet,
        num_classes: int,
        image_size: int,
        extra_channels: Sequence[tuple[int, int]] | None = None,
        scales: Sequence[float] | None = None,
        aspect_ratios: Sequence[Sequence[float]] | None = None,
        first_scale: float = 0.1,
        min_scale: float = 0.2,
        max_scale: float = 0.9,
        variances: Sequence[float] = VARIANCES,
    ) -> None:
        trunk = backbone.trunk
        names = [n for n, _ in trunk.named_children()]
        if names[-5:-1] != ["layer1", "layer2", "layer3", "layer4"] or names[-1] != "pool":
            raise ValueError(f"the SSD backbone must be an aal ResNet (trunk ... layer1-4, pool), got {names}")
        body = nn.Sequential(OrderedDict((n, m) for n, m in trunk.named_children() if n != "pool"))
        layer_widths = [_out_channels(getattr(trunk, f"layer{i}")) for i in (2, 3, 4)]
        # spatial sizes: conv7x7/2, maxpool/2, layer2-4 /2 each; every stride-2 op gives ceil(n/2)
        sizes = [image_size]
        for _ in range(5):
            sizes.append(-(-sizes[-1] // 2))
        sizes = sizes[3:]  # layer2 (S/8), layer3 (S/16), layer4 (S/32)
        n_extra = 0
        s = sizes[-1]
        while s > 1:
            s = -(-s // 2)
            n_extra += 1
        if extra_channels is None:
            extra_channels = [(256, 512)] + [(128, 256)] * max(n_extra - 1, 0)
        extra_channels = [tuple(c) for c in extra_channels][:n_extra]
        if len(extra_channels) < n_extra:
            raise ValueError(f"image_size {image_size} needs {n_extra} extra layers, got channels for {len(extra_channels)}")
        extras, cin = [], layer_widths[-1]
        for mid, cout in extra_channels:
            extras.append(nn.Sequential(*_conv_bn_relu(cin, mid, 1), *_conv_bn_relu(mid, cout, 3, 2, 1)))
            sizes.append(-(-sizes[-1] // 2))
            cin = cout
        source_channels = layer_widths + [c for _, c in extra_channels]
        m = len(sizes)
        aspect_ratios = default_aspect_ratios(m) if aspect_ratios is None else tuple(tuple(float(r) for r in a) for a in aspect_ratios)
        if len(aspect_ratios) != m:
            raise ValueError(f"image_size {image_size} gives {m} source maps {sizes}; got aspect ratios for {len(aspect_ratios)}")
        scales = default_scales(m, first_scale, min_scale, max_scale) if scales is None else tuple(float(s) for s in scales)
        if len(scales) != m + 1:
            raise ValueError(f"image_size {image_size} gives {m} source maps {sizes}; need {m + 1} scales, got {len(scales)}")
        anchors = [2 + 2 * len(a) for a in aspect_ratios]
        heads = nn.ModuleDict(
            {
                "loc": nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(source_channels, anchors)),
                "conf": nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1) for c, a in zip(source_channels, anchors)),
            }
        )
        super().__init__(backbone.normalize, backbone.stem, backbone.attention, body, heads, num_classes, source_channels[-1])
        self.extras = nn.ModuleList(extras)
        init_weights(self.extras)
        # small heads at init (RetinaNet-style N(0, 0.01)): trained from scratch, the backbone's
        # features are large and SSD's Xavier init gives initial losses ~5x the chance level
        for conv in list(heads["loc"]) + list(heads["conf"]):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.image_size = int(image_size)
        self.feature_sizes = tuple(sizes)
        self.aspect_ratios = aspect_ratios
        self.scales = scales
        self.variances = tuple(float(v) for v in variances)
        self.register_buffer("priors", prior_boxes(sizes, scales, aspect_ratios), persistent=False)

    @property
    def num_priors(self) -> int:
        return int(self.priors.shape[0])

    def forward_features(self, x: Tensor, attention_map: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:  # type: ignore[override]
        """The source feature maps (layer2, layer3, layer4, extras) and the attention map applied."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this SSD was built for {self.image_size}x{self.image_size} inputs (its default boxes depend on it), "
                f"got {tuple(x.shape[-2:])}; resize the images or build the model with image_size={x.shape[-1]}"
            )
        h = self.stem(self.normalize(x))
        h, m = self.attention(h, override=attention_map)
        feats = []
        for name, module in self.trunk.named_children():
            h = module(h)
            if name in ("layer2", "layer3", "layer4"):
                feats.append(h)
        for extra in self.extras:
            h = extra(h)
            feats.append(h)
        return feats, m

    def forward(
        self, x: Tensor, attention_map: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Packed outputs ``(B, P, 4 + K + 1)`` for images ``x`` (B,3,S,S) in [0,1] (and the map M)."""
        feats, m = self.forward_features(x, attention_map)
        b, k1 = x.shape[0], self.num_classes + 1
        locs, confs = [], []
        for f, lh, ch in zip(feats, self.head["loc"], self.head["conf"]):
            locs.append(lh(f).permute(0, 2, 3, 1).reshape(b, -1, 4))
            confs.append(ch(f).permute(0, 2, 3, 1).reshape(b, -1, k1))
        out = torch.cat([torch.cat(locs, 1), torch.cat(confs, 1)], dim=2)
        return (out, m) if return_attention else out

    def loss(self, out: Tensor, targets, **kwargs) -> MultiBoxLossOutput:
        """:func:`multibox_loss` with this model's default boxes and variances."""
        return multibox_loss(out, targets, self.priors, variances=self.variances, **kwargs)

    @torch.no_grad()
    def detect(
        self,
        x_or_out: Tensor,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        top_k: int = 200,
        pre_nms_top_k: int = 400,
    ) -> list[dict[str, Tensor]]:
        """Detections per image: decode, softmax, per-class score threshold and NMS, overall top-k.

        Args:
            x_or_out: images (B,3,S,S) (run in the model's current mode) or packed outputs (B,P,4+K+1).
            score_threshold: drop (box, class) pairs with a lower softmax score (SSD: 0.01).
            nms_threshold: per-class NMS IoU (SSD: 0.45).
            top_k: detections kept per image (SSD: 200).
            pre_nms_top_k: candidates per class entering NMS (bounds its cost).

        Returns:
            B dicts ``{"boxes": (k,4) xyxy normalised and clipped to [0,1], "scores": (k,),
            "labels": (k,) in 0..K-1}`` by decreasing score.
        """
        out = x_or_out if x_or_out.dim() == 3 else self(x_or_out)
        return postprocess(out, self.priors, self.variances, score_threshold, nms_threshold, top_k, pre_nms_top_k)


def postprocess(
    out: Tensor,
    priors: Tensor,
    variances: Sequence[float] = VARIANCES,
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    top_k: int = 200,
    pre_nms_top_k: int = 400,
) -> list[dict[str, Tensor]]:
    """SSD's detection output for packed outputs (see :meth:`SSD.detect`)."""
    loc, conf = split_outputs(out.detach().float())
    boxes = decode(loc, priors.float(), variances).clamp(0.0, 1.0)
    scores = conf.softmax(-1)[..., 1:]  # (B,P,K), background dropped
    results = []
    for b in range(out.shape[0]):
        cand_boxes, cand_scores, cand_labels = [], [], []
        for c in range(scores.shape[-1]):
            s = scores[b, :, c]
            idx = torch.nonzero(s > score_threshold).flatten()
            if idx.numel() == 0:
                continue
            if idx.numel() > pre_nms_top_k:
                idx = idx[s[idx].topk(pre_nms_top_k).indices]
            cand_boxes.append(boxes[b, idx])
            cand_scores.append(s[idx])
            cand_labels.append(torch.full((idx.numel(),), c, dtype=torch.int64, device=out.device))
        if not cand_boxes:
            results.append({
                "boxes": torch.zeros(0, 4, device=out.device), "scores": torch.zeros(0, device=out.device),
                "labels": torch.zeros(0, dtype=torch.int64, device=out.device),
            })  # fmt: skip
            continue
        bx, sc, lb = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_labels)
        keep = batched_nms(bx, sc, lb, nms_threshold, max_keep=top_k)
        results.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
    return results


def _out_channels(stage: nn.Sequential) -> int:
    last = list(stage.children())[-1]
    for name in ("bn3", "bn2"):
        if hasattr(last, name):
            return int(getattr(last, name).num_features)
    raise ValueError("cannot infer the width of a ResNet stage")


def build_ssd(
    depth: int,
    num_classes: int = 20,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    image_size: int = 300,
    **options,
) -> SSD:
    """An SSD on a ResNet-``depth`` (18 or 34) with the ImageNet stem (conv7x7/2 + max-pool)."""
    from aal.models.resnet import build_resnet

    if num_classes < 1:
        raise ValueError(f"a detector needs num_classes >= 1 object classes, got {num_classes}")
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    backbone = build_resnet(
        "basic", layers, num_classes=0, in_channels=3 if in_channels is None else in_channels, mean=mean, std=std,
        attention=attention, stem="imagenet",
    )  # fmt: skip
    return SSD(backbone, num_classes, int(image_size), **options)


# ----------------------------------------------------------------------------- registry
from aal.models import MODELS  # noqa: E402  (MODELS is defined before aal.models imports the zoo)


def _ssd_factory(depth: int, registered: str):
    def factory(
        num_classes: int = 20,
        in_channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        attention: str | None = None,
        *,
        image_size: int = 300,
        first_scale: float = 0.1,
        min_scale: float = 0.2,
        max_scale: float = 0.9,
        scales: Sequence[float] | None = None,
        aspect_ratios: Sequence[Sequence[float]] | None = None,
    ) -> SSD:
        return build_ssd(
            depth, num_classes, in_channels, mean, std, attention, image_size, first_scale=first_scale,
            min_scale=min_scale, max_scale=max_scale, scales=scales, aspect_ratios=aspect_ratios,
        )  # fmt: skip

    factory.__name__ = registered
    factory.__qualname__ = registered
    factory.__doc__ = f"""SSD detector (Liu et al. 2016) on ResNet-{depth} with the attention slot after conv1; outputs (B,P,4+K+1).

    ``num_classes`` counts object classes (the background class is added). Not a classifier:
    ``model(x)`` returns packed box offsets and class logits (see :mod:`aal.models.ssd`).

    Options:
        image_size: input side S the default boxes are laid out for (paper: 512; 300 is SSD300;
            small values such as 128-160 for CPU runs).
        first_scale, min_scale, max_scale: SSD's default-box scales (0.1; 0.2 to 0.9).
        scales: explicit per-map scales (one more than the number of maps) instead.
        aspect_ratios: per-map ratios (default: {{2}} on the first and last two maps, {{2,3}} elsewhere).
    """
    factory.task = "detection"  # type: ignore[attr-defined]  (classifier contract tests skip it)
    return MODELS.register(registered)(factory)


ssd_resnet18 = _ssd_factory(18, "ssd_resnet18")
ssd_resnet34 = _ssd_factory(34, "ssd_resnet34")


__all__ = [
    "IGNORE", "MultiBoxLossOutput", "SSD", "VARIANCES", "batched_nms", "box_area", "box_iou", "build_ssd",
    "cxcywh_to_xyxy", "decode", "default_aspect_ratios", "default_scales", "encode", "match", "match_targets",
    "multibox_loss", "nms", "postprocess", "prior_boxes", "split_outputs", "ssd_resnet18", "ssd_resnet34",
    "xyxy_to_cxcywh",
]  # fmt: skip
