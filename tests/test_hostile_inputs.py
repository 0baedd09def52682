"""Hostile inputs (issue 15, items 2, 3, 5 (data), 7, 11): each made here, small, and refused cleanly.

CLI cases run ``python -m aal`` in a subprocess whose working directory and ``$HOME`` are a
scratch folder, and assert the exit code, a one-line ``aal: error:`` message on stderr (no
traceback), and that nothing in the repository changed. Bombs run under a memory ceiling
(``RLIMIT_AS``, :data:`MEM_CEILING`) and must end quickly: before the fixes they ran out of
memory (or for minutes); now they are refused before anything large is allocated.

The new helpers (``aal.data.limits`` etc.) are imported inside the tests, so that this file
also runs, and fails test by test, against the code before the fixes.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Address-space ceiling of the CLI subprocesses: importing torch and aal takes ~0.65 GB here.
MEM_CEILING = 2 << 30
#: A refused bomb must end within this many seconds (a torch import is ~2-5 s on a loaded machine).
QUICK_S = 45


# ----------------------------------------------------------------------------- helpers
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of the files under ``root`` (caches, .git and
    ``benchmarks/`` aside: a benchmark or study running next to the tests writes its runs and
    results there)."""
    out = {}
    scratch = root / "benchmarks"
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in (".git", "__pycache__", ".pytest_cache") and Path(d) / x != scratch]
        for f in files:
            p = Path(d) / f
            try:
                st = p.stat()
            except FileNotFoundError:  # a file vanishing mid-walk is not a change by the CLI
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _limit_memory() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CEILING, MEM_CEILING))


def run_cli(args: list[str], scratch: Path, timeout: float = 180) -> tuple[int, str, float]:
    """``(exit code, stderr, seconds)`` of ``python -m aal ARGS`` under the memory ceiling.

    Also asserts that no file of the repository changed (the scratch folder is outside it).
    """
    home = scratch / "home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
        "AAL_NO_MALLOC_TUNE": "1",
    }
    env.pop("AAL_DATA", None)
    before = _snapshot(REPO)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "aal", *args], cwd=scratch, env=env, capture_output=True, text=True,
        timeout=timeout, preexec_fn=_limit_memory,
    )
    seconds = time.perf_counter() - t0
    assert _snapshot(REPO) == before, "the CLI changed files outside the scratch folder"
    return proc.returncode, proc.stderr, seconds


