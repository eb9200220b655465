"""The fused multi-layer score (NumPy reference): formula by hand, the detector contract, errors."""

import numpy as np
import pytest

from ncguard.errors import ConfigError, DataError
from ncguard.scores import SCORE_NAMES, SCORES, Fused, build_detector, make_detector
from ncguard.scores.fused import fused_components, parse_components
from ncguard.stats import ClassStatistics, StatisticsBundle

N_CLASSES = 3


def _layers(n, seed):
    """Two synthetic layers with class structure: a 'block1' [n, 6] and a 'detection' [n, 4]."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)]
    block_means = rng.normal(0, 3, (N_CLASSES, 6))
    det_means = 5 * np.eye(N_CLASSES, 4)
    features = {
        "block1": block_means[labels] + rng.normal(0, 1, (n, 6)),
        "detection": det_means[labels] + rng.normal(0, 0.7, (n, 4)),
    }
    return features, labels


@pytest.fixture(scope="module")
def setup():
    train, labels = _layers(600, 0)
    held_out, _ = _layers(200, 1)
    test, _ = _layers(50, 2)
    test = {k: np.r_[v, np.random.default_rng(3).normal(0, 8, (10, v.shape[1]))] for k, v in test.items()}
    stats = {layer: ClassStatistics(N_CLASSES, bank_size=64).fit(x, labels) for layer, x in train.items()}
    weight = np.random.default_rng(4).normal(size=(N_CLASSES, 4))
    bias = np.array([0.1, -0.2, 0.3])
    logits = {name: x["detection"] @ weight.T + bias for name, x in (("held_out", held_out), ("test", test))}
    return stats, weight, bias, held_out, logits["held_out"], test, logits["test"]


def _bundle(stats, weight, bias):
    return StatisticsBundle(layers=dict(stats), weight=weight, bias=bias, classes=tuple("abc"))


def _fit(setup, components=(("block1", "mahalanobis"), ("detection", "etf")), combine="sum"):
    stats, weight, bias, held_out, held_logits, *_ = setup
    return Fused(components=components, combine=combine).fit(_bundle(stats, weight, bias), {**held_out, "logits": held_logits})


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_formula_matches_a_hand_computation(setup, combine):
    stats, weight, bias, held_out, held_logits, test, test_logits = setup
    fused = _fit(setup, (("block1", "mahalanobis"), ("detection", "etf"), ("logits", "energy")), combine)
    # By hand: each base detector fitted on its layer, standardized by its held-out ID mean / std.
    parts = []
    for layer, name in (("block1", "mahalanobis"), ("detection", "etf"), ("logits", "energy")):
        det = make_detector(name).fit(None if layer == "logits" else stats[layer])  # none of the three needs the classifier
        feats = (lambda d: None if layer == "logits" else d[layer])
        calib = det.score(features=feats(held_out), logits=held_logits)
        raw = det.score(features=feats(test), logits=test_logits)
        parts.append((raw - calib.mean()) / np.sqrt(((calib - calib.mean()) ** 2).mean()))
    expected = np.sum(parts, axis=0) if combine == "sum" else np.max(parts, axis=0)
    np.testing.assert_allclose(fused.score(test, test_logits), expected, rtol=1e-12, atol=1e-12)
    # On the held-out data each standardized component has mean 0 and std 1.
    z = fused.component_scores(held_out, held_logits)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-9)


def test_a_fused_detector_follows_the_detector_contract(setup):
    """layers it reads, the logits inside the mapping or beside it, calibrate/is_ood, explain."""
    _, _, _, held_out, held_logits, test, test_logits = setup
    fused = _fit(setup, (("detection", "etf"), ("block1", "mahalanobis"), ("detection", "vim")))
    assert fused.layers == ("detection", "block1", "logits")  # distinct feature layers in component order, then logits
    assert fused.component_names() == ["detection:etf", "block1:mahalanobis", "detection:vim"]
    np.testing.assert_array_equal(fused.score({**test, "logits": test_logits}), fused.score(test, test_logits))
    assert fused.component_scores(test, test_logits).shape == (len(test_logits), 3)
    assert fused.calibrate({**held_out, "logits": held_logits}, 0.9) is fused
    assert np.mean(fused.is_ood(held_out, held_logits)) <= 0.1 + 1e-9
    assert fused.is_ood(test, test_logits)[50:].all()  # the wide-noise rows
    assert not Fused(components=(("block1", "mahalanobis"),)).layers[-1] == "logits"  # known before fitting


def test_classifier_goes_only_to_the_classifier_layer(setup):
    """vim needs the classifier: it fits on the detection layer, and is refused on block1."""
    _fit(setup, (("detection", "vim"),))
    with pytest.raises(ConfigError, match="block1:vim cannot be fitted"):
        _fit(setup, (("block1", "vim"),))


def test_separates_outliers_better_than_chance(setup):
    *_, test, test_logits = setup
    scores = _fit(setup).score(test, test_logits)
    assert scores[50:].min() > np.median(scores[:50])  # the 10 wide-noise rows score above typical ID


@pytest.mark.parametrize(
    "components, combine, message",
    [
        ((), "sum", "at least one"),
        ((("block1", "nosuch"),), "sum", "unknown score 'nosuch'"),
        ((("block9", "mahalanobis"),), "sum", "no layer 'block9'"),
        ((("block1", "mahalanobis"), ("block1", "mahalanobis")), "sum", "listed twice"),
        ((("block1", "energy"),), "sum", "reads only the logits"),
        ((("logits", "etf"),), "sum", "name the layer"),
        ((("logits", "energy"),), "sum", "at least one feature-based"),
        ((("block1",),), "sum", "pair"),
        ((("block1", "mahalanobis"),), "mean", "combine must be one of"),
        ((("block1", "mahalanobis"), ("detection", "etf")), "joint", "'etf' is not one"),
    ],
)
def test_bad_components_are_refused_clearly(setup, components, combine, message):
    with pytest.raises(ConfigError, match=message):
        _fit(setup, components, combine)


def test_constant_component_is_refused(setup):
    stats, weight, bias, held_out, held_logits, *_ = setup
    flat = {layer: np.zeros_like(x) + stats[layer].means_[0] for layer, x in held_out.items()}
    with pytest.raises(DataError, match="sigma 0"):
        Fused().fit(_bundle(stats, weight, bias), {**flat, "logits": held_logits})


def test_usage_errors(setup):
    stats, weight, bias, *_ = setup
    with pytest.raises(ConfigError, match="held-out ID data"):
        Fused().fit(_bundle(stats, weight, bias))
    with pytest.raises(ConfigError, match="must be fitted"):
        Fused().score({}, np.zeros((1, 3)))
    with pytest.raises(ConfigError, match="fit it first"):
        Fused().layers  # the default components depend on the statistics
    fused = _fit(setup)
    with pytest.raises(DataError, match="'block1'"):
        fused.score({"detection": np.zeros((2, 4))}, np.zeros((2, 3)))
    with pytest.raises(DataError, match="several layers"):
        fused.score(np.zeros((2, 10)), np.zeros((2, 3)))
    with pytest.raises(DataError, match="width"):
        fused.score({"block1": np.zeros((2, 3)), "detection": np.zeros((2, 4))}, np.zeros((2, 3)))


def test_parse_components_and_registry():
    assert parse_components("block1:mahalanobis, detection:etf") == (("block1", "mahalanobis"), ("detection", "etf"))
    with pytest.raises(ConfigError, match="LAYER:SCORE"):
        parse_components("block1")
    assert "fused" in SCORE_NAMES and "fused" not in SCORES
    assert Fused().components is None and not hasattr(Fused(), "mu_")  # None: default_fused at fit time


def test_default_export_components_follow_the_run_layers(setup):
    stats, weight, bias, *_ = setup
    classes = tuple("abc")
    with_block = StatisticsBundle(layers={"block1": stats["block1"], "detection": stats["detection"]}, weight=weight, bias=bias, classes=classes)
    assert fused_components(with_block) == ((("block1", "mahalanobis"), ("detection", "ddu-lowrank")), "sum")  # no joint statistic
    assert fused_components(with_block, "detection:etf,block1:knn", "max") == ((("detection", "etf"), ("block1", "knn")), "max")
    assert fused_components(with_block, "detection:etf")[1] == "sum"  # named components: sum unless told
    without = StatisticsBundle(layers={"detection": stats["detection"]}, weight=weight, bias=bias, classes=classes)
    assert fused_components(without) == ((("detection", "ddu-lowrank"),), "sum")
    with pytest.raises(ConfigError, match="no layer 'block1'"):
        fused_components(without, "block1:mahalanobis")


def test_build_detector_decides_layers_and_defaults_in_one_place(setup):
    stats, weight, bias, *_ = setup
    bundle = _bundle(stats, weight, bias)
    fused = build_detector("fused", bundle)
    assert fused.components == (("block1", "mahalanobis"), ("detection", "ddu-lowrank")) and fused.layers == ("block1", "detection")
    assert build_detector(None, bundle, head="plain").name == "fused" and build_detector(None, bundle, head="l2").name == "ddu"
    assert build_detector("vim", bundle).layers == ("detection", "logits")  # the classifier's layer by default
    assert build_detector("knn", bundle, layer="block1").layers == ("block1",)
    for kwargs, message in (
        ({"name": "etf", "components": "block1:knn"}, "fused only"),
        ({"name": "fused", "layer": "block1"}, "--layer does not apply"),
        ({"name": "etf", "layer": "block7"}, "no layer 'block7'"),
        ({"name": "fusd"}, "unknown score 'fusd'"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_detector(statistics=bundle, **kwargs)


def test_default_components_score_the_last_block_and_every_named_block_on_request():
    from ncguard.scores.fused import default_components

    layers = ("block1", "block2", "block3", "transfer", "detection")
    assert default_components(layers) == (("block3", "mahalanobis"), ("detection", "ddu-lowrank"))
    assert default_components(layers, every_block=True) == (
        ("block1", "mahalanobis"), ("block2", "mahalanobis"), ("block3", "mahalanobis"), ("detection", "ddu-lowrank"))
    assert default_components(("transfer",), "transfer") == (("transfer", "ddu-lowrank"),)  # no block: low-rank DDU alone


def test_joint_combine_adds_negative_log_densities(setup):
    """"joint": 1/2 Mahalanobis (a squared distance) plus DDU (-log p), up to a positive factor and a constant,
    with the weighted parts summing to the score; equal weights after standardization would not be that."""
    stats, weight, bias, held_out, held_logits, test, test_logits = setup
    components = (("block1", "mahalanobis"), ("detection", "ddu-lowrank"))
    fused = _fit(setup, components, "joint")
    by_hand = {}
    for data, name in ((held_out, "held"), (test, "test")):
        by_hand[name] = [make_detector(score, layer=layer).fit(_bundle(stats, weight, bias)).score(data) for layer, score in components]
    spread = np.array([0.5 * by_hand["held"][0].std(), by_hand["held"][1].std()])
    natural = (0.5 * by_hand["test"][0] + by_hand["test"][1]) / spread.mean()
    score = fused.score(test, test_logits)
    offset = score - natural
    np.testing.assert_allclose(offset, offset[0], atol=1e-9 * (1 + np.abs(natural).max()))
    np.testing.assert_allclose(fused.weights_, spread / spread.mean())
    np.testing.assert_allclose(fused.component_scores(test, test_logits).sum(axis=1), score)
    assert not np.allclose(fused.weights_, 1.0)  # the two spreads differ, so "sum" would weigh them otherwise
    described = fused.describe()
    assert described["combine"] == "joint" and [c["weight"] for c in described["components"]] == pytest.approx(list(fused.weights_))
    assert np.allclose(_fit(setup, components, "sum").weights_, 1.0)


def _head_bundle(n, seed=0):
    """A trained run's layers in miniature (block3 [n, 6], transfer [n, 3], detection [n, 4]) with the joint
    statistic `ncguard train` streams (block3 given detection and transfer), fitted on n rows."""
    from ncguard.scores.conditional_mahalanobis import streamed_joint
    from ncguard.stats import joint_features, joint_name

    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)]
    detection = 5 * np.eye(N_CLASSES, 4)[labels] + rng.normal(0, 0.7, (n, 4))
    transfer = detection[:, :3] + rng.normal(0, 0.5, (n, 3))
    block3 = np.c_[transfer, detection[:, :2]] @ rng.normal(size=(5, 6)) + rng.normal(0, 1, (n, 6))
    features = {"block3": block3, "transfer": transfer, "detection": detection}
    layers = {name: ClassStatistics(N_CLASSES, bank_size=32).fit(x, labels) for name, x in features.items()}
    name = joint_name(streamed_joint(tuple(layers)))
    joint = {name: ClassStatistics(N_CLASSES, per_class_covariance=False, bank_size=0).fit(joint_features(features, name), labels)}
    weight = np.random.default_rng(4).normal(size=(N_CLASSES, 4))
    return StatisticsBundle(layers=layers, weight=weight, bias=np.zeros(N_CLASSES), classes=tuple("abc"), joint=joint), features


def test_default_conditions_the_block_on_the_head_when_the_data_allow_it():
    from ncguard.scores.fused import ROWS_PER_COEFFICIENT, default_fused

    needed = ROWS_PER_COEFFICIENT * (3 + 4 + 1)  # the regression of block3 on [detection, transfer, 1]
    bundle, features = _head_bundle(needed)
    assert default_fused(bundle) == ((("block3", "conditional-mahalanobis"), ("detection", "ddu-lowrank")), "joint")
    fused = build_detector("fused", bundle)
    assert fused.combine == "joint" and set(fused.layers) == {"block3", "detection", "transfer"}
    fused.fit(bundle, features)
    assert fused.combine_ == "joint" and np.isfinite(fused.score(features)).all()
    assert build_detector("fused", bundle, combine="sum").combine == "sum"  # a named combine keeps the default components
    # one row short of the rule, no joint statistic, or a classifier on another layer: today's components, summed
    assert default_fused(_head_bundle(needed - 1)[0]) == ((("block3", "mahalanobis"), ("detection", "ddu-lowrank")), "sum")
    bare = StatisticsBundle(layers=bundle.layers, weight=bundle.weight, bias=bundle.bias, classes=bundle.classes)
    assert default_fused(bare)[1] == "sum"
    transfer_classifier = StatisticsBundle(layers=bundle.layers, weight=np.ones((N_CLASSES, 3)), bias=bundle.bias, classes=bundle.classes,
                                           joint=bundle.joint, meta={"classifier_layer": "transfer"})
    assert default_fused(transfer_classifier)[1] == "sum"
