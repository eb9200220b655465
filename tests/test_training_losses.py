"""The entropy regularizer and the NC loss terms (checked against the NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ncguard.collapse import nc1, nc2, nc3
from ncguard.errors import ConfigError
from ncguard.stats import ClassStatistics
from training.losses import TrainingLoss, entropy_regularizer, nc_terms
from training.model import ModelOutput


def nearest_neighbour_distances(h: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(h, dim=1)
    distances = torch.cdist(unit, unit)
    distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values


def test_entropy_gradient_pushes_nearest_neighbours_apart():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(32, 16, generator=generator, dtype=torch.float64)
    h[1] = h[0] + 0.01 * torch.randn(16, generator=generator, dtype=torch.float64)  # a near-duplicate pair
    before = nearest_neighbour_distances(h)
    h.requires_grad_(True)
    entropy_regularizer(h).backward()
    step = h.detach() - 0.01 * h.grad
    after = nearest_neighbour_distances(step)
    # The close pair separates, the closest distance grows, and so does the average one.
    assert after[0] > before[0] and after[1] > before[1]
    assert after.min() > before.min()
    assert after.mean() > before.mean()


def test_entropy_gradient_on_one_pair_points_away_from_the_neighbour():
    h = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.0]], requires_grad=True)
    entropy_regularizer(h).backward()
    # Descending moves point 0 up (away from point 1) and point 1 down.
    assert -h.grad[0, 1] > 0 and -h.grad[1, 1] < 0


def test_entropy_regularizer_matches_its_formula():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    u = F.normalize(h, dim=1)
    # Nearest neighbours by cosine: 0 -> 2, 1 -> 2, 2 -> 0 (tie with 1 broken by argmax order).
    expected = -(torch.log((u[0] - u[2]).norm() + 1e-8) + torch.log((u[1] - u[2]).norm() + 1e-8)
                 + torch.log((u[2] - u[0]).norm() + 1e-8)) / 3
    torch.testing.assert_close(entropy_regularizer(h), expected)


def test_total_loss_is_smoothed_cross_entropy_plus_weighted_entropy():
    torch.manual_seed(0)
    output = ModelOutput(torch.randn(8, 3), torch.randn(8, 5), F.normalize(torch.randn(8, 5), dim=1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain, parts = TrainingLoss("ce", entropy_weight=0.0)(output, labels, torch.randn(3, 5))
    torch.testing.assert_close(plain, F.cross_entropy(output.logits, labels, label_smoothing=0.1))
    assert set(parts) == {"ce"}
    total, parts = TrainingLoss("ce", entropy_weight=0.05)(output, labels, torch.randn(3, 5))
    torch.testing.assert_close(total, plain + 0.05 * entropy_regularizer(output.transfer))
    assert set(parts) == {"ce", "entropy"}


def reference_metrics(features: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> dict:
    stats = ClassStatistics(weight.shape[0], per_class_covariance=False, bank_size=0).fit(features, labels)
    report = {"nc1": nc1(stats.covariance_, stats.means_, stats.global_mean_)}
    report.update(nc2(stats.means_, stats.global_mean_, weight))
    report["nc3"] = nc3(stats.means_, stats.global_mean_, weight)
    return report


@pytest.mark.parametrize("balanced", [True, False])
def test_nc_terms_agree_with_the_numpy_reference(balanced):
    rng = np.random.default_rng(1)
    n_classes, dim = 4, 12
    counts = [10, 10, 10, 10] if balanced else [5, 9, 14, 20]
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    centers = rng.normal(size=(n_classes, dim)) * 3
    features = centers[labels] + rng.normal(size=(len(labels), dim))
    weight = rng.normal(size=(n_classes, dim))
    terms = nc_terms(torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(weight))
    reference = reference_metrics(features, labels, weight)
    assert set(terms) == set(reference)
    for name, value in reference.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_nc_loss_gradient_reduces_within_class_spread():
    rng = np.random.default_rng(2)
    labels = torch.from_numpy(np.repeat(np.arange(3), 8))
    features = torch.from_numpy(rng.normal(size=(24, 6)) + 2 * rng.normal(size=(3, 6))[labels.numpy()])
    weight = torch.from_numpy(rng.normal(size=(3, 6)))
    output = ModelOutput(torch.zeros(24, 3), features, features.clone().requires_grad_(True))
    loss = TrainingLoss("nc", entropy_weight=0.0)
    total, parts = loss(output, labels, weight)
    total.backward()
    stepped = output.detection.detach() - 0.05 * output.detection.grad
    assert float(nc_terms(stepped, labels, weight)["nc1"]) < parts["nc1"]


def test_nc_loss_needs_two_classes_in_a_batch():
    output = ModelOutput(torch.zeros(4, 3), torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        TrainingLoss("nc", 0.0)(output, torch.zeros(4, dtype=torch.long), torch.randn(3, 5))


def test_bad_loss_options_are_refused():
    with pytest.raises(ConfigError, match="unknown loss"):
        TrainingLoss("mse")
    with pytest.raises(ConfigError, match="entropy weight"):
        TrainingLoss("ce", entropy_weight=-0.1)
    with pytest.raises(ConfigError, match="at least 2 feature vectors"):
        entropy_regularizer(torch.randn(1, 4))
