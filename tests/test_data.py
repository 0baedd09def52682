"""Tests of aal.data: IDX and CIFAR readers on small files in the official layouts, the real
Fashion-MNIST (skipped when absent), splits, augmentation, the batch loader and downloads
(network mocked: these tests never go online)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

import aal.data.download as dl
from aal.data import (
    DATASETS,
    BatchLoader,
    DataError,
    Split,
    augment_batch,
    load_data,
    random_crop,
    random_hflip,
    read_cifar_pickle,
    read_idx,
    split_train_val,
)
from aal.data.idx import FASHION_MNIST_DIR
from aal.registry import UnknownNameError

# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray, gz: bool, type_code: int = 0x08) -> Path:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    data = struct.pack(">HBB", 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist_dir(d: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> tuple[np.ndarray, ...]:
    """Tiny MNIST-layout directory; image i has value (i % 250) everywhere, label i % 10."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        # mix gzip'ed and raw files: both must be accepted
        write_idx(d / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", labels, False)
        out += [images, labels]
    return tuple(out)


def write_pickle(path: Path, obj) -> None:
    # protocol 2, as the official (Python 2) files
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10_dir(parent: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    d = parent / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    all_data, all_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_pickle(d / f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": labels,
                                             b"data": data, b"filenames": [b"x.png"] * per_batch})
        all_data.append(data)
        all_labels += labels
    test = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(d / "test_batch", {b"labels": [0, 1, 2, 9], b"data": test})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(all_data), np.array(all_labels)


def make_cifar100_dir(parent: Path) -> None:
    d = parent / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", 7), ("test", 3)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(d / name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
    write_pickle(d / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})


def indexed_split(n: int, num_classes: int = 10) -> Split:
    """Split whose image i stores i in its first two pixels (to track samples through shuffles)."""
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return Split(images, torch.arange(n) % num_classes)


def ids(x: torch.Tensor) -> list[int]:
    """Sample ids stored by indexed_split, from uint8 or [0,1] float images."""
    if x.dtype != torch.uint8:
        x = (x * 255).round().to(torch.int64)
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch, tmp_path_factory):
    # a developer's $AAL_DATA or ~/.cache/aal must not change what these tests find
    monkeypatch.delenv("AAL_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "a.idx", arr, gz), expected_ndim=3)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_read_idx_big_endian_types(tmp_path):
    arr = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "i.idx", arr, False, type_code=0x0C))
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    f = np.array([0.5, -1.25], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f.idx", f, True, type_code=0x0D)), f)


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"<html>Not Found</html>" + bytes(100))
    with pytest.raises(DataError, match="bad magic number") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_wrong_ndim_names_file(tmp_path):
    p = write_idx(tmp_path / "labels", np.zeros(5, np.uint8), False)
    with pytest.raises(DataError, match="1-d array, expected 3-d") as e:
        read_idx(p, expected_ndim=3)
    assert str(p) in str(e.value)


