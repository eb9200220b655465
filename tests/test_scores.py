"""OOD scores: known answers, independent references (scipy, scikit-learn), errors, separation."""

import numpy as np
import pytest
from scipy import special, stats as scipy_stats
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from ncguard.errors import ConfigError, DataError
from ncguard.scores import Detector, SCORES, make_detector, one_layer
from ncguard.scores.ddu import JITTER_LADDER, lift_small_eigenvalues
from ncguard.scores.knn import default_k
from ncguard.scores.vim import principal_dim
from ncguard.stats import ClassStatistics, StatisticsBundle

FEATURE_SCORES = sorted(name for name, cls in SCORES.items() if cls.uses_features)
LOGIT_ONLY = sorted(name for name, cls in SCORES.items() if not cls.uses_features)


def simplex_etf(n_classes: int, width: int) -> np.ndarray:
    """Rows: the C unit vectors of a simplex ETF, embedded in `width` dimensions."""
    etf = np.sqrt(n_classes / (n_classes - 1)) * (np.eye(n_classes) - 1.0 / n_classes)
    return np.c_[etf, np.zeros((n_classes, width - n_classes))]


def gaussian_clusters(n=1500, n_classes=4, width=16, spread=0.5, seed=0):
    """ID data: isotropic Gaussian classes around orthogonal means of norm 6 in the first C axes."""
    rng = np.random.default_rng(seed)
    means = np.zeros((n_classes, width))
    means[np.arange(n_classes), np.arange(n_classes)] = 6.0
    labels = np.r_[np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)]
    return means[labels] + spread * rng.standard_normal((n, width)), labels


@pytest.fixture(scope="module")
def fitted():
    features, labels = gaussian_clusters()
    stats = ClassStatistics(4, bank_size=512, seed=1).fit(features, labels)
    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    return stats, classifier.coef_, classifier.intercept_, features, labels


# ---------------------------------------------------------------------- known answers


def test_collapsed_etf_means_score_zero_at_the_means():
    """Zero within-class spread at exact simplex-ETF means: etf and mahalanobis are 0 there."""
    means = 3.0 * simplex_etf(4, 6)
    labels = np.repeat(np.arange(4), 5)
    stats = ClassStatistics(4).fit(means[labels], labels)
    etf = make_detector("etf").fit(stats)
    maha = make_detector("mahalanobis").fit(stats)
    np.testing.assert_allclose(etf.score(features=means), 0.0, atol=1e-12)
    np.testing.assert_allclose(maha.score(features=means), 0.0, atol=1e-12)
    # Elsewhere etf is higher: between two classes, at the origin's neighbours, off the simplex.
    elsewhere = np.stack([means[0] + means[1], np.eye(6)[5], -means[2], means[0] + 2.0 * np.eye(6)[4]])
    assert np.all(etf.score(features=elsewhere) > 0.1)
    # The ETF geometry: the cosine between two means is -1/(C-1), so the midpoint of two
    # means has cos = sqrt((1 - 1/3) / 2) to each.
    np.testing.assert_allclose(etf.score(features=elsewhere[:1]), 1 - np.sqrt(1 / 3), rtol=1e-12)
    np.testing.assert_allclose(etf.score(features=-means[2:3]), 1 - 1 / 3, rtol=1e-12)