def assert_one_line_error(rc: int, err: str, code: int, *needles: str) -> str:
    """The CLI ended with ``code`` and exactly one ``aal: error:`` line containing ``needles``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert rc == code, (rc, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("aal: error:"), err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _zeros_deflate(n: int) -> bytes:
    """A raw deflate stream of ``n`` zero bytes, made in milliseconds whatever ``n``.

    A 1 MiB zero block compressed from a fresh state and ended by a full flush (which resets the
    state) gives the same bytes every time, so the stream of n bytes is that block repeated,
    then the remainder with the final block.
    """
    chunk = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    q, r = divmod(n, chunk)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return block * q + c.compress(bytes(r)) + c.flush()


def png_bytes(w: int, h: int) -> bytes:
    """A valid 1-bit grey-scale PNG of ``w x h`` black pixels (the data compresses ~1000:1)."""
    n = h * (1 + (w + 7) // 8)  # each row: filter byte + packed bits, all zero
    idat = b"\x78\xda" + _zeros_deflate(n) + struct.pack(">I", ((n % 65521) << 16) | 1)  # zlib: header, adler32

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def small_png() -> bytes:
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (105, 105), 255).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, members: list[tuple[str, bytes | tuple[bytes, int]]]) -> Path:
    """A zip written by hand: ``(name, data)`` is stored; ``(name, (raw deflate, declared size))``
    is a deflated member with the given declared size (CRC 0: readers refuse it before the CRC)."""
    out, central = bytearray(), bytearray()
    for name, data in members:
        raw = name.encode()
        if isinstance(data, tuple):
            comp, size, method, crc = data[0], data[1], 8, 0
        else:
            comp, size, method, crc = data, len(data), 0, zlib.crc32(data)
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(comp), size, len(raw), 0)
        out += raw + comp
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(comp), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    cd_offset = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0)
    path.write_bytes(bytes(out))
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- item 2: YAML
def _laughs(levels: int = 9) -> str:
    """One flow-style YAML value: level i is a list of level i-1 and 8 aliases of it (9^levels ones)."""
    nested = "&l0 [1,1,1,1,1,1,1,1,1]"
    for i in range(1, levels):
        nested = f"&l{i} [{nested}, " + ", ".join([f"*l{i - 1}"] * 8) + "]"
    return nested


def test_cli_yaml_billion_laughs_in_config_is_refused_quickly(tmp_path):
    # 9^9 = 387 million numbers once expanded, from ~1 KB; as `seed` it reached the validation
    # message, which rendered all of it (~100 s and 6 GB before a MemoryError)
    cfg = write_config(tmp_path / "laughs.yaml", f"seed: {_laughs()}\n")
    assert cfg.stat().st_size < 2048
    rc, err, secs = run_cli(["train", str(cfg), f"out_dir={tmp_path / 'runs'}"], tmp_path)
    assert_one_line_error(rc, err, 2, str(cfg), "alias")
    assert secs < QUICK_S
    assert not (tmp_path / "runs").exists()


def test_cli_yaml_billion_laughs_in_override_is_refused(tmp_path):
    rc, err, secs = run_cli(
        ["train", str(REPO / "configs/fashion_mnist/pgd_at.yaml"), f"method.eps={_laughs()}", f"out_dir={tmp_path / 'runs'}"],
        tmp_path,
    )
    assert_one_line_error(rc, err, 2, "method.eps", "alias")
    assert secs < QUICK_S


def test_cli_config_error_echoes_a_capped_value(tmp_path):
    # no alias: a genuinely large value (60 KB); the message must not echo all of it
    cfg = write_config(tmp_path / "big.yaml", "seed: [" + ", ".join(["123456"] * 8000) + "]\n")
    rc, err, _ = run_cli(["train", str(cfg)], tmp_path)
    line = assert_one_line_error(rc, err, 2, "seed")
    assert len(line) < 400, len(line)


@pytest.mark.parametrize(
    "text, where",
    [("seed: 1\nepochs: [1, 2\nfoo: 3\n", ":3:4:"), ("seed: 1\n  epochs: 2\n", ":2:9:"), ("a: 'open\n", ":2:1:")],
)
def test_cli_yaml_syntax_error_is_one_line_with_position(tmp_path, text, where):
    cfg = write_config(tmp_path / "bad.yaml", text)
    rc, err, _ = run_cli(["train", str(cfg)], tmp_path)
    assert_one_line_error(rc, err, 2, f"{cfg}{where}")


def test_yaml_loader_refuses_aliases_and_caps_echoes(tmp_path):
    from aal.config import ConfigError, MAX_ECHO, load_config, parse_yaml, short

    with pytest.raises(ConfigError, match=r"c\.yaml:2:4: alias \*x is not allowed"):
        parse_yaml("a: &x [1]\nb: *x\n", "c.yaml")
    assert parse_yaml("a: &x 1\n") == {"a": 1}  # an anchor alone is harmless
    assert len(short("x" * 10**6)) <= MAX_ECHO and len(short([[list(range(10**4))] * 100] * 100)) <= MAX_ECHO
    p = write_config(tmp_path / "deep.yaml", "[" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=" + "x" * 100_000])
    assert len(str(e.value)) < 1000


def test_task_loaders_read_yaml_without_aliases(tmp_path):
    from aal.config import ConfigError
    from aal.tasks.detection import load_detection_config
    from aal.tasks.fewshot import load_fewshot_config

    for task, load in (("fewshot", load_fewshot_config), ("detection", load_detection_config)):
        p = write_config(tmp_path / f"{task}.yaml", f"task: {task}\nx: &a 1\nseed: *a\n")
        with pytest.raises(ConfigError, match="alias"):
            load(p)


# ----------------------------------------------------------------------------- item 3: zip bombs, names
def _omniglot_config(tmp_path: Path, root: Path) -> Path:
    return write_config(tmp_path / "omni.yaml", f"""task: fewshot
epochs: 1
out_dir: {tmp_path / 'runs'}
data: {{name: omniglot, root: {root}, options: {{background: bg, evaluation: null, runs: false}},
        n_way: 2, k_shot: 1, n_query: 1, episodes: 1}}