def test_read_idx_truncated_data(tmp_path):
    p = write_idx(tmp_path / "x.idx", np.zeros((4, 28, 28), np.uint8), False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(p)
    assert str(p) in str(e.value) and "3136" in str(e.value)  # 4*28*28 bytes expected


def test_read_idx_truncated_gzip(tmp_path):
    p = write_idx(tmp_path / "x.idx.gz", np.arange(4000, dtype=np.uint8).reshape(4, 1000) % 7, True)
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        read_idx(tmp_path / "nope.gz")
    assert "nope.gz" in str(e.value)


# ----------------------------------------------------------------------------- MNIST-like loaders


@pytest.mark.parametrize("layout", ["", "MNIST/raw", "raw"])
def test_mnist_loads_from_root_or_parent(tmp_path, layout):
    tr_x, tr_y, te_x, te_y = make_mnist_dir(tmp_path / layout if layout else tmp_path, gz=layout != "raw")
    b = load_data("mnist", root=tmp_path)
    assert b.info.name == "mnist" and b.info.classes == tuple("0123456789") and b.val is None
    assert b.train.images.shape == (12, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.test.labels.dtype == torch.int64 and b.test.labels.tolist() == te_y.tolist()
    np.testing.assert_array_equal(b.train.images[:, 0].numpy(), tr_x)


def test_mnist_without_root_is_a_clear_error():
    with pytest.raises(DataError, match="no default directory"):
        load_data("mnist")


def test_mnist_from_env_var(tmp_path, monkeypatch):
    make_mnist_dir(tmp_path / "mnist")
    monkeypatch.setenv("AAL_DATA", str(tmp_path))
    assert len(load_data("mnist").test) == 5


def test_missing_files_message(tmp_path):
    make_mnist_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as e:
        load_data("mnist", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "missing t10k-labels-idx1-ubyte" in msg and "download=True" in msg


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as e:
        load_data("fashion_mnist", root=tmp_path)
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and str(tmp_path) in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_label_count_mismatch_names_files(tmp_path):
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), False)
    with pytest.raises(DataError, match="12 images but .* 3 labels"):
        load_data("mnist", root=tmp_path)


def test_label_out_of_range(tmp_path):
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10], np.uint8), False)
    with pytest.raises(DataError, match="t10k-labels.*label 10 out of range"):
        load_data("mnist", root=tmp_path)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    b = load_data("fashion_mnist")
    assert b.train.images.shape == (60000, 1, 28, 28) and b.test.images.shape == (10000, 1, 28, 28)
    assert b.train.images.dtype == torch.uint8 and b.train.labels.dtype == torch.int64
    # official Fashion-MNIST is balanced: 6000 / 1000 per class
    assert b.train.class_counts(10).tolist() == [6000] * 10
    assert b.test.class_counts(10).tolist() == [1000] * 10
    assert b.info.classes[0] == "T-shirt/top" and b.info.classes[9] == "Ankle boot"
    # the stored mean matches the data (to the 4 digits given)
    assert abs(b.train.images.float().mean().item() / 255 - b.info.mean[0]) < 5e-4


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("give_folder", [False, True])
def test_cifar10_reader(tmp_path, give_folder):
    data, labels = make_cifar10_dir(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if give_folder else tmp_path
    b = load_data("cifar10", root=root)
    assert b.info.classes[1] == "automobile" and b.info.num_classes == 10 and b.info.in_channels == 3
    assert b.train.images.shape == (15, 3, 32, 32) and b.test.images.shape == (4, 3, 32, 32)
    assert b.train.labels.tolist() == labels.tolist() and b.test.labels.tolist() == [0, 1, 2, 9]
    # official row layout: 1024 red values, 1024 green, 1024 blue, each row-major
    i, c, y, x = 7, 2, 5, 30
    assert b.train.images[i, c, y, x].item() == data[i, c * 1024 + y * 32 + x]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    make_cifar100_dir(tmp_path)
    b = load_data("cifar100", root=tmp_path, val_size=2)
    assert b.info.num_classes == 100 and b.info.classes[42] == "class42"
    assert len(b.train) == 5 and len(b.val) == 2 and len(b.test) == 3
    assert int(b.train.labels.max()) < 100


def test_cifar_corrupt_pickle_names_file(tmp_path):
    make_cifar10_dir(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="not a valid CIFAR") as e:
        load_data("cifar10", root=tmp_path)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar_pickle_protocols(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol))
    batch = read_cifar_pickle(tmp_path / "b")
    assert sorted(batch) == ["data", "labels"] and np.array_equal(batch["data"], data)


def test_cifar_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil"
    write_pickle(p, {b"data": Evil()})
    with pytest.raises(DataError, match="not allowed"):
        read_cifar_pickle(p)


def test_cifar_wrong_keys_and_missing(tmp_path):
    make_cifar100_dir(tmp_path)
    with pytest.raises(DataError) as e:
        load_data("cifar10", root=tmp_path)
    assert "data_batch_1" in str(e.value) and "cifar-10-batches-py" in str(e.value)
    # a CIFAR-10 batch where CIFAR-100 expects fine labels
    d = tmp_path / "cifar-100-python"
    write_pickle(d / "test", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="fine_labels") as e:
        load_data("cifar100", root=tmp_path)
    assert str(d / "test") in str(e.value)


# ----------------------------------------------------------------------------- registry, splits


def test_registry():
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion_mnist", "mnist"]
    with pytest.raises(UnknownNameError, match="fashion_mnist"):
        load_data("fashion-mnst")


def test_split_deterministic_disjoint_stratified():
    s = indexed_split(1000)
    tr1, va1 = split_train_val(s, val_fraction=0.1, seed=3)
    tr2, va2 = split_train_val(s, val_fraction=0.1, seed=3)
    _, va3 = split_train_val(s, val_fraction=0.1, seed=4)
    assert ids(va1.images) == ids(va2.images) and ids(tr1.images) == ids(tr2.images)
    assert ids(va1.images) != ids(va3.images)
    assert len(va1) == 100 and len(tr1) == 900
    assert set(ids(va1.images)).isdisjoint(ids(tr1.images))
    assert sorted(ids(va1.images) + ids(tr1.images)) == list(range(1000))
    assert va1.class_counts(10).tolist() == [10] * 10
    # labels travel with their images
    assert (torch.tensor(ids(tr1.images)) % 10).tolist() == tr1.labels.tolist()


