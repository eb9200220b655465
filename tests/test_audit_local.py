"""`ncguard audit` with the local engine on a real exported digits model, over every kind of source:
per-row results equal the Predictor's, merged aggregates equal one pass over all rows, resume and
Ctrl-C keep finished shards, bad input gets a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from ncguard import drift
from ncguard.audit import AuditOptions, run_audit
from ncguard.data import load_dataset
from ncguard.runtime import Predictor

ROOT = Path(__file__).resolve().parents[1]


def read_rows(out: Path):
    """Every per-row result of an audit, as one table sorted by row id."""
    tables = [pq.read_table(path) for path in sorted((out / "rows").glob("part-*.parquet"))]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    return table.sort_by("row_id")


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """digits:test cut into the source kinds the audit reads, with known labels and a few bad rows."""
    root = tmp_path_factory.mktemp("audit-sources")
    test = load_dataset("digits:test")
    x, y = test.x, test.y
    # .npy shards (unlabelled) in a folder, and one .npz with labels
    shards = root / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", x[:150])
    np.save(shards / "b.npy", x[150:300])
    bad = x[300:310].copy()
    bad[3, 0, 0, 0] = np.nan  # one row the audit must refuse, not the whole file
    np.save(shards / "c.npy", bad)
    np.savez(root / "labelled.npz", x=x[310:400], y=y[310:400])
    # image folder: class subfolders (labels) and a nested unlabelled folder, plus a corrupt file
    images = root / "images"
    for i in range(400, 430):
        write_png(images / str(y[i]) / f"img{i}.png", x[i])
    for i in range(430, 440):
        write_png(images / "incoming" / "day1" / f"img{i}.png", x[i])
    (images / "incoming" / "broken.png").write_bytes(b"\x89PNG not really")
    # Parquet: arrays as nested lists, labels as class names, timestamps over two days; and PNG bytes
    rows = x[440:450]
    table = pa.table({
        "pixels": pa.array([r.tolist() for r in rows]),
        "label": pa.array([str(v) for v in y[440:450]]),
        "ts": pa.array(np.array([0] * 5 + [86400 * 1 + 60] * 5, dtype="datetime64[s]"), pa.timestamp("s")),
    })
    pq.write_table(table, root / "arrays.parquet", row_group_size=4)
    import io

    from PIL import Image

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    pq.write_table(pa.table({"image": pa.array([png(r) for r in x[:5]], pa.binary())}), root / "images.parquet")
    return {
        "root": root,
        "specs": [str(shards), str(root / "labelled.npz"), str(images), f"parquet:{root / 'arrays.parquet'}#pixels"],
        "x": x, "y": y,
    }


def expected_rows(sources) -> dict[str, tuple[np.ndarray, int]]:
    """row id -> (input, label or -1) for every readable row of the sources fixture."""
    x, y, root = sources["x"], sources["y"], sources["root"]
    rows = {}
    for name, lo, hi in (("a", 0, 150), ("b", 150, 300), ("c", 300, 310)):
        for i in range(lo, hi):
            if i != 303:
                rows[f"{root / 'shards' / name}.npy:{i - lo}"] = (x[i], -1)
    for i in range(310, 400):
        rows[f"{root / 'labelled.npz'}:{i - 310}"] = (x[i], y[i])
    for i in range(400, 430):
        rows[str(root / "images" / str(y[i]) / f"img{i}.png")] = (x[i], y[i])
    for i in range(430, 440):
        rows[str(root / "images" / "incoming" / "day1" / f"img{i}.png")] = (x[i], -1)
    for i in range(440, 450):
        rows[f"{root / 'arrays.parquet'}:{i - 440}"] = (x[i], y[i])
    return rows


@pytest.fixture(scope="module")
def local_audit(digits_model_path, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-local") / "out"
    options = AuditOptions(shard_rows=64, features=True, label_column="label", time_column="ts", quiet=True)
    result = run_audit(digits_model_path, sources["specs"], out, options)
    return result, out


def single_pass(digits_model_path, sources):
    rows = expected_rows(sources)
    ids = sorted(rows)
    x = np.stack([rows[i][0] for i in ids])
    labels = np.array([rows[i][1] for i in ids])
    # PNG round trip quantizes pixels to 1/255: score what the audit read from the image files
    from ncguard.images import decode_image

    for k, row_id in enumerate(ids):
        if row_id.endswith(".png"):
            x[k] = decode_image(row_id, channels=1, size=(8, 8))
    predictor = Predictor(digits_model_path, threads=1)
    return ids, labels, predictor.predict(x), predictor.metadata


def test_per_row_results_equal_the_predictor(local_audit, sources, digits_model_path):
    result, out = local_audit
    table = read_rows(out)
    ok = table.filter(pa.compute.is_null(table.column("error")))
    ids, labels, expected, meta = single_pass(digits_model_path, sources)
    assert ok.column("row_id").to_pylist() == ids
    np.testing.assert_allclose(ok.column("ood_score").to_numpy(), expected.ood_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ok.column("confidence").to_numpy(), expected.confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ok.column("class_index").to_numpy(), expected.class_index)
    np.testing.assert_array_equal(ok.column("is_ood").to_numpy(), expected.is_ood)
    names = Predictor(digits_model_path).component_names
    assert ok.column("ood_driver").to_pylist() == [names[d] if flag else None for d, flag in zip(expected.driver, expected.is_ood)]
    assert any(ok.column("ood_driver").to_pylist())
    features = np.asarray(ok.column("features").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(features, expected.features, rtol=1e-4, atol=1e-5)
    assert ok.column("label").to_pylist() == [meta.classes[v] if v >= 0 else None for v in labels]
    # the refused rows are listed, with the reason, and no scores
    refused = table.filter(pa.compute.invert(pa.compute.is_null(table.column("error"))))
    assert sorted(zip(refused.column("row_id").to_pylist(), refused.column("error").to_pylist())) == [
        (str(sources["root"] / "images" / "incoming" / "broken.png"), "undecodable_image"),
        (f"{sources['root'] / 'shards' / 'c.npy'}:3", "not_finite"),
    ]
    assert refused.column("ood_score").null_count == 2


def test_merged_aggregates_equal_one_pass(local_audit, sources, digits_model_path):
    result, out = local_audit
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    ids, labels, expected, meta = single_pass(digits_model_path, sources)
    reference = meta.drift_reference
    n = len(ids)
    assert summary["rows"] == n
    assert summary["rejected"] == {"not_finite": 1, "undecodable_image": 1}
    assert summary["ood"] == int(expected.is_ood.sum())
    known = labels >= 0
    assert summary["labelled"] == int(known.sum())
    assert summary["accuracy"] == pytest.approx(np.mean(expected.class_index[known] == labels[known]))
    counts = np.bincount(expected.class_index, minlength=len(meta.classes))
    assert [c["predicted"] for c in summary["per_class"]] == counts.tolist()
    d = summary["drift"]
    assert d["ood_rate"]["value"] == pytest.approx(expected.is_ood.mean())
    assert d["ood_rate"]["expected"] == pytest.approx(1 - meta.tpr)
    assert d["score_psi"]["value"] == pytest.approx(drift.psi(expected.ood_score, reference.score_quantiles), rel=1e-9, abs=1e-9)
    ks = drift.ks_distance(expected.ood_score, reference.score_quantiles)
    assert d["score_ks"]["value"] - 1e-9 <= ks <= d["score_ks"]["upper_bound"] + 1e-9
    assert d["class_js"]["value"] == pytest.approx(drift.js_distance(drift.class_distribution(expected.class_index, 10), reference.class_priors), rel=1e-9)
    # float32 features: ONNX Runtime's last bits depend on how rows are batched
    assert d["feature_mean_shift"]["value"] == pytest.approx(
        drift.mean_shift(expected.features.mean(axis=0), reference.feature_mean, reference.feature_std), rel=1e-5
    )
    histogram = summary["score_histogram"]
    bounds = np.asarray(histogram["upper_bounds"][:-1], dtype=np.float64)
    assert histogram["counts"] == np.bincount(np.searchsorted(bounds, expected.ood_score.astype(np.float64), side="left"), minlength=bounds.size + 1).tolist()
    assert [s["rows"] for s in summary["sources"]] == [309, 90, 40, 10]
    assert summary["time_buckets"] == [
        {"bucket": "1970-01-01", "rows": 5, "ood_rate": pytest.approx(summary["time_buckets"][0]["ood_rate"]), "labelled": 5, "accuracy": pytest.approx(summary["time_buckets"][0]["accuracy"])},
        {"bucket": "1970-01-02", "rows": 5, "ood_rate": pytest.approx(summary["time_buckets"][1]["ood_rate"]), "labelled": 5, "accuracy": pytest.approx(summary["time_buckets"][1]["accuracy"])},
    ]
    top = summary["most_ood"]
    order = np.argsort(-expected.ood_score, kind="stable")
    assert top[0]["row_id"] == ids[order[0]]
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2 + len(top)


def test_parquet_image_bytes_column(digits_model_path, sources, tmp_path):
    out = tmp_path / "out"
    result = run_audit(digits_model_path, [f"parquet:{sources['root'] / 'images.parquet'}#image"], out, AuditOptions(quiet=True, report=False))
    assert result.summary["rows"] == 5
    table = read_rows(out)
    assert table.column("error").null_count == 5


def test_resume_keeps_finished_shards_and_gives_the_same_summary(digits_model_path, tmp_path):
    out = tmp_path / "out"
    options = AuditOptions(shard_rows=100, quiet=True, report=False)
    first = run_audit(digits_model_path, ["digits:test"], out, options)
    assert first.shards_scored == 5
    shard_files = sorted((out / "rows").glob("part-*.parquet"))
    kept = shard_files[0].stat().st_mtime_ns
    shard_files[2].unlink()
    shard_files[4].unlink()
    with pytest.raises(Exception, match="--resume"):
        run_audit(digits_model_path, ["digits:test"], out, options)
    again = run_audit(digits_model_path, ["digits:test"], out, AuditOptions(shard_rows=100, quiet=True, report=False, resume=True))
    assert (again.shards_scored, again.shards_resumed) == (2, 3)
    assert shard_files[0].stat().st_mtime_ns == kept
    for key in ("rows", "ood", "accuracy", "per_class", "score_histogram", "most_ood", "time_buckets"):
        assert again.summary[key] == first.summary[key]
    for name, entry in first.summary["drift"].items():
        assert again.summary["drift"][name]["value"] == pytest.approx(entry["value"], rel=1e-12)
    with pytest.raises(Exception, match="shard_rows"):
        run_audit(digits_model_path, ["digits:test"], out, AuditOptions(shard_rows=50, quiet=True, resume=True))


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ncguard", "audit", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kwargs)


def test_ctrl_c_leaves_finished_shards_and_resume_completes(digits_model_path, tmp_path):
    out = tmp_path / "out"
    args = [digits_model_path, "--data", "digits:train", "--out", out, "--shard-rows", "5", "--workers", "1", "--no-report"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ncguard", "audit", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a suite started in the background (`make test &`, nohup) has SIGINT ignored, the child inherits
        # that and Python then never raises KeyboardInterrupt: give the child Ctrl-C's default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(list((out / "rows").glob("part-*.parquet"))) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    finished = sorted((out / "rows").glob("part-*.parquet"))
    assert 5 <= len(finished) < 270
    for path in finished:
        pq.read_table(path)  # whole files only
    assert not list((out / "rows").glob(".*.tmp"))
    resumed = _cli(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((out / "rows").glob("part-*.parquet"))) == 270
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 1347 and summary["run"]["shards_resumed"] >= len(finished)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "no/such/file.npy"], "no such file or folder"),
        (["--data", "cifar10"], "unknown audit source"),
        (["--data", "parquet:no/such.parquet#x"], "no such Parquet"),
        (["--data", "{bad_npy}"], "the model takes a batch"),
        (["--data", "parquet:{parquet}#nope"], "has no column 'nope'"),
        (["--data", "digits:test", "--address", "127.0.0.1:1"], "needs --engine ray"),
        (["--data", "digits:test", "--workers", "0"], "--workers must be at least 1"),
        (["--data", "{pickled}"], "object arrays are refused"),
    ],
)
def test_bad_input_gets_a_clear_error(digits_model_path, sources, tmp_path, args, message):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5), np.float32))
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    args = [a.format(bad_npy=bad, parquet=sources["root"] / "arrays.parquet", pickled=pickled) for a in args]
    result = _cli(digits_model_path, *args, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and message in result.stderr and "Traceback" not in result.stderr