eval: {{n_way: 2, shots: [1], n_query: 1, episodes: 1, epoch_episodes: 0, runs: false}}
model: {{name: resnet12}}
method: {{name: protonet}}
""")


def test_cli_omniglot_zip_bomb_is_refused_before_reading(tmp_path):
    root = tmp_path / "omni"
    root.mkdir()
    png = small_png()
    # 3 GiB of zeros declared (and really there: 3 MB of deflate), above the memory ceiling
    members = [(f"bg/Greek/character0{i}/0{i}_01.png", png) for i in (1, 2)]
    members.append(("bg/Greek/character03/bomb.png", (_zeros_deflate(3 << 30), 3 << 30)))
    write_zip(root / "bg.zip", members)
    rc, err, secs = run_cli(["train", str(_omniglot_config(tmp_path, root))], tmp_path)
    assert_one_line_error(rc, err, 1, "bg.zip", "bomb.png", "limit")
    assert secs < QUICK_S


def _read_zip(tmp_path, members, **kw):
    from aal.data.fewshot import read_omniglot_zip

    return read_omniglot_zip(write_zip(tmp_path / "x.zip", members), **kw)


@pytest.mark.parametrize(
    "name",
    ["bg/../Greek/character01/a.png", "../../Greek/character01/a.png", "/abs/Greek/character01/a.png",
     "bg/Gr\\eek/character01/a.png", "C:/Greek/character01/a.png"],
)
def test_omniglot_unsafe_member_names_are_refused(tmp_path, name):
    from aal.data import DataError

    members = [("bg/Greek/character01/ok.png", small_png()), (name, small_png())]
    with pytest.raises(DataError, match="unsafe member name"):
        _read_zip(tmp_path, members)


def test_omniglot_member_compression_ratio_is_checked(tmp_path):
    from aal.data import DataError

    # 8 MiB declared: under the size limit, but ~1000:1 (images are already compressed: ~1:1)
    members = [("bg/Greek/character01/a.png", small_png()),
               ("bg/Greek/character01/b.png", (_zeros_deflate(8 << 20), 8 << 20))]
    with pytest.raises(DataError, match="compression ratio"):
        _read_zip(tmp_path, members)


def test_omniglot_member_size_lie_is_caught(tmp_path):
    from aal.data import DataError

    # a member that declares fewer bytes than its deflate stream holds: zipfile stops at the
    # declared size, the CRC (0 here) or our length check refuses it, as a DataError either way
    members = [("bg/Greek/character01/a.png", (_zeros_deflate(4096), 100))]
    with pytest.raises(DataError):
        _read_zip(tmp_path, members)


def test_omniglot_pixel_bomb_is_refused_from_the_header(tmp_path):
    from aal.data import DataError

    # 20000 x 20000 = 400 M pixels in a 48 KB PNG: Pillow's DecompressionBombError used to escape
    members = [("bg/Greek/character01/a.png", png_bytes(20000, 20000))]
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="a.png.*pixel"):
        _read_zip(tmp_path, members)
    assert time.perf_counter() - t0 < 5


def test_omniglot_mixed_image_sizes_are_a_data_error(tmp_path):
    from aal.data import DataError

    members = [("bg/Greek/character01/a.png", small_png()), ("bg/Greek/character01/b.png", png_bytes(50, 40))]
    with pytest.raises(DataError, match="different sizes"):
        _read_zip(tmp_path, members, image_size=None)


def test_fewshot_csv_file_names_must_stay_in_the_images_folder(tmp_path):
    from aal.data import DataError
    from aal.data.fewshot import read_csv_split

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(small_png())
    (tmp_path / "train.csv").write_text("filename,label\n../secret.png,n01\n")
    with pytest.raises(DataError, match="unsafe member name"):
        read_csv_split(tmp_path, "train", image_size=28)


# ----------------------------------------------------------------------------- item 5 (data): VOC images, IDX headers
def _voc(root: Path, image: bytes, w: int, h: int, filename: str = "a.jpg", image_id: str = "a") -> Path:
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        "<object><name>RBC</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"
    )
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(image_id + "\n")
    (root / "JPEGImages" / "a.jpg").write_bytes(image)
    return root


def test_cli_voc_decompression_bomb_is_a_one_line_data_error(tmp_path):
    voc = _voc(tmp_path / "voc", png_bytes(20000, 20000), 20000, 20000)
    cfg = write_config(tmp_path / "det.yaml", f"""task: detection
