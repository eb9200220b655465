"""ClassStatistics (streaming moments, bank) and StatisticsBundle (file format, checksum)."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.stats import ClassStatistics, StatisticsBundle, pinv_rtol

N_CLASSES, WIDTH = 3, 5


def make_data(n=400, seed=0, offset=1e3):
    """Features with a large common offset: naive sums of squares would lose the spread."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)]
    means = rng.normal(scale=3.0, size=(N_CLASSES, WIDTH)) + offset
    scales = rng.uniform(0.5, 2.0, size=(N_CLASSES, WIDTH))
    features = means[labels] + scales[labels] * rng.standard_normal((n, WIDTH))
    return features, labels


def fit_in_chunks(features, labels, bounds, **kwargs):
    stats = ClassStatistics(N_CLASSES, **kwargs)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        stats.partial_fit(features[start:stop], labels[start:stop])
    return stats.finalize()


MOMENTS = ("counts_", "means_", "global_mean_", "covariance_", "class_covariances_", "second_moment_", "feature_std_")


def test_moments_match_direct_numpy():
    features, labels = make_data()
    stats = ClassStatistics(N_CLASSES).fit(features, labels)
    counts = np.bincount(labels, minlength=N_CLASSES)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(N_CLASSES)])
    class_cov = np.stack([np.cov(features[labels == c], rowvar=False, ddof=0) for c in range(N_CLASSES)])
    centred = features - means[labels]
    np.testing.assert_array_equal(stats.counts_, counts)
    np.testing.assert_allclose(stats.means_, means, rtol=1e-12)
    np.testing.assert_allclose(stats.global_mean_, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance_, centred.T @ centred / len(features), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.class_covariances_, class_cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.second_moment_, features.T @ features / len(features), rtol=1e-12)
    np.testing.assert_allclose(stats.feature_std_, features.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.precision_, np.linalg.pinv(stats.covariance_), rtol=1e-8)
    assert stats.covariance_.dtype == np.float64


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_chunking_gives_the_same_moments_and_bank(cuts):
    features, labels = make_data()
    whole = ClassStatistics(N_CLASSES, bank_size=50, seed=7).fit(features, labels)
    chunked = fit_in_chunks(features, labels, [0, *sorted(cuts), len(features)], bank_size=50, seed=7)
    for name in MOMENTS:
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_array_equal(chunked.bank_, whole.bank_)
    np.testing.assert_array_equal(chunked.bank_labels_, whole.bank_labels_)


def test_bank_is_a_reproducible_sample_of_the_rows():
    features, labels = make_data()
    first = ClassStatistics(N_CLASSES, bank_size=64, seed=3).fit(features, labels)
    again = ClassStatistics(N_CLASSES, bank_size=64, seed=3).fit(features, labels)
    other = ClassStatistics(N_CLASSES, bank_size=64, seed=4).fit(features, labels)
    np.testing.assert_array_equal(first.bank_, again.bank_)
    assert not np.array_equal(first.bank_, other.bank_)
    assert first.bank_.shape == (64, WIDTH) and first.bank_labels_.shape == (64,)
    rows = {row.tobytes(): label for row, label in zip(features, labels)}
    picked = [row.tobytes() for row in first.bank_]
    assert len(set(picked)) == 64  # without replacement
    assert all(rows[key] == label for key, label in zip(picked, first.bank_labels_))


def test_bank_keeps_everything_when_smaller_than_its_size():
    features, labels = make_data(n=30)
    stats = ClassStatistics(N_CLASSES, bank_size=2048).fit(features, labels)
    order = np.lexsort(stats.bank_.T)
    np.testing.assert_array_equal(stats.bank_[order], features[np.lexsort(features.T)])


def test_bank_is_uniform_over_positions():
    """Each of 40 stream positions should be picked with probability 10/40 (checked over 800 seeds)."""
    n, size, seeds = 40, 10, 800
    features = np.arange(n, dtype=float)[:, None]
    labels = np.zeros(n, dtype=int)
    hits = np.zeros(n)
    for seed in range(seeds):
        bank = fit_chunked_single_class(features, labels, size, seed)
        hits[bank.astype(int)] += 1
    expected = seeds * size / n
    sd = np.sqrt(seeds * (size / n) * (1 - size / n))
    assert np.all(np.abs(hits - expected) < 5 * sd), hits
    # The first and the last positions are no more likely than the middle ones.
    assert abs(hits[:10].mean() - hits[-10:].mean()) < 3 * sd


