"""CIFAR-10 from a zip of JPEG files: layout, labels, cache, JPEG quality, hostile zips, the real zip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import aal
from aal.data import DataError
from aal.data import cifar_jpeg
from aal.data.cifar_jpeg import jpeg_quality, read_cifar_image_zip

PIL = pytest.importorskip("PIL.Image")
REAL_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10_jpeg.zip"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _jpeg(value: int, quality: int = 75, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    PIL.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_zip(path: Path, classes=("b_cls", "a_cls", "c_cls"), n_train=2, n_test=1, quality=75, extra=()) -> Path:
    """A small zip in the public re-encoding's layout; pixel value encodes (class index, file)."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", n_train), ("test", n_test)):
            for ci, cls in enumerate(classes):
                for i in range(n):
                    zf.writestr(f"CIFAR-10-images/{split}/{cls}/{i:04d}.jpg", _jpeg(20 * ci + 5 * i + 10, quality))
        zf.writestr("CIFAR-10-images/README.txt", b"not an image")
        for name, data in extra:
            zf.writestr(name, data)
    return path


def test_labels_follow_alphabetical_folder_order_and_counts(tmp_path):
    z = write_zip(tmp_path / "c.zip")
    classes, train, test, q = read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    assert classes == ("a_cls", "b_cls", "c_cls")
    assert len(train) == 6 and len(test) == 3
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2] and test.labels.tolist() == [0, 1, 2]  # classes interleaved
    # a_cls was written second (index 1 in the writer): its pixels are ~30, b_cls' ~10
    assert abs(int(train.images[0].float().mean()) - 30) <= 2 and abs(int(train.images[1].float().mean()) - 10) <= 2
    assert q == 75


def test_decoded_once_then_served_from_the_checksummed_cache(tmp_path, monkeypatch):
    z = write_zip(tmp_path / "c.zip")
    first = read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("c-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(cifar_jpeg, "_decode_zip", boom)
    second = read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    assert torch.equal(first[1].images, second[1].images) and first[0] == second[0]
    # a different zip (different checksum) is never served from that cache
    write_zip(z, classes=("x", "y", "z"))
    with pytest.raises(AssertionError, match="decoded again"):
        read_cifar_image_zip(z, cache_dir=tmp_path / "cache")


def test_cache_location_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cifar_jpeg.ENV_CACHE_DIR, str(tmp_path / "envcache"))
    read_cifar_image_zip(write_zip(tmp_path / "c.zip"))
    assert list((tmp_path / "envcache").glob("*.npz"))


def test_damaged_cache_is_rebuilt(tmp_path):
    z = write_zip(tmp_path / "c.zip")
    read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(b"garbage")
    classes, train, _, _ = read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    assert len(train) == 6


@pytest.mark.parametrize("quality", [50, 90])
def test_jpeg_quality_is_read_from_the_quantisation_table(tmp_path, quality):
    _, _, _, q = read_cifar_image_zip(write_zip(tmp_path / "c.zip", quality=quality), cache_dir=tmp_path / "c")
    assert q == quality
    assert jpeg_quality(None) is None and jpeg_quality({0: [7] * 64}) is None  # not an IJG-scaled table


@pytest.mark.parametrize(
    "extra,match",
    [
        ((("CIFAR-10-images/train/a_cls/9999.jpg", b"not a jpeg"),), "9999.jpg: cannot decode"),
        ((("CIFAR-10-images/train/a_cls/big.jpg", _jpeg(0, size=(64, 64))),), "big.jpg: image is 64x64"),
        ((("../evil/train/a_cls/0.jpg", _jpeg(0)),), "refusing zip member"),
    ],
)
def test_bad_entries_are_one_line_errors_naming_the_entry(tmp_path, extra, match):
    z = write_zip(tmp_path / "c.zip", extra=extra)
    with pytest.raises(DataError, match=match) as err:
        read_cifar_image_zip(z, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and str(z) in str(err.value)


def test_oversized_member_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_jpeg, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(DataError, match="declares .* bytes"):
        read_cifar_image_zip(write_zip(tmp_path / "c.zip"), cache_dir=tmp_path / "cache")


def test_not_a_zip_and_mismatched_classes(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable zip"):
        read_cifar_image_zip(bad, cache_dir=tmp_path / "cache")
    z = write_zip(tmp_path / "c.zip", extra=(("CIFAR-10-images/test/zz_only_test/0.jpg", _jpeg(1)),))
    with pytest.raises(DataError, match="same class"):
        read_cifar_image_zip(z, cache_dir=tmp_path / "cache")


def test_load_data_auto_detects_the_zip_and_names_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv(cifar_jpeg.ENV_CACHE_DIR, str(tmp_path / "cache"))
    z = write_zip(tmp_path / "cifar10_jpeg.zip", classes=CIFAR10_CLASSES, n_train=1, n_test=1)
    for root in (z, tmp_path):  # the zip itself or its folder
        b = aal.load_data("cifar10", root=root)
        assert b.info.classes == CIFAR10_CLASSES and len(b.train) == 10 and len(b.test) == 10
        assert b.info.source == "CIFAR-10 (JPEG-q75 re-encoding)" and b.info.description == b.info.source
    # three classes are not CIFAR-10
    (tmp_path / "other").mkdir()
    write_zip(tmp_path / "other" / "cifar10_jpeg.zip")
    with pytest.raises(DataError, match="3 class folders"):
        aal.load_data("cifar10", root=tmp_path / "other")


def test_missing_files_error_names_both_layouts(tmp_path):
    with pytest.raises(DataError, match="cifar10_jpeg.zip"):
        aal.load_data("cifar10", root=tmp_path)


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason="the shared CIFAR-10 JPEG zip is not present")
def test_the_real_zip():
    b = aal.load_data("cifar10", root=REAL_ZIP)
    assert b.info.classes == CIFAR10_CLASSES
    assert b.info.source == "CIFAR-10 (JPEG-q75 re-encoding)"
    assert b.train.images.shape == (50000, 3, 32, 32) and b.test.images.shape == (10000, 3, 32, 32)
    assert b.train.class_counts(10).tolist() == [5000] * 10 and b.test.class_counts(10).tolist() == [1000] * 10
    # the shared README's per-channel means over all 60,000 images: 0.4917 / 0.4826 / 0.4472
    means = torch.cat([b.train.images, b.test.images]).float().mean((0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4917, 0.4826, 0.4472]), atol=2e-4)
    # classes interleaved: every prefix of the test set is balanced (the zip stores them by class)
    assert b.test.labels[:10].tolist() == list(range(10))
    assert torch.bincount(b.test.labels[:1000], minlength=10).tolist() == [100] * 10
    assert torch.bincount(b.train.labels[:500], minlength=10).tolist() == [50] * 10