epochs: 1
out_dir: {tmp_path / 'runs'}
data: {{name: bccd, root: {voc}, image_size: 64, batch_size: 2}}
model: {{name: ssd_resnet18}}
method: {{name: detection}}
""")
    rc, err, secs = run_cli(["train", str(cfg)], tmp_path)
    assert_one_line_error(rc, err, 1, "a.jpg", "pixel")
    assert secs < QUICK_S


def test_voc_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    from aal.data import DataError
    from aal.data.voc import read_image

    # 9000 x 9000 = 81 M pixels: under Pillow's own bomb limit (it would decode 243 MB of RGB),
    # over aal's 64 M pixel limit (aal.data.limits.MAX_IMAGE_PIXELS)
    p = tmp_path / "big.jpg"
    p.write_bytes(png_bytes(9000, 9000))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="big.jpg.*9000x9000.*pixel limit"):
        read_image(p, 64)
    assert time.perf_counter() - t0 < 2


def test_voc_file_names_from_image_sets_and_annotations_are_validated(tmp_path):
    from aal.data import DataError
    from aal.data.voc import load_voc

    voc = _voc(tmp_path / "v1", small_png(), 105, 105, image_id="../../v1/Annotations/a")
    with pytest.raises(DataError, match="unsafe member name"):
        load_voc(voc, "train", ["RBC"])
    outside = tmp_path / "outside.png"
    outside.write_bytes(small_png())
    voc = _voc(tmp_path / "v2", small_png(), 105, 105, filename=str(outside), image_id="b")
    (voc / "Annotations" / "a.xml").rename(voc / "Annotations" / "b.xml")
    with pytest.raises(DataError, match="unsafe member name"):
        load_voc(voc, "train", ["RBC"])


def test_voc_image_that_is_not_a_regular_file_is_refused(tmp_path):
    from aal.data import DataError
    from aal.data.voc import read_image

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(DataError, match="not a regular file"):
        read_image(fifo, 64)


def _idx_header(dims: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def test_cli_idx_dimension_overflow_is_a_one_line_data_error(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    # 2^22 cubed = 2^66 elements: numpy's int64 product wraps to 0, which "matched" an empty file
    (root / "train-images-idx3-ubyte").write_bytes(_idx_header((1 << 22,) * 3))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx_header((2, 28, 28)) + bytes(2 * 784))
    for f in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (root / f).write_bytes(_idx_header((2,)) + bytes(2))
    rc, err, secs = run_cli(
        ["train", str(REPO / "configs/fashion_mnist/pgd_at.yaml"), "data.name=mnist", f"data.root={root}",
         f"out_dir={tmp_path / 'runs'}", "epochs=1"],
        tmp_path,
    )
    assert_one_line_error(rc, err, 1, "train-images-idx3-ubyte", "limit")
    assert secs < QUICK_S


def test_idx_headers_larger_than_the_data_or_the_limit(tmp_path):
    import gzip

    from aal.data import DataError, read_idx

    p = tmp_path / "wrap.idx"
    p.write_bytes(_idx_header((1 << 16,) * 4))  # 2^64: wraps to exactly 0 in int64
    with pytest.raises(DataError, match="limit"):
        read_idx(p)
    # a 1 MB gzip expanding to 2 GiB: refused from its header, before decompressing the data
    g = tmp_path / "bomb.idx.gz"
    with open(g, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as z:
        z.write(_idx_header((1 << 31,), 0x08))
        z.write(bytes(1 << 16))  # the data need not be there: the header alone is refused
    with pytest.raises(DataError, match="limit"):
        read_idx(g)
    # a header declaring more than a raw file holds: refused before any copy
    t = tmp_path / "short.idx"
    t.write_bytes(_idx_header((1000, 28, 28)) + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx(t)


# ----------------------------------------------------------------------------- item 7: attack and evaluation inputs
@pytest.fixture(scope="module")
def cnn():
    import aal

    torch.manual_seed(0)
    return aal.create_model("small_cnn").eval()


@pytest.mark.parametrize("spec", ["fgsm", "pgd5", "apgd_ce5", "square10"])
@pytest.mark.parametrize("bad", ["nan", "inf", "255", "negative"])
def test_attacks_refuse_non_finite_or_out_of_range_images(cnn, spec, bad):
    from aal.attacks import from_spec

    x = torch.rand(4, 1, 28, 28)
    if bad == "nan":
        x[0, 0, 3, 3] = float("nan")
    elif bad == "inf":
        x[1, 0, 0, 0] = float("inf")
    elif bad == "255":
        x = x * 255
    else:
        x = x - 0.5
    y = torch.arange(4)
    with pytest.raises(ValueError, match="NaN|infinite|must lie in \\[0,1\\]"):
        from_spec(spec, 0.1, seed=0)(cnn, x, y)


def test_attacks_refuse_a_channel_count_the_model_does_not_take():
    import aal
    from aal.attacks import PGD

    model = aal.create_model("resnet18", num_classes=10, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="1 channels.*expects 3"):
        PGD(eps=0.03, steps=1)(model.eval(), torch.rand(2, 1, 32, 32), torch.tensor([0, 1]))


def test_attacks_accept_valid_images_at_the_edges(cnn):
    from aal.attacks import FGSM

    x = torch.rand(4, 1, 28, 28)
    x[0], x[1] = 0.0, 1.0
    x[2, 0, 0, 0] = 1.0 + 5e-6  # rounding slack of computed images
    x_adv = FGSM(eps=0.1)(cnn, x, torch.arange(4))
    assert bool(((x_adv - x).abs() <= 0.1 + 1e-5).all())


def test_evaluate_refuses_nan_and_wrong_range_images(cnn):
    from aal.eval import evaluate

    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    xn = x.clone()
    xn[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(cnn, (xn, y), attacks=["clean"])  # before: NaN logits argmax to class 0, "robust"
    with pytest.raises(ValueError, match="must lie in \\[0,1\\]"):
        evaluate(cnn, (x * 255, y), attacks=["fgsm"], eps=0.1)
    with pytest.raises(ValueError, match="3 channels.*expects 1"):
        evaluate(cnn, (torch.rand(8, 3, 28, 28), y), attacks=["clean"])
    with pytest.raises(ValueError, match="3 channels.*expects 1"):  # uint8 data: channels checked too
        evaluate(cnn, (torch.zeros(8, 3, 28, 28, dtype=torch.uint8), y), attacks=["clean"])
    assert evaluate(cnn, (x, y), attacks=["clean"]).n == 8


# ----------------------------------------------------------------------------- item 11: detection metric and NMS
def test_iou_exactly_at_the_threshold_is_a_true_positive():
    from aal.tasks.detection_metrics import DetectionMAP

    metric = DetectionMAP(num_classes=1)
    # IoU([0,0,10,10], [0,0,10,5]) = 50 / 100 = 0.5 exactly
    metric.update(
        [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 5.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}],
        [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}],
    )
    assert metric.compute().map == pytest.approx(1.0)


def test_nms_max_keep_zero_keeps_nothing():
    from aal.models.ssd import batched_nms, nms

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5, max_keep=0).numel() == 0
    assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5, max_keep=0).numel() == 0
    assert nms(boxes, scores, 0.5, max_keep=1).tolist() == [0]
    with pytest.raises(ValueError, match="max_keep"):
        nms(boxes, scores, 0.5, max_keep=-1)


def test_batched_nms_is_exact_with_large_coordinates():
    from aal.models.ssd import batched_nms, nms

    # label 5 holds two small boxes with IoU 0.43 (both kept at 0.5); a 3e6-pixel box of label 0
    # makes the per-label shift ~1.5e7, where float32 rounds to 1-2 px and made their IoU 0.67
    boxes = torch.tensor([[0.0, 0.0, 3e6, 3e6], [0.0, 0.0, 2.5, 1.0], [1.0, 0.0, 3.5, 1.0]])
    labels = torch.tensor([0, 5, 5])
    scores = torch.tensor([0.9, 0.8, 0.7])
    per_label = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        per_label += idx[nms(boxes[idx], scores[idx], 0.5)].tolist()
    assert sorted(per_label) == [0, 1, 2]
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == sorted(per_label)
    rng = np.random.default_rng(0)  # and a random case against the per-label loop
    xy = torch.from_numpy(rng.uniform(0, 1e5, (200, 2))).float()
    wh = torch.from_numpy(rng.uniform(1, 20, (200, 2))).float()
    b = torch.cat([xy, xy + wh], 1)
    lab, sc = torch.from_numpy(rng.integers(0, 30, 200)), torch.from_numpy(rng.uniform(0, 1, 200)).float()
    ref = []
    for c in lab.unique():
        idx = (lab == c).nonzero().flatten()
        ref += idx[nms(b[idx], sc[idx], 0.3)].tolist()
    assert sorted(batched_nms(b, sc, lab, 0.3).tolist()) == sorted(ref)
