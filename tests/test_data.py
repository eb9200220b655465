"""Tests of the data readers (ncguard.data), image decoding (ncguard.images) and `ncguard data`."""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ncguard import data as ncdata
from ncguard.data import Dataset, iter_batches, load_dataset, read_idx
from ncguard.data import test_split_of as split_of  # renamed so pytest does not collect it
from ncguard.errors import ConfigError, DataError, NcguardError
from ncguard.images import decode_image, image_info

from tests.image_bytes import png_bytes

REPO = Path(__file__).resolve().parents[1]
SYSTEM_FASHION = Path(ncdata.FASHION_MNIST_SYSTEM_DIR)
HAVE_FASHION = (SYSTEM_FASHION / "train-images-idx3-ubyte.gz").is_file() and (
    SYSTEM_FASHION / "t10k-labels-idx1-ubyte.gz"
).is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION,
    reason=f"Fashion-MNIST not installed in {SYSTEM_FASHION} (apt-get install dataset-fashion-mnist)",
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


# --- helpers that write test fixtures ----------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of `array`, written from the format description (not with ncguard code)."""
    code = IDX_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- Dataset and iter_batches ---------------------------------------------------------------------------
def small_dataset(n: int = 10) -> Dataset:
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    y = np.arange(n, dtype=np.int64) % 3
    return Dataset(x=x, y=y, classes=("a", "b", "c"), name="small", input_scale=1.0)


def test_dataset_shape_len_and_counts():
    ds = small_dataset(10)
    assert len(ds) == 10
    assert ds.input_shape == (2, 3)
    assert ds.class_counts().tolist() == [int(np.sum(ds.y == c)) for c in range(3)]


def test_subset_by_mask_and_by_index():
    ds = small_dataset(10)
    mask = ds.y == 1
    by_mask = ds.subset(mask)
    assert len(by_mask) == int(mask.sum())
    np.testing.assert_array_equal(by_mask.x, ds.x[mask])
    assert (by_mask.y == 1).all()
    assert by_mask.classes == ds.classes and by_mask.input_scale == ds.input_scale

    by_index = ds.subset([7, 2, 2])
    np.testing.assert_array_equal(by_index.y, ds.y[[7, 2, 2]])
    np.testing.assert_array_equal(by_index.x[0], ds.x[7])
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0


@pytest.mark.parametrize("bad", [np.ones(3, dtype=bool), [0, 10], [-11], [0.5, 1.0]])
def test_subset_rejects_bad_selections(bad):
    with pytest.raises(DataError):
        small_dataset(10).subset(bad)


@given(n=st.integers(0, 500), batch_size=st.integers(1, 64))
def test_iter_batches_cover_range_once(n, batch_size):
    slices = list(iter_batches(n, batch_size))
    covered = [i for s in slices for i in range(n)[s]]
    assert covered == list(range(n))
    assert all(0 < s.stop - s.start <= batch_size for s in slices)
    assert len(slices) == math.ceil(n / batch_size)


@pytest.mark.parametrize("n, batch_size", [(10, 0), (10, -1), (-1, 5)])
def test_iter_batches_rejects_bad_arguments(n, batch_size):
    with pytest.raises(ConfigError):
        list(iter_batches(n, batch_size))


# --- IDX ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("dtype", list(IDX_CODES), ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 2, 6), (2, 1, 3, 2)])
def test_read_idx_round_trip(tmp_path, rng, compress, dtype, shape):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.normal(size=shape).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, compress)
    read = read_idx(path)
    assert read.dtype == np.dtype(dtype)
    assert read.dtype.isnative
    assert read.shape == shape
    np.testing.assert_array_equal(read, array)
    read[...] = 0  # the result is a writable copy


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    plain_named_gz = write_idx(tmp_path / "plain.gz", array, compress=False)
    gzip_without_suffix = write_idx(tmp_path / "packed", array, compress=True)
    np.testing.assert_array_equal(read_idx(plain_named_gz), array)
    np.testing.assert_array_equal(read_idx(str(gzip_without_suffix)), array)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_read_idx_truncated_data(tmp_path, compress):
    payload = idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10))[:-7]
    path = tmp_path / "t.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_extra_bytes(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 2), dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="extra bytes"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "h.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8))[:9])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize(
    "payload",
    [b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", b"PK\x03\x04 not idx", b"\x00\x00"],
    ids=["nonzero-lead", "unknown-type", "zip", "too-short"],
)
def test_read_idx_bad_magic(tmp_path, payload):
    path = tmp_path / "m.idx"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("cut", [20, -5], ids=["cut-stream", "cut-trailer"])
def test_read_idx_gzip_garbage(tmp_path, rng, cut):
    packed = gzip.compress(idx_bytes(rng.integers(0, 256, size=(50, 50)).astype(np.uint8)))
    path = tmp_path / "g.idx.gz"
    path.write_bytes(packed[:cut])
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


def test_read_idx_gzip_magic_then_garbage(tmp_path):
    path = tmp_path / "junk.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope.idx")


