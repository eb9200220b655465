"""How well an OOD score separates in-distribution (ID) from OOD inputs.

Conventions used everywhere in ncguard: OOD is the positive class and a higher score means
"more likely OOD". An input is flagged when ``score > threshold``.

Written in NumPy rather than calling scikit-learn: the core keeps scikit-learn to its bundled
data set, and these are short rank formulas. The tests pin every function to sklearn.metrics
(roc_auc_score, average_precision_score, roc_curve), ties included.
"""

from __future__ import annotations

import numpy as np

from ncguard.calibration import calibrate_threshold, check_scores


def _check_pair(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    return check_scores(id_scores, "id_scores"), check_scores(ood_scores, "ood_scores")


def auroc(id_scores, ood_scores) -> float:
    """Probability that a random OOD input scores higher than a random ID input (ties count 1/2).

    The Mann-Whitney form of the area under the ROC curve; equal to sklearn's roc_auc_score
    with OOD labelled 1.
    """
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    n_id, n_ood = id_scores.size, ood_scores.size
    combined = np.concatenate([id_scores, ood_scores])
    # Average ranks (1-based) so that tied scores share their rank, which gives ties weight 1/2.
    unique, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    average_rank = last_rank - (counts - 1) / 2.0
    ood_rank_sum = average_rank[inverse[n_id:]].sum()
    return float((ood_rank_sum - n_ood * (n_ood + 1) / 2.0) / (n_id * n_ood))


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for "flag as OOD when score >= t", one per distinct score, plus the origin.

    Returns (fpr, tpr, thresholds): fpr is the fraction of ID inputs flagged, tpr the fraction
    of OOD inputs flagged; thresholds decrease, the first is +inf (nothing flagged).
    """
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    thresholds = np.unique(np.concatenate([id_scores, ood_scores]))[::-1]
    # Count of scores >= t for each threshold t (sorted ascending, so search from the right).
    id_sorted, ood_sorted = np.sort(id_scores), np.sort(ood_scores)
    id_flagged = id_sorted.size - np.searchsorted(id_sorted, thresholds, side="left")
    ood_flagged = ood_sorted.size - np.searchsorted(ood_sorted, thresholds, side="left")
    fpr = np.concatenate([[0.0], id_flagged / id_sorted.size])
    tpr = np.concatenate([[0.0], ood_flagged / ood_sorted.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """FPR95: fraction of OOD inputs accepted as ID when the threshold keeps `tpr` of ID inputs.

    Convention (the same as serving): the threshold is `calibrate_threshold(id_scores, tpr)`,
    the smallest ID score t with mean(id_scores <= t) >= tpr, and an input is accepted as ID
    when score <= t. OOD inputs that tie with t are therefore accepted (counted against the
    detector); no interpolation between ROC points. This equals the FPR at the first point of
    sklearn's roc_curve (ID labelled 1, score negated, drop_intermediate=False) whose TPR
    reaches `tpr`.
    """
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    threshold = calibrate_threshold(id_scores, tpr)
    return float(np.mean(ood_scores <= threshold))


def _average_precision(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve, as sklearn's average_precision_score.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds in decreasing order.
    """
    scores = np.concatenate([positive_scores, negative_scores])
    is_positive = np.concatenate([np.ones(positive_scores.size), np.zeros(negative_scores.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    # Last index of each run of equal scores: a threshold admits the whole run at once.
    run_ends = np.flatnonzero(np.diff(scores) != 0)
    run_ends = np.append(run_ends, scores.size - 1)
    true_positives = np.cumsum(is_positive)[run_ends]
    admitted = run_ends + 1.0
    precision = true_positives / admitted
    recall = true_positives / positive_scores.size
    recall_gain = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_gain * precision))


def aupr_out(id_scores, ood_scores) -> float:
    """Area under the precision-recall curve with OOD as the positive class (score as is)."""
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    return _average_precision(ood_scores, id_scores)


def aupr_in(id_scores, ood_scores) -> float:
    """Area under the precision-recall curve with ID as the positive class (score negated)."""
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    return _average_precision(-id_scores, -ood_scores)


def ood_report(id_scores, ood_scores, tpr: float = 0.95) -> dict:
    """All separation metrics for one ID/OOD pair, as plain Python numbers (JSON-ready)."""
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, tpr),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        "n_id": int(id_scores.size),
        "n_ood": int(ood_scores.size),
    }
