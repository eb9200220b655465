"""Audit sources: every `--data SOURCE` becomes a stream of small, self-describing shards.

A shard is a plain, JSON-serializable description of a slice of one source (a row range of a
`.npy` file, one `.npz` file, a list of image files, a row group of a Parquet file, a row range of
a built-in data SPEC). Descriptions, not data, so that the driver never holds a dataset: the local
engine's threads and the Ray actors read their shard themselves, and a resumed audit names the
same shards again (the enumeration is deterministic: sorted walks, fixed row ranges).

SOURCE forms:
- a data SPEC of `ncguard.data` (`digits[:test]`, `fashion-mnist[:test]`): small, read whole and cut
  into row ranges (each process keeps one cached copy);
- `PATH.npy` (one array [N, *input_shape], memory-mapped) or `PATH.npz` (array `x`, optional `y` and
  `classes`), or a folder of them (recursively);
- an image folder, walked recursively without loading it: PNG/JPEG files in groups of shard_rows.
  When a first-level subfolder is named like one of the model's classes, it is the label;
- `parquet:PATH#column` with PATH a Parquet file or a folder of them: one shard per row group; the
  column holds arrays (lists of numbers, nested or flat, of the model's input size) or encoded
  PNG/JPEG bytes. Optional label and timestamp columns come from the audit options.

Nothing is unpickled: NumPy files are read with allow_pickle=False.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..images import IMAGE_SUFFIXES, decode_image

ARRAY_SUFFIXES = (".npy", ".npz")
PARQUET_PREFIX = "parquet:"
PARQUET_SUFFIXES = (".parquet", ".parq")
DEFAULT_SHARD_ROWS = 8192
NO_LABEL = -1


@dataclass(frozen=True)
class Shard:
    """One unit of work. `source` and `index` name its output file; the rest says what to read."""

    source: int  # position of the --data SOURCE on the command line
    index: int  # shard number within that source
    kind: str  # "spec" | "npy" | "npz" | "images" | "parquet"
    location: str  # the SPEC, file or root folder
    start: int = 0  # row range (spec, npy) or row group (parquet: start = row group, stop = its first row)
    stop: int = 0
    files: tuple[str, ...] = ()  # image shards: paths relative to `location`
    column: str = ""
    label_column: str = ""
    time_column: str = ""

    @property
    def name(self) -> str:
        return f"part-{self.source:03d}-{self.index:06d}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        values = json.loads(text)
        values["files"] = tuple(values.get("files", ()))
        return cls(**values)


@dataclass
class Chunk:
    """What a shard read: one entry per row. Rows that could not be read have ok False, an error
    label, and zeros in x, so that row ids still line up with the output."""

    row_ids: list[str]
    x: np.ndarray  # float32 [n, *input_shape]
    ok: np.ndarray  # bool [n]
    errors: list[str | None]
    labels: np.ndarray  # int64 [n], NO_LABEL when unknown
    timestamps: np.ndarray | None = None  # int64 seconds since the epoch (UTC), or None


@dataclass(frozen=True)
class SourceOptions:
    shard_rows: int = DEFAULT_SHARD_ROWS
    label_column: str = ""
    time_column: str = ""


# ----------------------------------------------------------------------------------- enumeration
def describe_source(spec: str) -> str:
    """The kind a SOURCE string names (for messages and the manifest), raising DataError if none."""
    return _classify(spec)[0]


def _classify(spec: str) -> tuple[str, str, str]:
    """(kind, location, column) of a SOURCE string."""
    if spec.startswith(PARQUET_PREFIX):
        rest = spec[len(PARQUET_PREFIX):]
        location, sep, column = rest.rpartition("#")
        if not sep or not location or not column:
            raise DataError(f"{spec}: a Parquet source is written parquet:PATH#column (the column with the arrays or image bytes)")
        if not Path(location).exists():
            raise DataError(f"{spec}: no such Parquet file or folder: {location}")
        return "parquet", location, column
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return "npy", spec, ""
        if suffix == ".npz":
            return "npz", spec, ""
        if suffix in PARQUET_SUFFIXES:
            raise DataError(f"{spec}: name the column to audit: parquet:{spec}#COLUMN")
        raise DataError(f"{spec}: cannot audit this file; expected .npy, .npz, parquet:PATH#column, an image folder or a data SPEC")
    if path.is_dir():
        return "folder", spec, ""
    from ..data import BUILTIN_NAMES, _parse_builtin

    if _parse_builtin(spec) is not None:
        return "spec", spec, ""
    if "/" in spec or os.sep in spec or path.suffix.lower() in (*ARRAY_SUFFIXES, *PARQUET_SUFFIXES, *IMAGE_SUFFIXES):
        raise DataError(f"no such file or folder: {spec}")
    raise DataError(
        f"unknown audit source {spec!r}: expected a data SPEC ({', '.join(BUILTIN_NAMES)}), a .npy/.npz file, "
        "a folder of images or of .npy/.npz shards, or parquet:PATH#column"
    )


def _walk(root: Path) -> Iterator[Path]:
    """Files under root in a fixed order (sorted names, depth first), hidden entries skipped, streamed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {root}: {exc}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def iter_shards(specs: list[str], options: SourceOptions, input_shape: tuple[int, ...]) -> Iterator[Shard]:
    """Every shard of every source, in a deterministic order. Checks what can be checked cheaply
    (headers, shapes, column names) before yielding a source's first shard."""
    if options.shard_rows < 1:
        raise ConfigError(f"--shard-rows must be at least 1, got {options.shard_rows}")
    for number, spec in enumerate(specs):
        kind, location, column = _classify(spec)
        if kind == "spec":
            yield from _spec_shards(number, location, options, input_shape)
        elif kind == "npy":
            yield from _npy_shards(number, 0, Path(location), options, input_shape)
        elif kind == "npz":
            yield Shard(number, 0, "npz", location)
        elif kind == "parquet":
            yield from _parquet_shards(number, location, column, options)
        else:
            yield from _folder_shards(number, Path(location), options, input_shape)