# --- Fashion-MNIST -------------------------------------------------------------------------------------
@needs_fashion
@pytest.mark.parametrize("spec, n", [("fashion-mnist", 60000), ("fashion-mnist:train", 60000), ("fashion-mnist:test", 10000)])
def test_real_fashion_mnist(monkeypatch, spec, n):
    monkeypatch.delenv(ncdata.DATA_DIR_ENV, raising=False)
    ds = load_dataset(spec)
    assert len(ds) == n and ds.x.shape == (n, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and ds.y.shape == (n,)
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.99
    assert ds.classes == ncdata.FASHION_MNIST_CLASSES and len(ds.classes) == 10
    # Fashion-MNIST is balanced: every class has n / 10 samples.
    assert ds.class_counts().tolist() == [n // 10] * 10
    assert ds.input_scale == 255.0
    assert ds.name == spec if ":" in spec else ds.name == f"{spec}:train"
    # Pixels are exactly the bytes / 255.
    raw = read_idx(SYSTEM_FASHION / ("train-images-idx3-ubyte.gz" if n == 60000 else "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(ds.x[:50, 0] * np.float32(255), raw[:50].astype(np.float32))


def fake_fashion(folder: Path, rng, n_train=12, n_test=5, compress=True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        image_stem, label_stem = ncdata._FASHION_MNIST_FILES[split]
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{image_stem}{suffix}", images, compress)
        write_idx(folder / f"{label_stem}{suffix}", labels, compress)
        made[split] = images, labels
    return made


@pytest.mark.parametrize("layout", ["direct", "subfolder"])
@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_fashion_mnist_from_ncguard_data(tmp_path, monkeypatch, rng, layout, compress):
    folder = tmp_path if layout == "direct" else tmp_path / "fashion-mnist"
    made = fake_fashion(folder, rng, compress=compress)
    monkeypatch.setenv(ncdata.DATA_DIR_ENV, str(tmp_path))
    for split in ("train", "test"):
        ds = load_dataset(f"fashion-mnist:{split}")
        images, labels = made[split]
        assert ds.x.shape == (len(images), 1, 28, 28)
        np.testing.assert_array_equal(ds.x[:, 0] * np.float32(255), images.astype(np.float32))
        np.testing.assert_array_equal(ds.y, labels.astype(np.int64))


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv(ncdata.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist:test")
    message = str(err.value)
    assert str(tmp_path) in message and str(tmp_path / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and ncdata.DATA_DIR_ENV in message


def test_fashion_mnist_default_folder_named_in_error(monkeypatch):
    monkeypatch.delenv(ncdata.DATA_DIR_ENV, raising=False)
    assert ncdata.fashion_mnist_dirs() == [SYSTEM_FASHION]


def test_fashion_mnist_wrong_image_shape(tmp_path, monkeypatch, rng):
    fake_fashion(tmp_path, rng)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 27), dtype=np.uint8), True)
    monkeypatch.setenv(ncdata.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="28, 28"):
        load_dataset("fashion-mnist")


def test_fashion_mnist_label_count_mismatch(tmp_path, monkeypatch, rng):
    fake_fashion(tmp_path, rng)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8), True)
    monkeypatch.setenv(ncdata.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="5 samples but y has 4"):
        load_dataset("fashion-mnist:test")


def test_fashion_mnist_label_out_of_range(tmp_path, monkeypatch, rng):
    fake_fashion(tmp_path, rng)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], dtype=np.uint8), True)
    monkeypatch.setenv(ncdata.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="out of range"):
        load_dataset("fashion-mnist:test")


