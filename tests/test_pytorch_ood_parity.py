"""ncguard's NumPy scores against an independent implementation, pytorch-ood 0.4.0, on the same features.

For every score both libraries have (MSP, max-logit, energy, Mahalanobis, KNN, NCI, DDU (pytorch-ood's
GMM, the same class-conditional Gaussian density), ViM) the two must rank the same float64 features the
same way (Spearman ~1), and where the formulas coincide once hyper-parameters match, give the same
values to float tolerance (float64 where pytorch-ood computes in float64, float32 where it casts).
NECO is not in pytorch-ood 0.4.0. Temperature scaling (ncguard.temperature) is checked against its
TemperatureScaling detector.

pytorch-ood's package `__init__` imports its datasets and models, which need torchvision (the
PyPI wheel does not install beside our CPU torch). Its detector modules need only torch, numpy,
scipy and typing_extensions, so they are imported from the installed package with the package
object created from its own spec (`importlib.util.spec_from_file_location`, the real directory as
its search path) without running that `__init__`; nothing is stubbed or replaced. Installed by
`make setup` (`pip install --no-deps pytorch-ood==0.4.0`); skipped with a message when absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from ncguard.scores import make_detector, one_layer
from ncguard.stats import ClassStatistics

N_CLASSES, WIDTH, N_TRAIN = 6, 32, 1500


def load_pytorch_ood_detectors():
    """pytorch_ood.detector, imported without executing pytorch_ood/__init__.py (module docstring)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed, and pytorch-ood needs it")
    if "pytorch_ood.detector" in sys.modules:
        return sys.modules["pytorch_ood.detector"]
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None or spec.origin is None:
        pytest.skip("pytorch-ood is not installed: `.venv/bin/pip install --no-deps pytorch-ood==0.4.0` (make setup does)")
    if "pytorch_ood" not in sys.modules:
        package_spec = importlib.util.spec_from_file_location(
            "pytorch_ood", spec.origin, submodule_search_locations=list(spec.submodule_search_locations)
        )
        sys.modules["pytorch_ood"] = importlib.util.module_from_spec(package_spec)
    try:
        return importlib.import_module("pytorch_ood.detector")
    except ImportError as exc:
        pytest.skip(f"pytorch-ood's detector modules are not importable here: {exc}")


@pytest.fixture(scope="module")
def ood():
    return load_pytorch_ood_detectors()


@pytest.fixture(scope="module")
def setting():
    """Gaussian classes (well-conditioned covariance), a multinomial logistic-regression head (its rows sum
    to zero: the case that exposed ViM's origin), ID queries and OOD-ish queries, all float64."""
    rng = np.random.default_rng(0)
    means = 2.5 * rng.normal(size=(N_CLASSES, WIDTH))
    rotation = np.linalg.qr(rng.normal(size=(WIDTH, WIDTH)))[0]
    mixing = np.linspace(0.5, 2.0, WIDTH)[:, None] * rotation  # well-conditioned: spreads 0.5 to 2

    def draw(n):
        labels = np.r_[np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)]
        return means[labels] + rng.normal(size=(n, WIDTH)) @ mixing, labels

    train, labels = draw(N_TRAIN)
    classifier = LogisticRegression(max_iter=3000).fit(train, labels)
    weight, bias = classifier.coef_, classifier.intercept_
    queries = np.concatenate([draw(200)[0], rng.normal(scale=6.0, size=(200, WIDTH)), 3.0 * draw(100)[0]])
    stats = ClassStatistics(N_CLASSES, bank_size=N_TRAIN, seed=0).fit(train, labels)  # the bank holds every feature
    return {"train": train, "labels": labels, "weight": weight, "bias": bias, "queries": queries, "stats": stats}


def tensor(array):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def as_numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy().astype(np.float64)


def assert_agree(ours: np.ndarray, theirs: np.ndarray, *, rtol: float | None, scale: float = 1.0) -> None:
    """Same ranking (Spearman >= 0.9999) and, with `rtol`, the same values (`theirs` times `scale`),
    to rtol of each value plus rtol of the scores' spread (a score near 0 has no relative precision)."""
    assert ours.shape == theirs.shape
    rho = spearmanr(ours, theirs).statistic
    assert rho >= 0.9999, f"Spearman {rho}"
    if rtol is not None:
        expected = scale * theirs
        np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol * float(np.std(expected)))


def test_msp_maxlogit_energy_match_in_float64(ood, setting):
    logits = setting["queries"] @ setting["weight"].T + setting["bias"]
    pairs = {
        "msp": ood.MaxSoftmax(None).predict_logits(tensor(logits)),
        "maxlogit": ood.MaxLogit(None).predict_logits(tensor(logits)),
        "energy": ood.EnergyBased(None).predict_logits(tensor(logits)),
    }
    for name, theirs in pairs.items():
        ours = make_detector(name).fit(None).score(logits=logits)
        assert_agree(ours, as_numpy(theirs), rtol=1e-12)
    tempered = make_detector("energy", temperature=3.0).fit(None).score(logits=logits)
    assert_agree(tempered, as_numpy(ood.EnergyBased(None, t=3.0).predict_logits(tensor(logits))), rtol=1e-12)


