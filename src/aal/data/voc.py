"""Pascal VOC-layout object-detection data: reader, in-memory split, box-aware augmentation, loader.

The layout (Everingham et al. 2010; BCCD uses the same)::

    ROOT/Annotations/<id>.xml          one VOC XML per image (size, object/name, difficult, bndbox)
    ROOT/JPEGImages/<id>.jpg
    ROOT/ImageSets/Main/<split>.txt    one image id per line (train, val, trainval, test)

Conventions (stated once, used everywhere in :mod:`aal.tasks.detection`):

* **Coordinates.** VOC writes 1-based, *inclusive* pixel indices: a box ``xmin..xmax`` covers
  the pixels ``xmin, ..., xmax``. We convert them to 0-based, half-open, continuous coordinates
  ``[x1, x2) = [xmin - 1, xmax)``, so ``x2 - x1`` is the box width in pixels and the VOC
  devkit's ``+1`` in widths and intersections disappears (IoUs of ground-truth boxes are the
  devkit's exactly).
* **Degenerate boxes** (``xmax <= xmin`` or ``ymax <= ymin`` as written in the file, e.g. the
  two one-click "boxes" of BCCD ``BloodImage_00338/00343``) are dropped with a
  :class:`UserWarning` naming the file: a zero-extent annotation marks no object. Boxes that
  stick out of the image are clipped to it (and dropped, with a warning, if nothing is left).
* **Targets** are dicts ``{"boxes": (n,4) float32, "labels": (n,) int64, "difficult": (n,) bool}``
  with boxes ``[x1, y1, x2, y2]`` **normalised to [0,1]** by the image's width and height (so
  they are independent of the resize, and IoU is invariant to it), and labels indexing the
  class list given to the reader (``0 .. C-1``; the detector adds its background class itself).
* **Images** are read with PIL (converted to RGB), resized to ``image_size x image_size``
  (bilinear; the aspect ratio is not kept, as SSD does) and held in memory as uint8
  ``(N,3,S,S)``; batches are float32 in [0,1] (RobustBench convention).
* Malformed files raise :class:`aal.data.DataError` naming the file and what is wrong.

Example:
    >>> from aal.data.voc import BCCD_CLASSES, load_voc, DetectionLoader
    >>> split = load_voc("../shared/data/bccd", "train", BCCD_CLASSES, image_size=160)  # doctest: +SKIP
    >>> loader = DetectionLoader(split, batch_size=8, shuffle=True, augment="flip")       # doctest: +SKIP
    >>> images, targets = next(iter(loader))    # (8,3,160,160) in [0,1]; 8 target dicts  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from aal.data.base import DataError, candidate_dirs
from aal.data.limits import MAX_IMAGE_FILE_BYTES, check_relative_name, open_image, read_file_bounded

#: The 20 Pascal VOC classes, in the devkit's order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
#: The 3 BCCD classes (Shenggan/BCCD_Dataset).
BCCD_CLASSES = ("RBC", "WBC", "Platelets")

#: Accepted values of ``DetectionLoader(augment=...)``.
DETECTION_AUGMENTATIONS = ("none", "flip", "photometric", "flip_photometric")
#: Accepted values of ``parse_voc_xml(unknown_class=...)``.
UNKNOWN_CLASS = ("error", "ignore")

Target = dict[str, Tensor]


# ----------------------------------------------------------------------------- XML
@dataclass
class VOCAnnotation:
    """One parsed annotation file.

    Attributes:
        path: the XML file.
        filename: the ``<filename>`` field (the image's file name).
        width, height: ``<size>`` in pixels.
        boxes: float32 (n,4) ``[x1, y1, x2, y2]``, 0-based half-open *pixel* coordinates.
        labels: int64 (n,) indices into the class list.
        difficult: bool (n,).
        dropped: how many degenerate boxes were dropped.
    """

    path: Path
    filename: str
    width: int
    height: int
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    dropped: int = 0

    def target(self) -> Target:
        """The boxes normalised to [0,1] by width/height, as a target dict."""
        scale = torch.tensor([self.width, self.height, self.width, self.height], dtype=torch.float32)
        return {"boxes": self.boxes / scale, "labels": self.labels.clone(), "difficult": self.difficult.clone()}


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{path}: malformed VOC annotation: {where} has no <{tag}>")
    return child.text.strip()


def _number(text: str, path: Path, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{path}: malformed VOC annotation: {what} is {text!r}, not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{path}: malformed VOC annotation: {what} is {text!r}")
    return v


def parse_voc_xml(path: str | os.PathLike, classes: Sequence[str], *, unknown_class: str = "error") -> VOCAnnotation:
    """Parse one VOC XML annotation.

    Args:
        path: the ``.xml`` file.
        classes: the class list; an object's label is its name's index here (names are matched
            exactly after stripping whitespace).
        unknown_class: ``"error"`` (default) raises on an object whose name is not in
            ``classes``; ``"ignore"`` skips it (e.g. to train on a subset of VOC's classes).

    Returns:
        a :class:`VOCAnnotation` with 0-based half-open pixel boxes (see the module doc).

    Raises:
        DataError: the file is missing, is not well-formed XML, lacks ``<size>``/``<bndbox>``
            fields, has non-numeric coordinates or an unknown class name; the message names
            the file.

    Warns:
        UserWarning: for each degenerate box dropped (naming the file and the box).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.xml"
        >>> _ = p.write_text("<annotation><size><width>10</width><height>8</height></size>"
        ...     "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>8</ymax>"
        ...     "</bndbox></object></annotation>")
        >>> parse_voc_xml(p, ["dog", "cat"]).boxes.tolist(), parse_voc_xml(p, ["dog", "cat"]).labels.tolist()
        ([[0.0, 1.0, 5.0, 8.0]], [1])
    """
    path = Path(path)
    if unknown_class not in UNKNOWN_CLASS:
        raise ValueError(f"unknown_class must be one of {UNKNOWN_CLASS}, got {unknown_class!r}")
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"the class list has duplicates: {list(classes)}")
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: malformed VOC annotation: the root element is <{root.tag}>, not <annotation>")
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: malformed VOC annotation: no <size>")
    width = _number(_text(size, "width", path, "<size>"), path, "<size><width>")
    height = _number(_text(size, "height", path, "<size>"), path, "<size><height>")
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise DataError(f"{path}: malformed VOC annotation: image size {width}x{height} is not a positive integer size")
    w, h = int(width), int(height)
    fname_node = root.find("filename")
    filename = fname_node.text.strip() if fname_node is not None and fname_node.text else path.stem + ".jpg"

    boxes, labels, difficult, dropped = [], [], [], 0
    for k, obj in enumerate(root.findall("object")):
        where = f"<object> #{k + 1}"
        name = _text(obj, "name", path, where)
        if name not in index:
            if unknown_class == "ignore":
                continue
            raise DataError(f"{path}: {where} has class {name!r}, not in the class list {list(classes)}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: malformed VOC annotation: {where} ({name}) has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _number(_text(bnd, t, path, f"{where} <bndbox>"), path, f"{where} <{t}>") for t in ("xmin", "ymin", "xmax", "ymax")
        )
        if xmax <= xmin or ymax <= ymin:
            warnings.warn(
                f"{path}: dropping degenerate box of {where} ({name}): xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} "
                f"ymax={ymax:g} has no extent",
                UserWarning,
                stacklevel=2,
            )
            dropped += 1
            continue
        # 1-based inclusive -> 0-based half-open, clipped to the image
        x1, y1, x2, y2 = max(xmin - 1, 0.0), max(ymin - 1, 0.0), min(xmax, float(w)), min(ymax, float(h))
        if x2 <= x1 or y2 <= y1:
            warnings.warn(
                f"{path}: dropping box of {where} ({name}) outside the {w}x{h} image: "
                f"xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}",
                UserWarning,
                stacklevel=2,
            )
            dropped += 1
            continue
        diff_node = obj.find("difficult")
        is_difficult = False
        if diff_node is not None and diff_node.text is not None and diff_node.text.strip():
            is_difficult = bool(int(_number(diff_node.text.strip(), path, f"{where} <difficult>")))
        boxes.append([x1, y1, x2, y2])
        labels.append(index[name])
        difficult.append(is_difficult)
    return VOCAnnotation(
        path=path,
        filename=filename,
        width=w,
        height=h,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
        dropped=dropped,
    )


# ----------------------------------------------------------------------------- files
def find_voc_root(root: str | os.PathLike | None, name: str = "bccd", subdirs: Sequence[str] = ("BCCD", "VOC2007", "VOC2012")) -> Path:
    """The folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.

    ``root`` may be that folder or its parent (e.g. ``bccd/`` holding ``BCCD/``, or
    ``VOCdevkit/`` holding ``VOC2007/``, or any single child folder with the layout). Without ``root``: ``$AAL_DATA/<name>`` and
    ``$AAL_DATA``, else ``~/.cache/aal/data/<name>`` (see :func:`aal.data.base.candidate_dirs`).

    Raises:
        DataError: no candidate has the VOC layout; the message lists where it looked.
    """
    def is_voc(d: Path) -> bool:
        return (d / "Annotations").is_dir() and (d / "ImageSets" / "Main").is_dir() and (d / "JPEGImages").is_dir()

    tried = candidate_dirs(root, name, subdirs)
    for d in tried:
        if is_voc(d):
            return d
    if root is not None and Path(root).is_dir():
        # any single child folder with the layout (e.g. VOCdevkit/VOC2007 under another name)
        children = sorted(c for c in Path(root).expanduser().iterdir() if c.is_dir() and is_voc(c))
        if len(children) == 1:
            return children[0]
        if len(children) > 1:
            raise DataError(f"{root}: several VOC folders ({', '.join(c.name for c in children)}); pass one of them as root")
    raise DataError(
        f"no Pascal VOC layout (Annotations/, JPEGImages/, ImageSets/Main/) found for {name!r}; looked in: "
        + ", ".join(str(d) for d in tried)
        + ". Pass the folder as root (BCCD: the 'bccd' folder of Shenggan/BCCD_Dataset)."
    )


def read_image_set(voc_root: str | os.PathLike, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/<split>.txt`` (blank lines skipped, order kept).

    Raises:
        DataError: the file is missing or lists no id.
    """
    path = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DataError(f"{path}: image set {split!r} not found (available: {', '.join(have) or 'none'})")
    # a VOC class-wise file lists "id  1/-1"; the main split files list the id alone
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    for image_id in ids:  # ids become file names: Annotations/<id>.xml, JPEGImages/<id>.jpg
        check_relative_name(image_id, str(path))
    if not ids:
        raise DataError(f"{path}: the image set is empty")
    return ids


def read_image(path: str | os.PathLike, size: int | None) -> tuple[Tensor, tuple[int, int]]:
    """An RGB image as uint8 (3,S,S) (bilinear resize to ``size``; no resize when None) and its original (H, W).

    The file must be a regular file of at most :data:`aal.data.limits.MAX_IMAGE_FILE_BYTES`, and
    its header must declare at most :data:`aal.data.limits.MAX_IMAGE_PIXELS` pixels (checked
    before decoding).

    Raises:
        DataError: the file is missing, too large, not a readable image, or too many pixels.
    """
    path = Path(path)
    data = read_file_bounded(path, MAX_IMAGE_FILE_BYTES, "image file")
    with open_image(data, str(path)) as im:
        im = im.convert("RGB")
        orig = (im.height, im.width)
        if size is not None and (im.width, im.height) != (size, size):
            from PIL import Image

            im = im.resize((size, size), Image.BILINEAR)
        buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        t = buf.view(im.height, im.width, 3).permute(2, 0, 1).contiguous()
    return t, orig


# ----------------------------------------------------------------------------- the split
@dataclass
class DetectionSplit:
    """Detection images held in memory, with their targets.

    Attributes:
        images: uint8 (N,3,S,S).
        targets: N target dicts (normalised boxes, labels, difficult; see the module doc).
        ids: N image ids.
        orig_sizes: int64 (N,2) original (H, W) of each image.
        classes: the class names (labels index them).
    """

    images: Tensor
    targets: list[Target]
    ids: list[str]
    orig_sizes: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"DetectionSplit.images must be uint8 (N,C,H,W), got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if not (len(self.targets) == len(self.ids) == self.orig_sizes.shape[0] == n):
            raise ValueError(
                f"DetectionSplit: {n} images, {len(self.targets)} targets, {len(self.ids)} ids, "
                f"{self.orig_sizes.shape[0]} sizes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape)
        n_obj = sum(int(t["labels"].numel()) for t in self.targets)
        return f"DetectionSplit(n={len(self)}, images=uint8[{shape}], objects={n_obj}, classes={list(self.classes)})"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, n_or_indices: int | Sequence[int] | Tensor) -> "DetectionSplit":
        """The first ``n`` images, or the given indices (in that order)."""
        if isinstance(n_or_indices, bool):
            raise TypeError("subset() takes an int or indices, not a bool")
        if isinstance(n_or_indices, int):
            if n_or_indices < 0:
                raise ValueError(f"subset size must be >= 0, got {n_or_indices}")
            idx = list(range(min(n_or_indices, len(self))))
        else:
            idx = [int(i) for i in torch.as_tensor(n_or_indices, dtype=torch.int64).tolist()]
        it = torch.tensor(idx, dtype=torch.int64)
        return DetectionSplit(
            self.images.index_select(0, it), [self.targets[i] for i in idx], [self.ids[i] for i in idx],
            self.orig_sizes.index_select(0, it), self.classes,
        )  # fmt: skip

    def class_counts(self) -> Tensor:
        """Objects per class (difficult ones included), int64 (C,)."""
        labels = [t["labels"] for t in self.targets]
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        return torch.bincount(all_labels, minlength=len(self.classes))

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0,1] (for the model's Normalize layer)."""
        x = self.images.double().div(255.0).transpose(0, 1).flatten(1)
        return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def load_voc(
    root: str | os.PathLike | None,
    split: str,
    classes: Sequence[str],
    image_size: int | None = 300,
    *,
    name: str = "bccd",
    max_images: int | None = None,
    unknown_class: str = "error",
    skip_empty: bool = False,
) -> DetectionSplit:
    """Read a VOC-layout split into memory.

    Args:
        root: the VOC folder or its parent (see :func:`find_voc_root`).
        split: an image set name (``train``, ``val``, ``trainval``, ``test``).
        classes: class names; labels index this list.
        image_size: side S of the square resize (None keeps the original size, which then must
            be the same for every image).
        name: dataset name used to find default folders (``$AAL_DATA/<name>``).
        max_images: read only the first ``max_images`` ids of the split (quick runs, tests).
        unknown_class: see :func:`parse_voc_xml`.
        skip_empty: drop images that have no (non-degenerate) box left.

    Returns:
        a :class:`DetectionSplit`.

    Raises:
        DataError: missing folders or files, malformed annotations (naming the file), or an
            image whose size differs from its ``<size>`` field.
    """
    if image_size is not None and int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    voc = find_voc_root(root, name)
    ids = read_image_set(voc, split)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        ids = ids[:max_images]
    images, targets, kept, sizes = [], [], [], []
    for image_id in ids:
        ann = parse_voc_xml(voc / "Annotations" / f"{image_id}.xml", classes, unknown_class=unknown_class)
        if skip_empty and ann.labels.numel() == 0:
            continue
        img_path = voc / "JPEGImages" / f"{image_id}.jpg"
        if not img_path.is_file() and ann.filename:
            img_path = voc / "JPEGImages" / check_relative_name(ann.filename, str(ann.path))
        img, (h, w) = read_image(img_path, image_size)
        if (h, w) != (ann.height, ann.width):
            raise DataError(
                f"{img_path}: image is {w}x{h} but its annotation {ann.path} says {ann.width}x{ann.height}"
            )
        images.append(img)
        targets.append(ann.target())
        kept.append(image_id)
        sizes.append((h, w))
    if not images:
        raise DataError(f"{voc}: split {split!r} has no usable image")
    if image_size is None and len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"{voc}: images of split {split!r} differ in size; pass image_size to resize them")
    return DetectionSplit(
        torch.stack(images), targets, kept, torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2), tuple(classes)
    )