# --- digits ------------------------------------------------------------------------------------------
def test_digits_split_sizes_and_content():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    n = len(bunch.target)
    assert len(train) + len(test) == n
    assert len(test) == math.ceil(n * ncdata.DIGITS_TEST_FRACTION)
    for ds in (train, test):
        assert ds.x.dtype == np.float32 and ds.x.shape[1:] == (1, 8, 8) and ds.y.dtype == np.int64
        assert 0.0 <= ds.x.min() and ds.x.max() == 1.0
        assert ds.classes == tuple(str(d) for d in range(10)) and ds.input_scale == 16.0
    rows = ncdata.digits_split_indices()
    assert not set(rows["train"]) & set(rows["test"])
    assert sorted([*rows["train"], *rows["test"]]) == list(range(n))
    np.testing.assert_array_equal(test.x[:, 0] * 16, bunch.images[rows["test"]])
    np.testing.assert_array_equal(train.y, bunch.target[rows["train"]])


def test_bare_digits_is_train_split():
    bare, train = load_dataset("digits"), load_dataset("digits:train")
    assert bare.name == train.name == "digits:train"
    np.testing.assert_array_equal(bare.x, train.x)
    np.testing.assert_array_equal(bare.y, train.y)


def test_digits_split_is_deterministic_and_the_documented_one():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    first, second = load_dataset("digits:test"), load_dataset("digits:test")
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)
    y = load_digits().target
    _, expected_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    np.testing.assert_array_equal(ncdata.digits_split_indices()["test"], np.sort(expected_test))


def test_digits_split_is_stratified():
    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    total = train.class_counts() + test.class_counts()
    # Each class keeps its share: the test count is within one sample of 25% of the class.
    assert np.all(np.abs(test.class_counts() - total * ncdata.DIGITS_TEST_FRACTION) <= 1)


# --- SPECs and split suffixes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fashion-mnist", "fashion-mnist:test"),
        ("fashion-mnist:train", "fashion-mnist:test"),
        ("digits", "digits:test"),
        ("digits:train", "digits:test"),
        ("digits:test", None),
        ("data.npz", None),
        ("some/folder", None),
    ],
)
def test_test_split_of(spec, expected):
    assert split_of(spec) == expected


@pytest.mark.parametrize("spec", ["digits:val", "fashion-mnist:validation", "digits:"])
def test_unknown_split_suffix(spec):
    with pytest.raises(DataError, match="splits train and test"):
        load_dataset(spec)
    with pytest.raises(DataError, match="splits train and test"):
        split_of(spec)


def test_unknown_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="unknown data SPEC 'mnist'"):
        load_dataset("mnist")


@pytest.mark.parametrize("spec", ["missing.npz", "no/such/folder"])
def test_missing_path(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(spec)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("1,2\n")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(path))


# --- npz ---------------------------------------------------------------------------------------------
def test_npz_with_classes(tmp_path, rng):
    x = rng.normal(size=(20, 5))
    y = rng.integers(0, 3, size=20)
    path = write_npz(tmp_path / "d.npz", x=x, y=y, classes=np.array(["cat", "dog", "eel"]))
    ds = load_dataset(str(path))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)
    assert ds.classes == ("cat", "dog", "eel") and ds.input_scale == 1.0 and ds.input_shape == (5,)
    assert ds.name == str(path)


def test_npz_without_classes_and_integer_inputs(tmp_path):
    x = np.arange(24, dtype=np.int16).reshape(4, 2, 3)
    path = write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 4, 1, 4]))
    ds = load_dataset(path)
    assert ds.classes == ("0", "1", "2", "3", "4")
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.input_shape == (2, 3)


def test_npz_accepts_whole_number_float_labels(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0.0, 2.0, 1.0]))
    np.testing.assert_array_equal(load_dataset(str(path)).y, [0, 2, 1])