def test_mahalanobis_matches_up_to_its_scale(ood, setting):
    """pytorch-ood inverts the *summed* within-class scatter (plus a 1e-6 ridge) and returns half the
    distance: ours (scatter / N)^+ and the full distance, so ours = 2 N x theirs. It allocates its
    means and covariance in torch's default dtype, so float64 is made the default while it fits and
    scores (with float32 it refuses float64 features)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = ood.Mahalanobis(None).fit_features(tensor(setting["train"]), tensor(setting["labels"]).long())
        their_scores = as_numpy(theirs.predict_features(tensor(setting["queries"])))
    finally:
        torch.set_default_dtype(previous)
    ours = make_detector("mahalanobis").fit(setting["stats"])
    assert_agree(ours.score(features=setting["queries"]), their_scores, rtol=1e-7, scale=2.0 * N_TRAIN)


def test_knn_matches_with_the_same_k_and_bank(ood, setting):
    k = 20
    theirs = ood.KNN(None, k=k).fit_features(tensor(setting["train"]), tensor(setting["labels"]).long())
    ours = make_detector("knn", k=k).fit(setting["stats"])
    queries = setting["queries"]
    assert_agree(ours.score(features=queries), as_numpy(theirs.predict_features(tensor(queries))), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_nci_matches_with_the_same_alpha(ood, setting, alpha):
    import torch

    head = torch.nn.Linear(WIDTH, N_CLASSES)  # float32: pytorch-ood's NCI casts the features to float32
    with torch.no_grad():
        head.weight.copy_(tensor(setting["weight"]))
        head.bias.copy_(tensor(setting["bias"]))
    theirs = ood.NCI(None, head, alpha=alpha).fit_features(tensor(setting["train"]))
    ours = make_detector("nci", alpha=alpha).fit(one_layer(setting["stats"], setting["weight"], setting["bias"]))
    queries = setting["queries"]
    logits = queries @ setting["weight"].T + setting["bias"]
    # pytorch-ood computes NCI in float32 (it casts the features); the argmax can differ only on near-ties.
    assert_agree(ours.score(features=queries, logits=logits), as_numpy(theirs.predict_features(tensor(queries))), rtol=1e-4)


def test_ddu_matches_pytorch_ood_gmm(ood, setting):
    """DDU's density is pytorch-ood's GMM (per-class mean and ML covariance, priors = class shares).
    On full-rank classes ncguard adds no jitter and lifts no eigenvalue, so with reg=0 the two agree
    in float64; with GMM's default ridge (1e-6) to about that relative size."""
    ours = make_detector("ddu").fit(setting["stats"])
    assert np.all(ours.jitters_ == 0.0)
    queries = setting["queries"]
    for reg, rtol in ((0.0, 1e-9), (1e-6, 1e-4)):
        theirs = ood.GMM(None, reg=reg).fit_features(tensor(setting["train"]), tensor(setting["labels"]).long())
        assert_agree(ours.score(features=queries), as_numpy(theirs.predict_features(tensor(queries))), rtol=rtol)


@pytest.mark.parametrize("nudge", [0.0, 1e-12])
def test_vim_matches_on_a_zero_sum_head(ood, setting, nudge):
    """Same principal dimension (D/2) and alpha from every training feature (our bank holds them all).
    The head's rows sum to zero; pytorch-ood works in float32, where torch's pinv cut-off
    (max(C, D) x float32 eps) drops the round-off singular value, as ours now does in float64, so a
    1e-12 nudge of the bias changes neither."""
    import torch

    weight, bias = setting["weight"], setting["bias"] + nudge
    theirs = ood.ViM(None, d=WIDTH // 2, w=torch.from_numpy(weight), b=torch.from_numpy(bias))
    theirs.fit_features(tensor(setting["train"]), tensor(setting["labels"]).long())
    ours = make_detector("vim").fit(one_layer(setting["stats"], weight, bias))
    np.testing.assert_allclose(ours.origin_, as_numpy(theirs.u), atol=1e-5 * (1.0 + np.linalg.norm(ours.origin_)))
    np.testing.assert_allclose(ours.alpha_, theirs.alpha, rtol=1e-4)
    queries = setting["queries"]
    logits = queries @ weight.T + bias
    assert_agree(ours.score(features=queries, logits=logits), as_numpy(theirs.predict_features(tensor(queries))), rtol=1e-4)


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_temperature_scaling_against_pytorch_ood(ood, true_temperature):
    """pytorch-ood's TemperatureScaling minimizes the same NLL with 50 L-BFGS steps at lr 0.01 from
    T = 1, which (its docstring says) reaches the optimum only approximately: it moves T the same
    way from 1 as ours, not as far, and never to a lower NLL. With our T, its score is ours."""
    import torch

    from ncguard.temperature import fit_temperature, nll, softmax
    from tests.test_temperature import synthetic_logits

    logits, labels = synthetic_logits(true_temperature, n=5000, seed=1)
    theirs = ood.TemperatureScaling(None)
    theirs.fit_logits(torch.from_numpy(logits), torch.from_numpy(labels))
    their_temperature = float(theirs.t.item())
    ours = fit_temperature(logits, labels)
    assert np.sign(their_temperature - 1.0) == np.sign(ours - 1.0) == np.sign(true_temperature - 1.0)
    assert nll(logits, labels, ours) <= nll(logits, labels, their_temperature) + 1e-12
    with torch.no_grad():
        theirs.t.fill_(ours)  # a float32 parameter: compare at the T it holds
    expected = -softmax(logits, float(theirs.t.item())).max(axis=1)
    assert_agree(expected, as_numpy(theirs.predict_logits(torch.from_numpy(logits))), rtol=1e-9)