def _spec_shards(number: int, spec: str, options: SourceOptions, input_shape) -> Iterator[Shard]:
    dataset = _load_spec(spec)
    if dataset.input_shape != tuple(input_shape):
        raise DataError(f"{spec}: inputs have shape {list(dataset.input_shape)}, the model takes {list(input_shape)}")
    for index, start in enumerate(range(0, len(dataset), options.shard_rows)):
        yield Shard(number, index, "spec", spec, start, min(start + options.shard_rows, len(dataset)))


def _npy_shards(number: int, first_index: int, path: Path, options: SourceOptions, input_shape) -> Iterator[Shard]:
    array = _open_npy(path)
    _check_array_shape(array.shape, input_shape, str(path))
    for offset, start in enumerate(range(0, len(array), options.shard_rows)):
        yield Shard(number, first_index + offset, "npy", str(path), start, min(start + options.shard_rows, len(array)))


def _folder_shards(number: int, root: Path, options: SourceOptions, input_shape) -> Iterator[Shard]:
    """A folder holds either images or .npy/.npz shards (checked as the walk goes)."""
    index = 0
    batch: list[str] = []
    kind = None
    for path in _walk(root):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            this = "images"
        elif suffix in ARRAY_SUFFIXES:
            this = "arrays"
        else:
            continue
        if kind is None:
            kind = this
            if kind == "images" and (len(input_shape) != 3 or input_shape[0] not in (1, 3)):
                raise DataError(f"{root} holds images, but the model takes inputs of shape {list(input_shape)}")
        elif this != kind:
            raise DataError(f"{root} mixes images and .npy/.npz files ({path}); audit them as separate sources")
        if kind == "arrays":
            if suffix == ".npy":
                for shard in _npy_shards(number, index, path, options, input_shape):
                    yield shard
                    index += 1
            else:
                yield Shard(number, index, "npz", str(path))
                index += 1
            continue
        batch.append(str(path.relative_to(root)))
        if len(batch) == options.shard_rows:
            yield Shard(number, index, "images", str(root), files=tuple(batch))
            index, batch = index + 1, []
    if batch:
        yield Shard(number, index, "images", str(root), files=tuple(batch))
    elif kind is None:
        raise DataError(f"{root}: no PNG/JPEG images and no .npy/.npz files found (searched recursively)")


def _parquet_files(location: str) -> list[Path]:
    path = Path(location)
    if path.is_file():
        return [path]
    files = [p for p in _walk(path) if p.suffix.lower() in PARQUET_SUFFIXES]
    if not files:
        raise DataError(f"{location}: no .parquet files found (searched recursively)")
    return files


def _parquet_shards(number: int, location: str, column: str, options: SourceOptions) -> Iterator[Shard]:
    pq = _pyarrow_parquet()
    index = 0
    for path in _parquet_files(location):
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
        names = set(metadata.schema.to_arrow_schema().names)
        for wanted, what in ((column, "column"), (options.label_column, "--label-column"), (options.time_column, "--time-column")):
            if wanted and wanted not in names:
                raise DataError(f"{path}: has no column {wanted!r} ({what}); its columns are {', '.join(sorted(names))}")
        first_row = 0
        for group in range(metadata.num_row_groups):
            yield Shard(
                number, index, "parquet", str(path), group, first_row,
                column=column, label_column=options.label_column, time_column=options.time_column,
            )
            first_row += metadata.row_group(group).num_rows
            index += 1


# ----------------------------------------------------------------------------------- reading
_SPEC_CACHE: dict[str, object] = {}
_SPEC_LOCK = threading.Lock()


