"""Data readers: every data SPEC becomes one `Dataset` of float32 inputs and int64 labels.

SPECs (DESIGN.md section 3):
- `fashion-mnist[:train|:test]`: Fashion-MNIST IDX files from $NCGUARD_DATA or /usr/share/datasets/fashion-mnist.
- `digits[:train|:test]`: scikit-learn's 8x8 digits with a fixed stratified 75/25 split.
- `PATH.npz`: arrays `x` and `y` (optional `classes`), taken as given.
- an image folder: one subfolder per class with PNG/JPEG files.
Bare `fashion-mnist` and `digits` mean their train split. Built-in names take precedence over
files of the same name (write `./digits` for a folder called `digits`).

Every reader checks what it returns (shapes, finiteness, label range) so the models, the fit and
the service can trust a `Dataset` without checking again.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConfigError, DataError

FASHION_MNIST = "fashion-mnist"
DIGITS = "digits"
SPLITS = ("train", "test")
BUILTIN_NAMES = (FASHION_MNIST, DIGITS)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "NCGUARD_DATA"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DIGITS_TEST_FRACTION = 0.25
DIGITS_SEED = 0

SPEC_FORMS = "fashion-mnist[:train|:test], digits[:train|:test], a .npz file with arrays x and y, or an image folder"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs, labels and class names of one data SPEC, ready for a model.

    x is float32 [N, *input_shape] (images [N, C, H, W] in [0, 1], vectors [N, D]); y is int64
    [N] with values in [0, len(classes)); input_scale is what raw values were divided by.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    name: str
    input_scale: float

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self) -> np.ndarray:
        """Samples per class, int64 [len(classes)] (zeros included)."""
        return np.bincount(self.y, minlength=len(self.classes)).astype(np.int64)

    def subset(self, index) -> "Dataset":
        """The rows selected by a boolean mask of length N or an array of row indices."""
        index = np.asarray(index)
        n = len(self)
        if index.dtype == bool:
            if index.shape != (n,):
                raise DataError(f"boolean mask for {self.name} must have shape ({n},), got {index.shape}")
        elif np.issubdtype(index.dtype, np.integer) or index.size == 0:
            index = index.astype(np.int64).reshape(-1)
            if index.size and (index.min() < -n or index.max() >= n):
                raise DataError(f"row index out of range for {self.name} with {n} samples")
        else:
            raise DataError(f"subset of {self.name} needs a boolean mask or integer indices, got dtype {index.dtype}")
        return Dataset(
            x=self.x[index], y=self.y[index], classes=self.classes, name=self.name, input_scale=self.input_scale
        )


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(n), each at most batch_size long (the last may be shorter)."""
    if n < 0:
        raise ConfigError(f"number of items must be >= 0, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# --- IDX files -------------------------------------------------------------------------------
# IDX is a 4-byte magic (0, 0, type code, rank), `rank` big-endian uint32 dimensions, then the
# big-endian values. No maintained library reads it torch-free (idx2numpy is unmaintained and adds
# nothing NumPy's frombuffer does not), so the few lines below do.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: str) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupt or truncated gzip file: {exc}") from None


def read_idx(path) -> np.ndarray:
    """An IDX file (gzip or plain) as a native-endian NumPy array of the file's dtype and shape."""
    path = os.fspath(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(data)} bytes")
    zero1, zero2, type_code, rank = data[:4]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            f"(expected 0x0000TTRR with type TT in {', '.join(f'{c:02x}' for c in _IDX_DTYPES)})"
        )
    header_size = 4 + 4 * rank
    if len(data) < header_size:
        raise DataError(f"{path} is truncated: the header declares {rank} dimensions but the file ends first")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual < expected:
        raise DataError(f"{path} is truncated: shape {shape} needs {expected} data bytes, found {actual}")
    if actual > expected:
        raise DataError(f"{path} is corrupt: shape {shape} needs {expected} data bytes, found {actual} (extra bytes)")
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