def test_split_exact_size_with_uneven_classes():
    s = Split(torch.zeros(103, 1, 2, 2, dtype=torch.uint8), torch.tensor([0] * 70 + [1] * 30 + [2] * 3))
    _, va = split_train_val(s, val_size=10, seed=0)
    assert len(va) == 10 and va.class_counts(3).tolist() == [7, 3, 0]
    _, va = split_train_val(s, val_size=10, seed=0, stratified=False)
    assert len(va) == 10
    assert split_train_val(s, 0.0)[1] is None
    with pytest.raises(ValueError):
        split_train_val(s, val_fraction=1.0)
    with pytest.raises(ValueError):
        load_data("mnist", val_fraction=0.1, val_size=5)


def test_subset():
    s = indexed_split(20)
    assert ids(s.subset(5).images) == [0, 1, 2, 3, 4] and len(s.subset(100)) == 20
    sub = s.subset(torch.tensor([7, 3, -1]))
    assert ids(sub.images) == [7, 3, 19] and sub.labels.tolist() == [7, 3, 9]
    with pytest.raises(IndexError):
        s.subset([20])
    with pytest.raises(ValueError):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))  # float images


# ----------------------------------------------------------------------------- augmentation


def test_augment_shape_range_reproducible():
    x = torch.rand(16, 3, 32, 32)
    outs = [augment_batch(x, "crop_flip", 4, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert outs[0].shape == x.shape and torch.equal(outs[0], outs[1])
    assert 0.0 <= outs[0].min() and outs[0].max() <= 1.0
    other = augment_batch(x, "crop_flip", 4, torch.Generator().manual_seed(6))
    assert not torch.equal(outs[0], other)
    assert augment_batch(x, "none", 4) is x
    with pytest.raises(ValueError, match="crop_flip"):
        augment_batch(x, "cropflip")


def test_flip_really_flips():
    x = torch.randint(0, 256, (64, 2, 5, 7), dtype=torch.uint8)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0), x)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_crop_shifts_content():
    p, n = 3, 200
    x = torch.zeros(n, 1, 9, 9, dtype=torch.uint8)
    x[:, 0, 4, 4] = 255  # one bright pixel in the centre
    y = random_crop(x, p, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y.flatten(1).sum(1) == 255).all()  # the pixel stays inside
    pos = torch.nonzero(y[:, 0] == 255)[:, 1:] - 4
    assert pos.abs().max() <= p
    shifts = {tuple(s) for s in pos.tolist()}
    assert len(shifts) > 30 and (0, 0) in shifts  # many of the 49 offsets occur
    # content is translated, not resampled, and zeros come in at the border
    z = torch.arange(81, dtype=torch.uint8).view(1, 1, 9, 9).repeat(50, 1, 1, 1) + 1
    c = random_crop(z, 2, torch.Generator().manual_seed(1))
    for i in range(50):
        dy, dx = [int(v) for v in torch.nonzero(z[0, 0] == c[i, 0, 4, 4])[0] - 4]
        shifted = torch.zeros(13, 13, dtype=torch.uint8)
        shifted[2:11, 2:11] = z[0, 0]
        assert torch.equal(c[i, 0], shifted[2 + dy : 11 + dy, 2 + dx : 11 + dx])
    # crop_flip == flip(crop) with the same generator stream
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(augment_batch(z, "crop_flip", 2, g1), random_hflip(random_crop(z, 2, g2), g2))


# ----------------------------------------------------------------------------- loader