def test_mahalanobis_matches_direct_formula(fitted):
    stats, *_ = fitted
    queries = np.random.default_rng(3).normal(scale=4.0, size=(20, 16))
    inverse = np.linalg.inv(stats.covariance_)
    expected = np.array([min((q - m) @ inverse @ (q - m) for m in stats.means_) for q in queries])
    np.testing.assert_allclose(make_detector("mahalanobis").fit(stats).score(features=queries), expected, rtol=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_logit_scores_match_scipy(temperature):
    logits = np.random.default_rng(4).normal(scale=10.0, size=(50, 7))
    logits[0] = [800.0, 799.0, -5, 0, 0, 0, 0]  # would overflow a naive exp
    energy = make_detector("energy", temperature=temperature).score(logits=logits)
    np.testing.assert_allclose(energy, -temperature * special.logsumexp(logits / temperature, axis=1), rtol=1e-12)
    msp = make_detector("msp").score(logits=logits)
    np.testing.assert_allclose(msp, -special.softmax(logits, axis=1).max(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(make_detector("maxlogit").score(logits=logits), -logits.max(axis=1))


def test_knn_matches_brute_force_nearest_neighbors(fitted):
    stats, *_ = fitted
    queries = np.random.default_rng(5).normal(scale=3.0, size=(40, 16))
    for k in (1, 7, None):
        detector = make_detector("knn", k=k).fit(stats)
        bank = stats.bank_ / np.linalg.norm(stats.bank_, axis=1, keepdims=True)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        neighbours = NearestNeighbors(n_neighbors=detector.k_, algorithm="brute").fit(bank)
        distances, _ = neighbours.kneighbors(unit)
        np.testing.assert_allclose(detector.score(features=queries), distances[:, -1], atol=1e-7)
    assert detector.k_ == default_k(512) == 1


def test_knn_default_k_follows_the_subsampling_rule():
    assert [default_k(size) for size in (10, 1499, 2048, 50_000)] == [1, 1, 2, 50]


def test_ddu_matches_scipy_mixture_of_gaussians():
    rng = np.random.default_rng(6)
    labels = np.r_[np.zeros(40, int), np.ones(60, int), np.full(30, 2)]
    features = rng.normal(size=(130, 3)) @ rng.normal(size=(3, 3)) + 2.0 * labels[:, None]
    stats = ClassStatistics(3).fit(features, labels)
    detector = make_detector("ddu").fit(stats)
    np.testing.assert_array_equal(detector.jitters_, 0.0)
    queries = rng.normal(scale=3.0, size=(25, 3))
    priors = np.bincount(labels) / len(labels)
    density = sum(
        priors[c] * scipy_stats.multivariate_normal(stats.means_[c], stats.class_covariances_[c]).pdf(queries)
        for c in range(3)
    )
    np.testing.assert_allclose(detector.score(features=queries), -np.log(density), rtol=1e-9)
    # Far away the density underflows to 0 in scipy's pdf, yet the log-space score stays finite.
    assert np.all(np.isfinite(detector.score(features=np.full((2, 3), 1e3))))


def test_lowrank_ddu_is_a_mixture_of_probabilistic_pca_with_a_shared_subspace():
    """Against scipy: each class a Gaussian with covariance B S_c B^T + s_c (I - B B^T), as documented."""
    rng = np.random.default_rng(16)
    labels = np.repeat(np.arange(3), [50, 70, 40])
    features = rng.normal(size=(160, 6)) @ rng.normal(size=(6, 6)) + 3.0 * rng.normal(size=(3, 6))[labels]
    stats = ClassStatistics(3).fit(features, labels)
    detector = make_detector("ddu-lowrank", rank=2).fit(stats)
    basis = np.linalg.eigh(stats.covariance_)[1][:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(basis.T @ detector.basis_), np.eye(2), atol=1e-9)  # same subspace
    outside = np.eye(6) - basis @ basis.T
    priors = np.bincount(labels) / len(labels)
    queries = rng.normal(scale=4.0, size=(30, 6))
    density = 0.0
    for c in range(3):
        inside = basis.T @ stats.class_covariances_[c] @ basis
        residual = (np.trace(stats.class_covariances_[c]) - np.trace(inside)) / 4
        covariance = basis @ inside @ basis.T + residual * outside
        density = density + priors[c] * scipy_stats.multivariate_normal(stats.means_[c], covariance).pdf(queries)
    np.testing.assert_allclose(detector.score(features=queries), -np.log(density), rtol=1e-9)


def test_lowrank_ddu_at_full_rank_is_ddu(fitted):
    stats, _, _, features, _ = fitted
    full = make_detector("ddu").fit(stats).score(features=features[:50])
    np.testing.assert_allclose(make_detector("ddu-lowrank", rank=16).fit(stats).score(features=features[:50]), full, rtol=1e-9)
    np.testing.assert_allclose(make_detector("ddu-lowrank", rank=99).fit(stats).score(features=features[:50]), full, rtol=1e-9)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="rank must be a whole number"):
            make_detector("ddu-lowrank", rank=bad).fit(stats)


def test_ddu_picks_the_smallest_jitter_that_works():
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(50, int), [1]]  # class 1 has one sample: zero covariance
    features = rng.normal(size=(51, 4))
    detector = make_detector("ddu").fit(ClassStatistics(2).fit(features, labels))
    assert detector.jitters_[0] == 0.0
    assert detector.jitters_[1] == JITTER_LADDER[1] == 1e-12
    assert np.all(np.isfinite(detector.score(features=features)))


def test_vim_matches_direct_formula(fitted):
    stats, weight, bias, features, labels = fitted
    # A bank as large as the data makes alpha the paper's training-set ratio exactly.
    full = ClassStatistics(4, bank_size=len(features)).fit(features, labels)
    detector = make_detector("vim").fit(one_layer(full, weight, bias))
    # Singular values below the matrix-rank tolerance (max(C, D) * eps of the largest) are round-off:
    # this logistic-regression head's rows sum to zero, so it has rank C - 1 (tests/test_score_numerics.py).
    u_left, singular, v_right = np.linalg.svd(weight, full_matrices=False)
    keep = singular > singular.max() * max(weight.shape) * np.finfo(np.float64).eps
    origin = -(v_right[keep].T / singular[keep]) @ (u_left[:, keep].T @ bias)
    centred = features - origin
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(features))
    residual_space = eigenvectors[:, np.argsort(eigenvalues)[: 16 - 8]]  # D=16 keeps D/2 principal
    logits = features @ weight.T + bias
    alpha = logits.max(axis=1).mean() / np.linalg.norm(centred @ residual_space, axis=1).mean()
    queries = np.random.default_rng(8).normal(scale=4.0, size=(30, 16))
    query_logits = queries @ weight.T + bias
    residual = np.linalg.norm((queries - origin) @ residual_space, axis=1)
    expected = alpha * residual - special.logsumexp(query_logits, axis=1)
    np.testing.assert_allclose(detector.score(features=queries, logits=query_logits), expected, rtol=1e-8)
    np.testing.assert_allclose(detector.alpha_, alpha, rtol=1e-10)
    assert [principal_dim(d) for d in (16, 767, 768, 2047, 2048)] == [8, 383, 512, 512, 1000]