# --- checks shared by the readers ----------------------------------------------------------------
def _checked_inputs(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{source}: x must have shape [N, ...] with at least 2 dimensions, got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{source}: has no samples (x has shape {x.shape})")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise DataError(f"{source}: x has {bad} non-finite values (NaN or infinite, also after the cast to float32)")
    return x


def _checked_labels(y: np.ndarray, n: int, n_classes: int | None, source: str) -> np.ndarray:
    """int64 labels; float labels are accepted only when every value is a whole number."""
    if y.ndim != 1:
        raise DataError(f"{source}: y must be 1-D [N], got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{source}: x has {n} samples but y has {y.shape[0]} labels")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{source}: labels must be integers, y has non-integer values")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers, y has dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, y has {y.min()}")
    if n_classes is not None and y.max() >= n_classes:
        raise DataError(f"{source}: label {y.max()} is out of range for {n_classes} classes (labels are 0..{n_classes - 1})")
    return y.astype(np.int64)


def _checked_classes(classes: np.ndarray, source: str) -> tuple[str, ...]:
    if classes.dtype.kind != "U" or classes.ndim != 1 or classes.size == 0:
        raise DataError(
            f"{source}: classes must be a non-empty 1-D array of strings, got dtype {classes.dtype} shape {classes.shape}"
        )
    names = tuple(str(c) for c in classes)
    if len(set(names)) != len(names):
        raise DataError(f"{source}: class names must be unique, got {list(names)}")
    return names


# --- SPEC parsing --------------------------------------------------------------------------------
def _parse_builtin(spec: str) -> tuple[str, str] | None:
    """(name, split) for a built-in SPEC, None for anything else; an unknown split is an error."""
    name, sep, split = spec.partition(":")
    if name not in BUILTIN_NAMES:
        return None
    if not sep:
        return name, "train"
    if split not in SPLITS:
        raise DataError(f"{name} has splits {' and '.join(SPLITS)}, not {split!r} (write {name}:train or {name}:test)")
    return name, split


def test_split_of(spec: str) -> str | None:
    """The held-out split that goes with a training SPEC, or None when the SPEC has none."""
    builtin = _parse_builtin(spec)
    if builtin is None or builtin[1] == "test":
        return None
    return f"{builtin[0]}:test"


test_split_of.__test__ = False  # a public helper, not a pytest test


def load_dataset(spec: str) -> Dataset:
    """Read one data SPEC (see the module docstring) into a checked Dataset."""
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"a data SPEC must be a string, got {type(spec).__name__}")
    spec = os.fspath(spec)
    builtin = _parse_builtin(spec)
    if builtin is not None:
        name, split = builtin
        return load_fashion_mnist(split) if name == FASHION_MNIST else load_digits(split)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return load_npz(path)
        raise DataError(f"cannot read {spec}: expected {SPEC_FORMS}")
    head, sep, _ = spec.rpartition(":")
    if sep and head and (Path(head).exists() or head.lower().endswith(".npz")):
        raise DataError(f"{spec}: a :train/:test split suffix only exists for fashion-mnist and digits, not for files or folders")
    if path.suffix.lower() == ".npz" or os.sep in spec or "/" in spec:
        raise DataError(f"no such file or folder: {spec}")
    raise DataError(f"unknown data SPEC {spec!r} (and no file or folder of that name): expected {SPEC_FORMS}")