# ----------------------------------------------------------------------------- augmentation
def hflip(images: Tensor, targets: list[Target], flips: Tensor) -> tuple[Tensor, list[Target]]:
    """Flip the images where ``flips`` (B,) is True, and their normalised boxes with them.

    A normalised box ``[x1, y1, x2, y2]`` becomes ``[1 - x2, y1, 1 - x1, y2]``.
    """
    if not bool(flips.any()):
        return images, targets
    sel = flips.to(images.device).view(-1, 1, 1, 1)
    images = torch.where(sel, images.flip(-1), images)
    out = []
    for t, f in zip(targets, flips.tolist()):
        if f:
            b = t["boxes"]
            t = dict(t, boxes=torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], dim=1))
        out.append(t)
    return images, out


def photometric(
    images: Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 32 / 255,
    contrast: float = 0.5,
    saturation: float = 0.5,
    draws: Tensor | None = None,
) -> Tensor:
    """SSD-style photometric distortion of float images in [0,1], per image; boxes are unaffected.

    Each image gets a brightness shift uniform in ``[-brightness, brightness]``, a contrast
    factor and a saturation factor uniform in ``[1 - c, 1 + c]`` (SSD: 32/255, [0.5, 1.5],
    [0.5, 1.5]); the result is clipped to [0,1]. (SSD also jitters hue and shuffles channels;
    not done here.) ``draws``: the (B,3) uniform numbers to use instead of drawing them from
    ``generator`` (a process's share of a batch drawn for all processes).
    """
    b = images.shape[0]
    r = torch.rand(b, 3, generator=generator) if draws is None else draws
    r = r.to(images.device, images.dtype)
    shift = ((2 * r[:, 0] - 1) * brightness).view(b, 1, 1, 1)
    con = (1 + (2 * r[:, 1] - 1) * contrast).view(b, 1, 1, 1)
    sat = (1 + (2 * r[:, 2] - 1) * saturation).view(b, 1, 1, 1)
    x = images + shift
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * con + mean
    if x.shape[1] == 3:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * sat + grey
    return x.clamp(0.0, 1.0)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of float (B,C,H,W) images to ``size x size``; normalised boxes need no change."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def collate_detection(samples: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
    """Collate ``(image (3,S,S), target)`` pairs into ``(images (B,3,S,S), [targets])``.

    uint8 images are converted to float32 in [0,1]; float images are taken as they are.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    imgs = torch.stack([s[0] for s in samples])
    if imgs.dtype == torch.uint8:
        imgs = imgs.float().div_(255.0)
    return imgs, [dict(s[1]) for s in samples]


def _mix_seed(*parts: int) -> int:
    from aal.data.loader import _mix_seed as mix

    return mix(*parts)


@dataclass
class DetectionLoader:
    """Batches ``(images float32 (B,3,S,S) in [0,1], targets list of B dicts)`` over a :class:`DetectionSplit`.

    Order and augmentation depend only on ``(seed, epoch)`` (call :meth:`set_epoch`; each
    ``iter()`` also advances the epoch), as :class:`aal.data.BatchLoader`.

    Args:
        split: the data.
        batch_size: images per batch.
        shuffle: random order each epoch.
        drop_last: drop the last incomplete batch.
        augment: ``"none"``, ``"flip"`` (horizontal flip with p = 0.5, boxes flipped),
            ``"photometric"`` (:func:`photometric`) or ``"flip_photometric"``.
        seed: base seed of order and augmentation.
        image_size: resize batches to this size (default: the split's own size).
        device: where batches are put (targets too).
        channels_last: images in ``torch.channels_last`` memory format.
        rank, world_size: DDP sharding. ``batch_size`` is per process; batch ``b`` of all
            processes together is batch ``b`` of one process with ``batch_size * world_size``
            images, augmentation included (each global batch's random draws are made for all of
            its images, and a process takes positions ``rank, rank + world_size, ...``). Without
            ``drop_last`` the epoch is padded by wrapping to a multiple of ``world_size`` (at
            most ``world_size - 1`` images seen twice), so every process runs the same steps.
    """

    split: DetectionSplit
    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    augment: str = "none"
    seed: int = 0
    image_size: int | None = None
    device: Any = "cpu"
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.augment not in DETECTION_AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(DETECTION_AUGMENTATIONS)}; got {self.augment!r}")
        self.device = torch.device(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Steps per epoch (the same on every process)."""
        n, b = len(self.split), self.batch_size * self.world_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, list[Target]]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, list[Target]]]:
        n, w = len(self.split), self.world_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, epoch))) if self.shuffle else torch.arange(n)
        if not self.drop_last and n % w:  # pad by wrapping so that every process gets images
            order = order.repeat(-(-(n + w) // n))[: n + w - n % w]
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 0, 1))
        step = self.batch_size * w  # the global batch
        for b in range(len(self)):
            glob = order[b * step : (b + 1) * step]
            # random draws for the whole global batch, then this process's share: the same
            # augmentation whatever the number of processes
            flips = torch.rand(len(glob), generator=g) < 0.5 if "flip" in self.augment else None
            draws = torch.rand(len(glob), 3, generator=g) if "photometric" in self.augment else None
            mine = slice(self.rank, None, w)
            idx = glob[mine]
            x = self.split.images.index_select(0, idx).to(self.device).float().div_(255.0)
            targets = [self.split.targets[i] for i in idx.tolist()]
            if flips is not None:
                x, targets = hflip(x, targets, flips[mine])
            if draws is not None:
                x = photometric(x, draws=draws[mine])
            if self.image_size is not None:
                x = resize(x, self.image_size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            yield x, targets


__all__ = [
    "BCCD_CLASSES", "DETECTION_AUGMENTATIONS", "DetectionLoader", "DetectionSplit", "Target", "VOCAnnotation",
    "VOC_CLASSES", "collate_detection", "find_voc_root", "hflip", "load_voc", "parse_voc_xml", "photometric",
    "read_image", "read_image_set", "resize",
]  # fmt: skip