def test_neco_matches_scaler_plus_pca(fitted):
    stats, weight, bias, features, labels = fitted
    scaler = StandardScaler().fit(features)
    pca = PCA(n_components=3).fit(scaler.transform(features))  # C - 1 = 3 components
    queries = np.random.default_rng(9).normal(scale=4.0, size=(30, 16))
    query_logits = queries @ weight.T + bias
    standardised = scaler.transform(queries)
    ratio = np.linalg.norm(pca.transform(standardised), axis=1) / np.linalg.norm(standardised, axis=1)
    detector = make_detector("neco").fit(one_layer(stats, weight, bias))
    np.testing.assert_allclose(
        detector.score(features=queries, logits=query_logits), -ratio * query_logits.max(axis=1), rtol=1e-8
    )
    bare = make_detector("neco", use_max_logit=False).fit(one_layer(stats, weight, bias))
    np.testing.assert_allclose(bare.score(features=queries, logits=query_logits), -ratio, rtol=1e-8)


def test_nci_matches_direct_formula(fitted):
    stats, weight, bias, features, labels = fitted
    queries = np.random.default_rng(10).normal(scale=4.0, size=(30, 16))
    query_logits = queries @ weight.T + bias

    def proximity(h, h_logits):
        centred = h - features.mean(axis=0)
        w = weight[h_logits.argmax(axis=1)]
        return np.einsum("nd,nd->n", centred, w) / np.linalg.norm(centred, axis=1)

    explicit = make_detector("nci", alpha=1e-2).fit(one_layer(stats, weight, bias))
    expected = -(proximity(queries, query_logits) + 1e-2 * np.abs(queries).sum(axis=1))
    np.testing.assert_allclose(explicit.score(features=queries, logits=query_logits), expected, rtol=1e-9)

    bank = stats.bank_
    bank_logits = bank @ weight.T + bias
    alpha = proximity(bank, bank_logits).std() / np.abs(bank).sum(axis=1).std()
    matched = make_detector("nci", alpha="scale-matched").fit(one_layer(stats, weight, bias))
    np.testing.assert_allclose(matched.alpha_, alpha, rtol=1e-9)
    assert make_detector("nci").fit(one_layer(stats, weight, bias)).alpha_ == 0.0  # the default (NCI docstring)


# ---------------------------------------------------------------------- separation