def collect(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_batches_and_conversion():
    s = indexed_split(10)
    loader = BatchLoader(s, 4)
    assert len(loader) == 3
    batches = collect(loader)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.max() <= 1.0
    assert ids(x) == [0, 1, 2, 3] and torch.equal(x, s.images[:4].float() / 255)
    assert len(BatchLoader(s, 4, drop_last=True)) == 2
    assert collect(BatchLoader(s, 4, channels_last=True))[0][0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(s, 4, augment="random")


def test_loader_set_epoch_reproducible():
    s = indexed_split(50)
    a = BatchLoader(s, 8, shuffle=True, augment="crop_flip", padding=2, seed=1)
    epochs = [collect(a) for _ in range(3)]  # iter() advances the epoch
    b = BatchLoader(s, 8, shuffle=True, augment="crop_flip", padding=2, seed=1)
    b.set_epoch(2)  # resume at epoch 2
    for (x1, y1), (x2, y2) in zip(epochs[2], collect(b)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    order0 = [y for _, ys in epochs[0] for y in ys.tolist()]
    order1 = [y for _, ys in epochs[1] for y in ys.tolist()]
    assert sorted(order0) == sorted(s.labels.tolist()) and order0 != order1
    c = BatchLoader(s, 8, shuffle=True, seed=2)
    assert c.indices(0).tolist() != a.indices(0).tolist()


def test_loader_labels_follow_images_under_shuffle():
    s = indexed_split(30, num_classes=7)
    for x, y in BatchLoader(s, 7, shuffle=True, seed=3):
        assert [i % 7 for i in ids(x)] == y.tolist()


@pytest.mark.parametrize("n,world,drop_last", [(10, 3, False), (10, 3, True), (12, 4, False), (2, 3, False)])
def test_loader_rank_shards(n, world, drop_last):
    s = indexed_split(n)
    shards = []
    for rank in range(world):
        loader = BatchLoader(s, 2, shuffle=True, seed=7, rank=rank, world_size=world, drop_last=drop_last)
        loader.set_epoch(4)
        shards.append(loader.indices().tolist())
        got = [i for x, _ in loader for i in ids(x)]
        assert got == shards[-1][: len(loader) * 2] if drop_last else got == shards[-1]
    assert len({len(sh) for sh in shards}) == 1  # equal length on every rank
    flat = [i for sh in shards for i in sh]
    if drop_last:
        assert len(set(flat)) == len(flat) == (n // world) * world  # disjoint
    else:
        assert set(flat) == set(range(n))  # every sample seen
        assert len(flat) - len(set(flat)) == len(flat) - n  # only the padding repeats


# ----------------------------------------------------------------------------- downloads (mocked)


def _no_network(*args, **kwargs):
    raise URLError("network is unreachable")


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "urlopen", _no_network)
    with pytest.raises(DataError) as e:
        load_data("mnist", root=tmp_path, download=True)
    msg = str(e.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    assert "network is unreachable" in msg
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_data("cifar10", root=tmp_path, download=True)
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())  # no partial files


def test_download_is_never_attempted_by_default(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("network touched without download=True")

    monkeypatch.setattr(dl, "urlopen", fail)
    with pytest.raises(DataError, match="not found"):
        load_data("fashion_mnist", root=tmp_path)


def test_download_checks_md5(tmp_path, monkeypatch):
    payload = b"official bytes"
    monkeypatch.setattr(dl, "urlopen", lambda url, timeout: io.BytesIO(payload))
    good = dl.Resource("f.bin", dl.hashlib.md5(payload).hexdigest(), ("http://mirror/f.bin",))
    path = dl.download_file(good, tmp_path / "d")
    assert path.read_bytes() == payload
    bad = dl.Resource("g.bin", "0" * 32, ("http://a/g.bin", "http://b/g.bin"))
    with pytest.raises(DataError, match="MD5") as e:
        dl.download_file(bad, tmp_path / "d")
    assert "http://b/g.bin" in str(e.value)  # every mirror tried
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.bin"]


def _serve(files: dict[str, bytes]):
    """Fake urlopen serving ``files`` by the URL's last path component."""

    def urlopen(url, timeout):
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise URLError(f"404 {url}")
        return io.BytesIO(files[name])

    return urlopen


def test_download_mnist_end_to_end(tmp_path, monkeypatch):
    import aal.data.idx as idx

    src = tmp_path / "src"
    make_mnist_dir(src, gz=True)
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (src / f"{stem}.gz").write_bytes(gzip.compress((src / stem).read_bytes()))
    files = {p.name: p.read_bytes() for p in src.glob("*.gz")}
    md5 = {k: dl.hashlib.md5(files[stem + ".gz"]).hexdigest() for k, stem in idx.IDX_FILES.items()}
    monkeypatch.setattr(idx, "_MNIST_MD5", md5)  # stand-ins for the official checksums
    monkeypatch.setattr(dl, "urlopen", _serve(files))
    b = load_data("mnist", download=True)  # no root: goes to ~/.cache/aal/data/mnist
    assert len(b.train) == 12 and len(b.test) == 5
    assert (Path.home() / ".cache/aal/data/mnist/t10k-images-idx3-ubyte.gz").is_file()
    monkeypatch.setattr(dl, "urlopen", _no_network)
    assert len(load_data("mnist").train) == 12  # found again without downloading


def test_download_cifar10_archive(tmp_path, monkeypatch):
    import tarfile

    import aal.data.cifar as cifar

    make_cifar10_dir(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    res = dl.Resource("cifar-10-python.tar.gz", dl.hashlib.md5(archive).hexdigest(), ("http://m/cifar-10-python.tar.gz",))
    monkeypatch.setitem(cifar._CIFAR10, "archive", res)
    monkeypatch.setattr(dl, "urlopen", _serve({res.filename: archive}))
    b = load_data("cifar10", root=tmp_path / "dst", download=True)
    assert len(b.train) == 15 and (tmp_path / "dst" / "cifar-10-batches-py" / "test_batch").is_file()