def fit_chunked_single_class(features, labels, size, seed):
    stats = ClassStatistics(1, bank_size=size, seed=seed, per_class_covariance=False)
    for start in range(0, len(features), 7):
        stats.partial_fit(features[start : start + 7], labels[start : start + 7])
    return stats.finalize().bank_[:, 0]


def test_tied_only_statistics_have_no_class_covariances():
    features, labels = make_data()
    stats = ClassStatistics(N_CLASSES, per_class_covariance=False).fit(features, labels)
    assert not hasattr(stats, "class_covariances_")
    assert "class_covariances" not in stats.to_arrays()


def test_pinv_drops_directions_without_variance():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    features = np.c_[rng.standard_normal((200, 2)), np.zeros(200)]  # third feature is constant
    stats = ClassStatistics(2).fit(features, labels)
    assert np.all(stats.precision_[2] == 0) and np.all(stats.precision_[:, 2] == 0)
    np.testing.assert_allclose(stats.precision_[:2, :2], np.linalg.inv(stats.covariance_[:2, :2]), rtol=1e-10)
    assert pinv_rtol(512) == 512 * np.finfo(np.float64).eps


@pytest.mark.parametrize(
    "features, labels, message",
    [
        (np.zeros((4, 2)), np.array([0, 1, 2, 3]), "label 3 is out of range"),
        (np.zeros((2, 2)), np.array([0, -1]), "label -1 is out of range"),
        (np.zeros((3, 2)), np.array([0, 1]), "3 feature rows but 2 labels"),
        (np.zeros(3), np.array([0, 1, 2]), "2-D"),
        (np.array([[np.nan, 1.0]]), np.array([0]), "NaN"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integers"),
    ],
)
def test_bad_chunks_raise_data_error(features, labels, message):
    with pytest.raises(DataError, match=message):
        ClassStatistics(3).partial_fit(features, labels)


def test_width_change_between_chunks_is_an_error():
    stats = ClassStatistics(2).partial_fit(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(DataError, match="width changed.*expected 3, got 4"):
        stats.partial_fit(np.zeros((2, 4)), np.array([0, 1]))


def test_finalize_without_data_is_an_error():
    with pytest.raises(DataError, match="no features"):
        ClassStatistics(2).finalize()
    with pytest.raises(DataError, match="no features"):
        ClassStatistics(2).partial_fit(np.zeros((0, 3)), np.zeros(0, dtype=int)).finalize()


def test_empty_class_is_an_error_naming_it():
    features, labels = make_data()
    keep = labels != 1
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no samples"):
        ClassStatistics(N_CLASSES).fit(features[keep], labels[keep])


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="n_classes"):
        ClassStatistics(0).partial_fit(np.zeros((1, 2)), np.array([0]))
    with pytest.raises(ConfigError, match="bank_size"):
        ClassStatistics(2, bank_size=-1).partial_fit(np.zeros((1, 2)), np.array([0]))


def test_fit_starts_afresh():
    features, labels = make_data()
    stats = ClassStatistics(N_CLASSES)
    stats.fit(features[:100], labels[:100])
    stats.fit(features, labels)
    np.testing.assert_array_equal(stats.counts_, np.bincount(labels))


def test_arrays_round_trip_and_continue_fitting():
    features, labels = make_data()
    half = ClassStatistics(N_CLASSES, bank_size=40, seed=2).fit(features[:150], labels[:150])
    restored = ClassStatistics.from_arrays(half.to_arrays())
    for name in (*MOMENTS, "precision_", "bank_", "bank_labels_"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(half, name), err_msg=name)
    restored.partial_fit(features[150:], labels[150:]).finalize()
    whole = ClassStatistics(N_CLASSES, bank_size=40, seed=2).fit(features, labels)
    for name in MOMENTS:
        np.testing.assert_allclose(getattr(restored, name), getattr(whole, name), rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_array_equal(restored.bank_, whole.bank_)


def test_derived_arrays_are_recomputed_not_stored_and_older_files_still_load():
    features, labels = make_data()
    stats = ClassStatistics(N_CLASSES).fit(features, labels)
    arrays = stats.to_arrays()
    assert not {"precision", "second_moment", "feature_std"} & set(arrays)
    restored = ClassStatistics.from_arrays(arrays)
    for name in ("precision_", "second_moment_", "feature_std_"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(stats, name), err_msg=name)
    # a file written before: the stored arrays are what it loads with
    older = {**arrays, "precision": np.eye(WIDTH), "second_moment": stats.second_moment_, "feature_std": stats.feature_std_}
    loaded = ClassStatistics.from_arrays(older)
    np.testing.assert_array_equal(loaded.precision_, np.eye(WIDTH))
    assert set(loaded.to_arrays()) == set(older)  # written back as it was, so its checksum does not change


def test_from_arrays_rejects_missing_or_misshapen_arrays():
    features, labels = make_data()
    arrays = ClassStatistics(N_CLASSES).fit(features, labels).to_arrays()
    with pytest.raises(ModelError, match="missing arrays: means"):
        ClassStatistics.from_arrays({k: v for k, v in arrays.items() if k != "means"})
    with pytest.raises(ModelError, match="'covariance' has shape"):
        ClassStatistics.from_arrays({**arrays, "covariance": np.zeros((2, 2))})


# ---------------------------------------------------------------------- bundle


def make_bundle():
    features, labels = make_data()
    rng = np.random.default_rng(5)
    detection = rng.standard_normal((len(features), 4))
    return StatisticsBundle(
        layers={
            "transfer": ClassStatistics(N_CLASSES, bank_size=32).fit(features, labels),
            "detection": ClassStatistics(N_CLASSES, per_class_covariance=False).fit(detection, labels),
        },
        weight=rng.standard_normal((N_CLASSES, 4)),
        bias=rng.standard_normal(N_CLASSES),
        classes=("cat", "dog", "bird"),
        meta={"run_id": "abc", "epochs": 3},
    )


def test_bundle_round_trip(tmp_path: Path):
    bundle = make_bundle()
    path = tmp_path / "stats.npz"
    checksum = bundle.save(path)
    assert checksum == bundle.checksum() and len(checksum) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temp file left behind
    loaded = StatisticsBundle.load(path)
    assert loaded.classes == bundle.classes and loaded.meta == bundle.meta
    assert set(loaded.layers) == {"transfer", "detection"}
    np.testing.assert_array_equal(loaded.weight, bundle.weight)
    np.testing.assert_array_equal(loaded.bias, bundle.bias)
    for name in ("transfer", "detection"):
        for key, array in bundle.layers[name].to_arrays().items():
            np.testing.assert_array_equal(loaded.layers[name].to_arrays()[key], array)
    assert loaded.checksum() == checksum
    with np.load(path, allow_pickle=False) as npz:
        assert "layer/transfer/means" in npz.files and str(npz["checksum"]) == checksum
        assert json.loads(str(npz["meta"][0])) == bundle.meta


def test_checksum_changes_with_content():
    bundle = make_bundle()
    before = bundle.checksum()
    bundle.bias = bundle.bias + 1e-9
    assert bundle.checksum() != before


def test_tampered_bundle_is_refused(tmp_path: Path):
    path = tmp_path / "stats.npz"
    make_bundle().save(path)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["layer/transfer/means"] = arrays["layer/transfer/means"] + 0.5
    np.savez(path, **arrays)
    with pytest.raises(ModelError, match="does not match its checksum"):
        StatisticsBundle.load(path)
    del arrays["checksum"]
    np.savez(path, **arrays)
    with pytest.raises(ModelError, match="no checksum"):
        StatisticsBundle.load(path)


def test_unreadable_or_missing_bundle_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        StatisticsBundle.load(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match="cannot read"):
        StatisticsBundle.load(junk)


def test_inconsistent_bundle_cannot_be_saved(tmp_path: Path):
    bundle = make_bundle()
    bundle.classes = ("cat", "dog")
    with pytest.raises(DataError, match="3 classes but 2 class names"):
        bundle.save(tmp_path / "stats.npz")
    bundle = make_bundle()
    bundle.meta = {"bad": object()}
    with pytest.raises(DataError, match="JSON"):
        bundle.save(tmp_path / "stats.npz")
    assert list(tmp_path.iterdir()) == []