def test_feature_scores_separate_far_points(fitted):
    """ID Gaussian clusters vs points far from every cluster: AUROC > 0.95 for each feature score.

    The OOD points lie off the subspace spanned by the class means, at a norm similar to ID
    points (distance to the nearest cluster ~ 6.7, about 3 times the ID spread): the geometry
    NECO (NC5, ID/OOD orthogonality) and NCI (OOD not farther from the origin) assume.
    """
    stats, weight, bias, _, _ = fitted
    id_features, _ = gaussian_clusters(n=400, seed=11)
    rng = np.random.default_rng(12)
    directions = rng.standard_normal((400, 16))
    directions[:, :4] = 0.0
    ood_features = 3.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    truth = np.r_[np.zeros(400), np.ones(400)]
    for name in FEATURE_SCORES:
        detector = make_detector(name).fit(one_layer(stats, weight, bias))
        scores = [detector.score(features=f, logits=f @ weight.T + bias) for f in (id_features, ood_features)]
        assert roc_auc_score(truth, np.concatenate(scores)) > 0.95, name


# ---------------------------------------------------------------------- interface and errors


def test_registry_and_params(fitted):
    stats, weight, bias, features, _ = fitted
    assert set(SCORES) == {"etf", "mahalanobis", "energy", "msp", "maxlogit", "knn", "ddu", "ddu-lowrank", "vim", "nci", "neco"}
    for name, cls in SCORES.items():
        assert issubclass(cls, Detector) and cls.name == name
        detector = make_detector(name)
        assert detector.fit(one_layer(stats, weight, bias)) is detector
        params = detector.params()
        for key, value in params.items():
            assert key.endswith("_") and isinstance(value, np.ndarray)
            assert np.all(np.isfinite(value)), (name, key)
        if cls.uses_features:
            assert params, name
        result = detector.score(features=features[:5], logits=features[:5] @ weight.T + bias)
        assert result.shape == (5,) and result.dtype == np.float64


def test_adding_a_score_is_one_new_file(tmp_path, monkeypatch):
    """`discover_scores` finds a score from its file alone, and refuses two scores with one name."""
    import importlib

    from ncguard.scores import discover_scores

    package = tmp_path / "extra_scores"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("from ncguard.scores.base import Detector\n")  # imported, not defined here
    (package / "norm.py").write_text(
        "import numpy as np\n"
        "from ncguard.scores.base import Detector\n"
        "class FeatureNorm(Detector):\n"
        "    name = 'feature-norm'\n"
        "    uses_features = True\n"
        "    def _fit(self, stats, weight, bias):\n"
        "        pass\n"
        "    def _score(self, features, logits):\n"
        "        return np.linalg.norm(features, axis=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover_scores(importlib.import_module("extra_scores"))
    assert list(found) == ["feature-norm"]
    rows = np.array([[3.0, 4.0], [0.0, 1.0]])
    stats = ClassStatistics(2).fit(rows, np.array([0, 1]))
    assert np.allclose(found["feature-norm"](layer="features").fit(stats).score(rows), [5.0, 1.0])

    (package / "again.py").write_text("from ncguard.scores.base import Detector\nclass Other(Detector):\n    name = 'feature-norm'\n")
    with pytest.raises(ConfigError, match="two scores are named 'feature-norm'"):
        discover_scores(importlib.import_module("extra_scores"))


def test_unknown_score_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown score 'odin'"):
        make_detector("odin")
    with pytest.raises(ConfigError, match="bad options for score 'knn'"):
        make_detector("knn", neighbours=3)


@pytest.mark.parametrize("name", FEATURE_SCORES)
def test_scoring_before_fit_is_a_config_error(name):
    with pytest.raises(ConfigError, match="must be fitted"):
        make_detector(name).score(features=np.zeros((1, 16)), logits=np.zeros((1, 4)))


@pytest.mark.parametrize("name", FEATURE_SCORES)
def test_wrong_widths_are_data_errors(name, fitted):
    stats, weight, bias, *_ = fitted
    detector = make_detector(name).fit(one_layer(stats, weight, bias))
    with pytest.raises(DataError, match="features have width 15"):
        detector.score(features=np.zeros((2, 15)), logits=np.zeros((2, 4)))
    if SCORES[name].uses_logits:
        with pytest.raises(DataError, match="logits have width 5"):
            detector.score(features=np.zeros((2, 16)), logits=np.zeros((2, 5)))
        with pytest.raises(DataError, match="needs logits"):
            detector.score(features=np.zeros((2, 16)))


@pytest.mark.parametrize("name", LOGIT_ONLY)
def test_logit_scores_need_logits(name):
    with pytest.raises(DataError, match="needs logits"):
        make_detector(name).score(features=np.zeros((2, 3)))
    with pytest.raises(DataError, match="NaN"):
        make_detector(name).score(logits=np.array([[np.nan, 1.0]]))


def test_scores_that_need_a_classifier_say_so(fitted):
    stats, weight, *_ = fitted
    for name in ("vim", "nci"):
        with pytest.raises(ConfigError, match="needs the classifier weight"):
            make_detector(name).fit(stats)
    with pytest.raises(DataError, match="weight has shape"):
        make_detector("vim").fit(one_layer(stats, weight[:, :3]))


def test_fit_needs_finalized_statistics_and_valid_options(fitted):
    stats, weight, bias, features, labels = fitted
    with pytest.raises(ConfigError, match="finalized ClassStatistics"):
        make_detector("etf").fit(ClassStatistics(4))
    with pytest.raises(ConfigError, match="knn k must be"):
        make_detector("knn", k=10_000).fit(stats)
    with pytest.raises(ConfigError, match="per_class_covariance=True"):
        make_detector("ddu").fit(ClassStatistics(4, per_class_covariance=False).fit(features, labels))
    with pytest.raises(ConfigError, match="n_principal"):
        make_detector("vim", n_principal=16).fit(one_layer(stats, weight, bias))
    with pytest.raises(ConfigError, match="temperature"):
        make_detector("energy", temperature=0.0).score(logits=np.zeros((1, 2)))


def test_ddu_lifts_round_off_variances_so_the_score_ignores_them():
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1], 200)
    features = np.c_[rng.normal(size=(400, 3)) + 3.0 * labels[:, None], np.zeros(400)]  # a 4th, constant dimension
    detector = make_detector("ddu").fit(ClassStatistics(2).fit(features, labels))
    queries = features[:5].copy()
    nudged = queries.copy()
    nudged[:, 3] += 1e-7  # float32-sized noise in the direction no class varies in
    np.testing.assert_allclose(detector.score(features=nudged), detector.score(features=queries), rtol=1e-6)
    np.testing.assert_array_equal(lift_small_eigenvalues(np.eye(3)), np.eye(3))  # a healthy covariance is untouched