NPZ_ERRORS = {
    "no-x": (dict(y=np.zeros(3, dtype=int)), "missing array x"),
    "no-y": (dict(x=np.zeros((3, 2))), "missing array y"),
    "length-mismatch": (dict(x=np.zeros((3, 2)), y=np.zeros(4, dtype=int)), "3 samples but y has 4"),
    "y-2d": (dict(x=np.zeros((3, 2)), y=np.zeros((3, 1), dtype=int)), "1-D"),
    "x-rank-1": (dict(x=np.zeros(3), y=np.zeros(3, dtype=int)), "at least 2 dimensions"),
    "x-nan": (dict(x=np.array([[0.0, np.nan], [1.0, 2.0]]), y=np.zeros(2, dtype=int)), "non-finite"),
    "x-inf": (dict(x=np.array([[0.0, np.inf], [1.0, 2.0]]), y=np.zeros(2, dtype=int)), "non-finite"),
    "x-overflows-float32": (dict(x=np.array([[1e300], [0.0]]), y=np.zeros(2, dtype=int)), "non-finite"),
    "x-strings": (dict(x=np.array([["a"], ["b"]]), y=np.zeros(2, dtype=int)), "numeric"),
    "x-empty": (dict(x=np.zeros((0, 2)), y=np.zeros(0, dtype=int)), "no samples"),
    "negative-label": (dict(x=np.zeros((2, 2)), y=np.array([0, -1])), ">= 0"),
    "label-beyond-classes": (dict(x=np.zeros((2, 2)), y=np.array([0, 2]), classes=np.array(["a", "b"])), "out of range"),
    "fractional-label": (dict(x=np.zeros((2, 2)), y=np.array([0.0, 0.5])), "integers"),
    "string-labels": (dict(x=np.zeros((2, 2)), y=np.array(["a", "b"])), "integers"),
    "duplicate-classes": (dict(x=np.zeros((2, 2)), y=np.array([0, 1]), classes=np.array(["a", "a"])), "unique"),
    "numeric-classes": (dict(x=np.zeros((2, 2)), y=np.array([0, 1]), classes=np.array([0, 1])), "strings"),
}


@pytest.mark.parametrize("arrays, message", list(NPZ_ERRORS.values()), ids=list(NPZ_ERRORS))
def test_npz_errors(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_npz_object_array_is_not_unpickled(tmp_path):
    path = write_npz(tmp_path / "obj.npz", x=np.array([[1.0], [2.0]]), y=np.array([0, 1], dtype=object))
    with pytest.raises(DataError, match="unpickling"):
        load_dataset(str(path))


@pytest.mark.parametrize("content", [b"this is not a zip file", b"PK\x03\x04" + b"\x00" * 40], ids=["text", "broken-zip"])
def test_npz_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="corrupt.npz"):
        load_dataset(str(path))


def test_npz_truncated_archive(tmp_path, rng):
    good = write_npz(tmp_path / "good.npz", x=rng.normal(size=(100, 10)), y=np.zeros(100, dtype=int))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(DataError, match="cut.npz"):
        load_dataset(str(cut))


def test_npy_renamed_to_npz(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 2)))
    with pytest.raises(DataError, match="single array"):
        load_dataset(str(path))


def test_npz_split_suffix_is_refused(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="split suffix"):
        load_dataset(f"{path}:train")


# --- images ------------------------------------------------------------------------------------------
def test_decode_png_gray_and_rgb_exact(rng):
    gray = rng.integers(0, 256, size=(5, 7)).astype(np.uint8)
    rgb = rng.integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    decoded_gray = decode_image(png_bytes(gray), channels=1, size=(5, 7))
    decoded_rgb = decode_image(png_bytes(rgb), channels=3, size=(5, 7))
    assert decoded_gray.dtype == np.float32 and decoded_gray.shape == (1, 5, 7)
    assert decoded_rgb.shape == (3, 5, 7)
    np.testing.assert_array_equal(decoded_gray[0] * np.float32(255), gray.astype(np.float32))
    np.testing.assert_array_equal(np.moveaxis(decoded_rgb, 0, -1) * np.float32(255), rgb.astype(np.float32))