# --- built-in data sets ----------------------------------------------------------------------------
def fashion_mnist_dirs() -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order."""
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return [Path(root), Path(root) / FASHION_MNIST]
    return [Path(FASHION_MNIST_SYSTEM_DIR)]


def _find_idx(stem: str, dirs: list[Path]) -> Path | None:
    for folder in dirs:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(split: str = "train") -> Dataset:
    """Fashion-MNIST from its IDX files: x = bytes / 255 as [N, 1, 28, 28]."""
    if split not in SPLITS:
        raise DataError(f"{FASHION_MNIST} has splits {' and '.join(SPLITS)}, not {split!r}")
    dirs = fashion_mnist_dirs()
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    image_path, label_path = _find_idx(image_stem, dirs), _find_idx(label_stem, dirs)
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise DataError(
            f"Fashion-MNIST {split} files not found: looked for {missing}[.gz] in "
            f"{', '.join(str(d) for d in dirs)}. Install them with `apt-get install dataset-fashion-mnist` "
            f"or set {DATA_DIR_ENV} to a folder holding the four IDX files"
        )
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8:
        raise DataError(f"{label_path}: expected uint8 labels, got {labels.dtype}")
    source = f"{FASHION_MNIST}:{split}"
    x = np.divide(images[:, np.newaxis], np.float32(255), dtype=np.float32)
    y = _checked_labels(labels, len(images), len(FASHION_MNIST_CLASSES), f"{source} ({label_path})")
    return Dataset(x=x, y=y, classes=FASHION_MNIST_CLASSES, name=source, input_scale=255.0)


def digits_split_indices() -> dict[str, np.ndarray]:
    """Row indices of the fixed stratified 75/25 digits split (sorted, same on every machine)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    y = sklearn_digits().target
    train, test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SEED, stratify=y
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def load_digits(split: str = "train") -> Dataset:
    """scikit-learn's 8x8 digits: x = values / 16 as [N, 1, 8, 8], classes "0".."9"."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in SPLITS:
        raise DataError(f"{DIGITS} has splits {' and '.join(SPLITS)}, not {split!r}")
    bunch = sklearn_digits()
    rows = digits_split_indices()[split]
    x = (bunch.images[rows].astype(np.float32) / np.float32(16))[:, np.newaxis]
    y = bunch.target[rows].astype(np.int64)
    classes = tuple(str(c) for c in range(10))
    return Dataset(x=x, y=y, classes=classes, name=f"{DIGITS}:{split}", input_scale=16.0)


# --- files and folders -----------------------------------------------------------------------------
def load_npz(path) -> Dataset:
    """A .npz with arrays x [N, ...] and y [N] (optional classes), read without unpickling."""
    path = os.fspath(path)
    source = path
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except ValueError as exc:
        # NumPy's answer for files that would need unpickling (not an .npz at all, or object arrays).
        raise DataError(f"{source}: not a .npz file that can be read without unpickling: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{source}: not a readable .npz file: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{source}: holds a single array (.npy), not a .npz archive with arrays x and y")
    with loaded as archive:
        keys = set(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise DataError(f"{source}: missing array {' and '.join(missing)} (found: {', '.join(sorted(keys)) or 'nothing'})")
        try:
            x, y = archive["x"], archive["y"]
            classes = archive["classes"] if "classes" in keys else None
        except ValueError as exc:
            raise DataError(f"{source}: an array needs unpickling (object dtype) or is corrupt: {exc}") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{source}: corrupt .npz member: {exc}") from None
    x = _checked_inputs(x, source)
    names = _checked_classes(classes, source) if classes is not None else None
    y = _checked_labels(y, len(x), len(names) if names is not None else None, source)
    if names is None:
        names = tuple(str(c) for c in range(int(y.max()) + 1))
    return Dataset(x=x, y=y, classes=names, name=source, input_scale=1.0)


def _class_images(folder: Path) -> list[tuple[str, list[Path]]]:
    from .images import IMAGE_SUFFIXES

    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder}: no class subfolders (an image folder holds one subfolder of PNG/JPEG files per class)")
    classes = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{class_dir}: class folder has no PNG/JPEG images")
        classes.append((class_dir.name, files))
    return classes


def load_image_folder(path) -> Dataset:
    """One subfolder per class (sorted names = class order); every image is converted to the
    size of the first one, and to grayscale only when all of them are grayscale."""
    from tqdm import tqdm

    from .images import decode_image, image_info

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"no such folder: {folder}")
    per_class = _class_images(folder)
    files = [(label, f) for label, (_, class_files) in enumerate(per_class) for f in class_files]
    # First pass reads headers only: the target layout must be known before decoding.
    channels, size = image_info(files[0][1])
    for _, file in tqdm(files[1:], desc=f"scanning {folder.name}", unit="image", disable=None, leave=False):
        if channels == 3:
            break
        channels = max(channels, image_info(file)[0])
    x = np.empty((len(files), channels, *size), dtype=np.float32)
    for i, (_, file) in enumerate(tqdm(files, desc=f"reading {folder.name}", unit="image", disable=None, leave=False)):
        x[i] = decode_image(file, channels=channels, size=size)
    y = np.array([label for label, _ in files], dtype=np.int64)
    classes = tuple(name for name, _ in per_class)
    return Dataset(x=x, y=y, classes=classes, name=os.fspath(path), input_scale=255.0)