# ---------------------------------------------------------------------- the detector contract


def test_a_single_score_follows_the_detector_contract(fitted):
    """layers, the mapping and shorthand forms of score, calibrate from scores or features, is_ood, explain."""
    stats, weight, bias, features, _ = fitted
    detector = make_detector("vim").fit(one_layer(stats, weight, bias))
    assert detector.layers == ("features", "logits") and detector.layer is None and detector.layer_ == "features"
    logits = features @ weight.T + bias
    scores = detector.score({"features": features, "logits": logits})
    np.testing.assert_array_equal(scores, detector.score(features=features, logits=logits))
    np.testing.assert_array_equal(detector.component_scores(features, logits)[:, 0], scores)
    assert detector.component_names() == ["features:vim"]
    threshold = detector.calibrate(scores, 0.9).threshold_
    assert detector.calibrate({"features": features, "logits": logits}, 0.9).threshold_ == threshold
    assert np.mean(detector.is_ood(features, logits)) <= 0.1 and detector.tpr_ == 0.9
    assert set(detector.params()) == {"alpha_", "n_classes_", "origin_", "residual_basis_"}  # bookkeeping left out
    with pytest.raises(ConfigError, match="calibrate"):
        make_detector("etf").fit(stats).is_ood(features)
    with pytest.raises(ConfigError, match="fit it first or name the layer"):
        make_detector("etf").layers
    assert make_detector("etf", layer="detection").layers == ("detection",) and make_detector("msp").layers == ("logits",)


def test_the_classifier_reaches_only_the_layer_it_acts_on(fitted):
    """A bundle's classifier acts on one layer; a score that needs it cannot read another one."""
    stats, weight, bias, *_ = fitted
    bundle = StatisticsBundle(layers={"detection": stats, "block1": stats}, weight=weight, bias=bias, classes=tuple("abcd"))
    assert make_detector("vim").fit(bundle).layer_ == "detection"
    with pytest.raises(ConfigError, match="cannot read layer 'block1'.*the classifier acts on 'detection'"):
        make_detector("vim", layer="block1").fit(bundle)
    assert make_detector("etf", layer="block1").fit(bundle).layer_ == "block1"