def test_decode_jpeg_close_to_original(rng):
    smooth = np.tile(np.linspace(0, 255, 32), (32, 1))
    rgb = np.stack([smooth, smooth.T, 255 - smooth], axis=-1).astype(np.uint8)
    decoded = decode_image(png_bytes(rgb, "JPEG", quality=95), channels=3, size=(32, 32))
    assert decoded.shape == (3, 32, 32) and decoded.dtype == np.float32
    assert np.abs(np.moveaxis(decoded, 0, -1) - rgb / 255.0).mean() < 0.02


def test_decode_from_path_equals_from_bytes(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(6, 6, 3)).astype(np.uint8)
    payload = png_bytes(pixels)
    path = tmp_path / "p.png"
    path.write_bytes(payload)
    from_bytes = decode_image(payload, channels=3, size=(6, 6))
    np.testing.assert_array_equal(decode_image(path, channels=3, size=(6, 6)), from_bytes)
    np.testing.assert_array_equal(decode_image(str(path), channels=3, size=(6, 6)), from_bytes)


def test_rgb_to_grayscale_uses_luma(rng):
    rgb = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    decoded = decode_image(png_bytes(rgb), channels=1, size=(4, 4))
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what Pillow's "L" conversion uses
    assert decoded.shape == (1, 4, 4)
    assert np.abs(decoded[0] * 255 - luma).max() <= 1.0


def test_grayscale_to_rgb_repeats_the_channel(rng):
    gray = rng.integers(0, 256, size=(3, 5)).astype(np.uint8)
    decoded = decode_image(png_bytes(gray), channels=3, size=(3, 5))
    for channel in decoded:
        np.testing.assert_array_equal(channel * np.float32(255), gray.astype(np.float32))


def test_resize_keeps_layout_and_content():
    # A left-to-right ramp, resized to a non-square (height, width): still a ramp along the width.
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))
    decoded = decode_image(png_bytes(ramp), channels=1, size=(10, 16))
    assert decoded.shape == (1, 10, 16)
    assert np.all(np.diff(decoded[0], axis=1) > 0)
    np.testing.assert_array_equal(decoded[0], np.broadcast_to(decoded[0, :1], decoded[0].shape))  # rows stay identical
    flat = decode_image(png_bytes(np.full((9, 9), 77, dtype=np.uint8)), channels=1, size=(4, 28))
    np.testing.assert_array_equal(flat * np.float32(255), np.full((1, 4, 28), 77, dtype=np.float32))


def test_rgba_and_16_bit_png(rng):
    rgba = rng.integers(0, 256, size=(4, 4, 4)).astype(np.uint8)
    decoded = decode_image(png_bytes(rgba), channels=3, size=(4, 4))
    np.testing.assert_array_equal(np.moveaxis(decoded, 0, -1) * np.float32(255), rgba[..., :3].astype(np.float32))
    deep = (np.arange(16).reshape(4, 4) * 4369).astype(np.uint16)  # spans 0..65535
    decoded_deep = decode_image(png_bytes(deep), channels=1, size=(4, 4))
    assert np.abs(decoded_deep[0] - deep / 65535).max() <= 1 / 255


def test_image_info_reads_channels_and_size(rng):
    assert image_info(png_bytes(np.zeros((3, 8), dtype=np.uint8))) == (1, (3, 8))
    assert image_info(png_bytes(np.zeros((5, 2, 3), dtype=np.uint8))) == (3, (5, 2))