def _load_spec(spec: str):
    """A built-in data SPEC, read once per process (they are at most tens of MB)."""
    with _SPEC_LOCK:
        if spec not in _SPEC_CACHE:
            from ..data import load_dataset

            _SPEC_CACHE[spec] = load_dataset(spec)
        return _SPEC_CACHE[spec]


# NumPy parses a .npy header with ast.literal_eval, and CPython 3.11 before 3.11.8 can raise a spurious
# "SystemError: AST constructor recursion depth mismatch" when threads parse at the same time
# (python/cpython#106905; seen here once in the audit's thread pool). Opening a memory map reads only the
# header, so holding a lock for it costs the pool nothing.
_NPY_HEADER_LOCK = threading.Lock()


def _open_npy(path: Path) -> np.ndarray:
    try:
        with _NPY_HEADER_LOCK:
            return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a .npy array (object arrays are refused): {exc}") from None


def _check_array_shape(shape: tuple[int, ...], input_shape, what: str) -> None:
    if tuple(shape[1:]) != tuple(input_shape):
        raise DataError(
            f"{what}: array of shape {list(shape)}; the model takes a batch [N, {', '.join(map(str, input_shape))}]"
        )


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigError("Parquet needs pyarrow: pip install 'ncguard[scale]'") from None
    return pq


def _class_lookup(classes) -> dict[str, int]:
    return {str(name): index for index, name in enumerate(classes)}


def _as_float_rows(x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows and a mask of rows whose every value is finite (after the cast)."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what}: inputs must be numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.ones(0, bool)
    return x, finite


def read_shard(shard: Shard, input_shape: tuple[int, ...], classes) -> Chunk:
    """Read one shard for a model taking `input_shape` with class names `classes`."""
    input_shape = tuple(input_shape)
    reader = {"spec": _read_spec, "npy": _read_npy, "npz": _read_npz, "images": _read_images, "parquet": _read_parquet}
    if shard.kind not in reader:
        raise DataError(f"unknown shard kind {shard.kind!r}")
    return reader[shard.kind](shard, input_shape, list(classes))


def _chunk_from_array(row_ids, x, labels, what, timestamps=None) -> Chunk:
    x, finite = _as_float_rows(x, what)
    x = np.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0).astype(np.float32, copy=False) if not finite.all() else x
    errors = [None if ok else "not_finite" for ok in finite.tolist()]
    return Chunk(row_ids, x, finite, errors, labels, timestamps)


def _read_spec(shard: Shard, input_shape, classes) -> Chunk:
    dataset = _load_spec(shard.location)
    x = dataset.x[shard.start:shard.stop]
    _check_array_shape((len(x), *x.shape[1:]), input_shape, shard.location)
    labels = _map_label_names(dataset.y[shard.start:shard.stop], dataset.classes, classes)
    row_ids = [f"{shard.location}:{i}" for i in range(shard.start, shard.stop)]
    return _chunk_from_array(row_ids, x, labels, shard.location)


def _map_label_names(y: np.ndarray, source_classes, model_classes) -> np.ndarray:
    """Labels of a source as model class indices: by name when the names match the model's,
    else by index when the source has the same number of classes, else unknown."""
    lookup = _class_lookup(model_classes)
    if all(str(name) in lookup for name in source_classes):
        table = np.array([lookup[str(name)] for name in source_classes], dtype=np.int64)
        return table[np.asarray(y, dtype=np.int64)]
    return np.full(len(y), NO_LABEL, dtype=np.int64)


def _read_npy(shard: Shard, input_shape, classes) -> Chunk:
    array = _open_npy(Path(shard.location))
    _check_array_shape(array.shape, input_shape, shard.location)
    x = np.array(array[shard.start:shard.stop])  # copies just this range out of the memory map
    row_ids = [f"{shard.location}:{i}" for i in range(shard.start, shard.stop)]
    return _chunk_from_array(row_ids, x, np.full(len(x), NO_LABEL, dtype=np.int64), shard.location)


def _read_npz(shard: Shard, input_shape, classes) -> Chunk:
    path = shard.location
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if "x" not in names:
                raise DataError(f"{path} has no array named 'x' (it holds: {', '.join(names) or 'nothing'})")
            x = npz["x"]
            y = npz["y"] if "y" in names else None
            source_classes = npz["classes"] if "classes" in names else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npz file (object arrays are refused): {exc}") from None
    _check_array_shape(x.shape, input_shape, path)
    labels = np.full(len(x), NO_LABEL, dtype=np.int64)
    if y is not None:
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise DataError(f"{path}: y must be {len(x)} integer labels, got {y.dtype} {list(y.shape)}")
        if source_classes is not None:
            labels = _map_label_names(y, [str(c) for c in source_classes], classes)
        else:
            labels = np.where((y >= 0) & (y < len(classes)), y, NO_LABEL).astype(np.int64)
    row_ids = [f"{path}:{i}" for i in range(len(x))]
    return _chunk_from_array(row_ids, x, labels, path)


