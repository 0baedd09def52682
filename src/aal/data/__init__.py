"""Datasets from their official files, held in memory as uint8, batched in torch.

Registered datasets (:data:`DATASETS`): ``fashion_mnist`` (the embedded default, read from
``/usr/share/datasets/fashion-mnist/``: ``apt-get install -y dataset-fashion-mnist``), ``mnist``,
``cifar10``, ``cifar100``. Files are read from ``root`` (the folder or its parent), else from
``$AAL_DATA/<name>`` or ``$AAL_DATA``; downloads (MD5-checked) happen only with ``download=True``.
Problems with files raise :class:`DataError` naming the file and what was expected.

Example:
    >>> from aal.data import load_data, BatchLoader
    >>> bundle = load_data("fashion_mnist", val_fraction=0.1, seed=0)  # doctest: +SKIP
    >>> loader = BatchLoader(bundle.train, 128, shuffle=True, augment="crop_flip", padding=2)  # doctest: +SKIP
    >>> for epoch in range(2):  # doctest: +SKIP
    ...     loader.set_epoch(epoch)
    ...     for x, y in loader:  # x float32 [0,1] (128,1,28,28), y int64 (128,)
    ...         pass
"""

from aal.data.augment import AUGMENTATIONS, augment_batch, random_crop, random_hflip
from aal.data.base import (
    DATASETS,
    ENV_DATA_DIR,
    DataBundle,
    DataError,
    DatasetInfo,
    Split,
    load_data,
    split_train_val,
)

# importing these modules registers their datasets
from aal.data.cifar import read_cifar_pickle  # noqa: E402
from aal.data.idx import read_idx  # noqa: E402
from aal.data.loader import BatchLoader  # noqa: E402
from aal.data.voc import BCCD_CLASSES, VOC_CLASSES, DetectionLoader, DetectionSplit, load_voc, parse_voc_xml  # noqa: E402

__all__ = [
    "BCCD_CLASSES",
    "VOC_CLASSES",
    "DetectionLoader",
    "DetectionSplit",
    "load_voc",
    "parse_voc_xml",
    "AUGMENTATIONS",
    "BatchLoader",
    "DATASETS",
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "ENV_DATA_DIR",
    "Split",
    "augment_batch",
    "load_data",
    "random_crop",
    "random_hflip",
    "read_cifar_pickle",
    "read_idx",
    "split_train_val",
]