def test_decode_errors(tmp_path, rng):
    with pytest.raises(DataError, match="not a PNG or JPEG"):
        decode_image(b"definitely not an image", channels=1, size=(4, 4))
    payload = png_bytes(rng.integers(0, 256, size=(64, 64)).astype(np.uint8))
    with pytest.raises(DataError, match="cannot be decoded"):
        decode_image(payload[: len(payload) // 2], channels=1, size=(4, 4))
    with pytest.raises(DataError, match="more than the 100 allowed"):
        decode_image(payload, channels=1, size=(4, 4), max_pixels=100)
    gif = io.BytesIO()
    Image.new("L", (4, 4)).save(gif, "GIF")
    with pytest.raises(DataError, match="not a PNG or JPEG"):
        decode_image(gif.getvalue(), channels=1, size=(4, 4))
    with pytest.raises(DataError, match="no such file"):
        decode_image(tmp_path / "missing.png", channels=1, size=(4, 4))


@pytest.mark.parametrize("channels, size", [(2, (4, 4)), (4, (4, 4)), (1, (0, 4)), (1, (4,))])
def test_decode_rejects_bad_targets(channels, size):
    with pytest.raises(ConfigError):
        decode_image(png_bytes(np.zeros((4, 4), dtype=np.uint8)), channels=channels, size=size)


# --- image folders -----------------------------------------------------------------------------------
def save_image(path: Path, pixels: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)


def test_grayscale_image_folder(tmp_path, rng):
    first = rng.integers(0, 256, size=(6, 5)).astype(np.uint8)
    save_image(tmp_path / "b_shoe" / "1.png", rng.integers(0, 256, size=(12, 10)).astype(np.uint8))
    save_image(tmp_path / "a_bag" / "x.png", first)
    save_image(tmp_path / "a_bag" / "y.jpg", rng.integers(0, 256, size=(6, 5)).astype(np.uint8))
    (tmp_path / "a_bag" / "notes.txt").write_text("ignored")
    save_image(tmp_path / "a_bag" / ".hidden.png", first)
    (tmp_path / ".cache").mkdir()
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ("a_bag", "b_shoe")
    assert ds.x.shape == (3, 1, 6, 5) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [0, 0, 1] and ds.input_scale == 255.0
    np.testing.assert_array_equal(ds.x[0, 0] * np.float32(255), first.astype(np.float32))
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0


def test_mixed_image_folder_becomes_rgb(tmp_path, rng):
    gray = rng.integers(0, 256, size=(4, 4)).astype(np.uint8)
    save_image(tmp_path / "one" / "gray.png", gray)
    save_image(tmp_path / "two" / "color.png", rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8))
    ds = load_dataset(str(tmp_path))
    assert ds.x.shape == (2, 3, 4, 4)
    for channel in ds.x[0]:
        np.testing.assert_array_equal(channel * np.float32(255), gray.astype(np.float32))


def test_image_folder_errors(tmp_path, rng):
    (tmp_path / "empty_root").mkdir()
    (tmp_path / "empty_root" / "loose.png").write_bytes(png_bytes(np.zeros((2, 2), dtype=np.uint8)))
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(str(tmp_path / "empty_root"))

    save_image(tmp_path / "one_empty" / "cats" / "c.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "one_empty" / "dogs").mkdir()
    (tmp_path / "one_empty" / "dogs" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="dogs: class folder has no PNG/JPEG images"):
        load_dataset(str(tmp_path / "one_empty"))

    save_image(tmp_path / "broken" / "cats" / "c.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "broken" / "dogs").mkdir()
    (tmp_path / "broken" / "dogs" / "d.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="d.png"):
        load_dataset(str(tmp_path / "broken"))

    with pytest.raises(DataError, match="split suffix"):
        load_dataset(f"{tmp_path / 'one_empty'}:test")


# --- the `ncguard data` command ------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ncguard", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def test_cli_describes_digits():
    result = run_cli("data", "digits")
    assert result.returncode == 0, result.stderr
    ds = load_dataset("digits")
    out = result.stdout
    assert "digits:train" in out and f"samples:      {len(ds)}" in out
    assert "1 x 8 x 8" in out and "input scale:  16" in out
    for index, (name, count) in enumerate(zip(ds.classes, ds.class_counts())):
        assert any(line.split() == [str(index), name, str(count)] for line in out.splitlines())


def test_cli_bad_spec_is_a_clean_error():
    result = run_cli("data", "no-such-data-set")
    assert result.returncode == 2
    assert "unknown data SPEC 'no-such-data-set'" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_errors_are_ncguard_errors():
    assert issubclass(DataError, NcguardError) and issubclass(ConfigError, NcguardError)


def test_truncated_png_header_is_a_data_error():
    from ncguard.images import decode_image

    with pytest.raises(DataError, match="cannot be read"):
        decode_image(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR", channels=1, size=(8, 8))