def _read_images(shard: Shard, input_shape, classes) -> Chunk:
    root = Path(shard.location)
    lookup = _class_lookup(classes)
    n = len(shard.files)
    x = np.zeros((n, *input_shape), dtype=np.float32)
    ok = np.ones(n, dtype=bool)
    errors: list[str | None] = [None] * n
    labels = np.full(n, NO_LABEL, dtype=np.int64)
    for i, relative in enumerate(shard.files):
        parts = Path(relative).parts
        if len(parts) > 1 and parts[0] in lookup:
            labels[i] = lookup[parts[0]]
        try:
            x[i] = decode_image(root / relative, channels=input_shape[0], size=input_shape[1:])
        except DataError:
            ok[i], errors[i] = False, "undecodable_image"
    row_ids = [str(root / relative) for relative in shard.files]
    return Chunk(row_ids, x, ok, errors, labels)


def _read_parquet(shard: Shard, input_shape, classes) -> Chunk:
    import pyarrow as pa
    import pyarrow.compute as pc

    pq = _pyarrow_parquet()
    columns = [c for c in (shard.column, shard.label_column, shard.time_column) if c]
    try:
        table = pq.ParquetFile(shard.location).read_row_group(shard.start, columns=list(dict.fromkeys(columns)))
    except Exception as exc:
        raise DataError(f"{shard.location}: cannot read row group {shard.start}: {exc}") from None
    n = table.num_rows
    row_ids = [f"{shard.location}:{i}" for i in range(shard.stop, shard.stop + n)]
    column = table.column(shard.column).combine_chunks()
    what = f"{shard.location} column {shard.column!r}"
    size = int(np.prod(input_shape))
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise DataError(f"{what} holds bytes (images), but the model takes inputs of shape {list(input_shape)}")
        x = np.zeros((n, *input_shape), dtype=np.float32)
        ok = np.ones(n, dtype=bool)
        errors: list[str | None] = [None] * n
        for i, value in enumerate(column.to_pylist()):
            try:
                if value is None:
                    raise DataError("null")
                x[i] = decode_image(value, channels=input_shape[0], size=input_shape[1:])
            except DataError:
                ok[i], errors[i] = False, "undecodable_image"
        chunk = Chunk(row_ids, x, ok, errors, np.full(n, NO_LABEL, dtype=np.int64))
    elif _is_list(column.type):
        if column.null_count:
            raise DataError(f"{what} has {column.null_count} null rows")
        values = column
        while _is_list(values.type):
            lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            values = pc.list_flatten(values)
        flat = values.to_numpy(zero_copy_only=False)
        if flat.size != n * size:
            raise DataError(f"{what}: rows must hold {size} numbers each (the model's input {list(input_shape)}), got {flat.size} numbers in {n} rows")
        del lengths
        chunk = _chunk_from_array(row_ids, flat.reshape((n, *input_shape)), np.full(n, NO_LABEL, dtype=np.int64), what)
    else:
        raise DataError(f"{what} has type {column.type}; expected lists of numbers (arrays) or binary (PNG/JPEG bytes)")
    if shard.label_column:
        chunk.labels = _parquet_labels(table.column(shard.label_column), classes, shard)
    if shard.time_column:
        chunk.timestamps = _parquet_times(table.column(shard.time_column), shard)
    return chunk


def _is_list(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _parquet_labels(column, classes, shard: Shard) -> np.ndarray:
    """Integer labels are class indices; string labels are class names; others are unknown."""
    import pyarrow as pa

    values = column.to_pylist()
    if pa.types.is_integer(column.type):
        return np.array([v if v is not None and 0 <= v < len(classes) else NO_LABEL for v in values], dtype=np.int64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        lookup = _class_lookup(classes)
        return np.array([lookup.get(v, NO_LABEL) for v in values], dtype=np.int64)
    raise DataError(f"{shard.location}: label column {shard.label_column!r} has type {column.type}; expected integers or class names")


def _parquet_times(column, shard: Shard) -> np.ndarray:
    """Seconds since the epoch (UTC): timestamp columns as such, integers taken as seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    elif pa.types.is_integer(column.type):
        seconds = column
    else:
        raise DataError(f"{shard.location}: time column {shard.time_column!r} has type {column.type}; expected timestamps or integer seconds")
    if seconds.null_count:
        raise DataError(f"{shard.location}: time column {shard.time_column!r} has {seconds.null_count} null values")
    return np.asarray(seconds.to_numpy(zero_copy_only=False), dtype=np.int64)
