"""Mahalanobis distance to the nearest class mean (Lee, Lee, Lee & Shin, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018)."""

from __future__ import annotations

import numpy as np

from .base import Detector


class Mahalanobis(Detector):
    """score = min_c (v - mu_c)^T Sigma^+ (v - mu_c), Sigma the tied within-class covariance.

    Sigma^+ is the statistics' pseudo-inverse (`ClassStatistics.precision_`), so directions
    with no within-class variance are ignored instead of blowing up; 0 exactly at a class mean.
    """

    name = "mahalanobis"
    uses_features = True

    def _fit(self, stats, weight, bias):
        self.means_ = stats.means_.copy()
        self.precision_ = stats.precision_.copy()

    def _feature_width(self):
        return self.means_.shape[1]

    def _score(self, features, logits):
        best = np.full(features.shape[0], np.inf)
        for mean in self.means_:  # one class at a time keeps memory at [N, D]
            diff = features - mean
            best = np.minimum(best, ((diff @ self.precision_) * diff).sum(axis=1))
        return np.maximum(best, 0.0)  # Sigma^+ is PSD; clip round-off below zero
