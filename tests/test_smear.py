"""Known-answer tests for smearnet.smear (smear level)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from smearnet.errors import SmearnetError
from smearnet.io import json_safe
from smearnet.smear import (
    SAME_NOTE,
    SMEAR_SCORES,
    auc_interval,
    classify,
    expected_positive,
    mean_probability,
    noisy_or,
    roc_points,
    select_threshold,
    share_of_calls,
    smear_evaluation,
    smear_table,
    top_k_mean,
)

POSITIVE = "covid_rl"

# --- smear scores -------------------------------------------------------------------------


def test_one_confident_positive_among_thirty_low_cells():
    p = np.array([0.99] + [0.01] * 30)
    assert share_of_calls(p) == pytest.approx(1 / 31)
    assert mean_probability(p) == pytest.approx((0.99 + 0.30) / 31)
    assert top_k_mean(p) == pytest.approx((0.99 + 0.01 + 0.01) / 3)
    assert noisy_or(p) == pytest.approx(1 - 0.01 * 0.99**30)
    assert expected_positive(p) == pytest.approx(1.29)
    assert noisy_or(p) > 0.99 and mean_probability(p) < 0.05


def test_many_weak_calls_below_the_cell_threshold():
    p = np.full(20, 0.4)
    assert share_of_calls(p) == 0.0  # no cell reaches 0.5
    assert mean_probability(p) == pytest.approx(0.4)
    assert top_k_mean(p) == pytest.approx(0.4)
    assert noisy_or(p) == pytest.approx(1 - 0.6**20)  # saturates on weak evidence
    assert expected_positive(p) == pytest.approx(8.0)
    assert share_of_calls(np.array([0.5] * 10 + [0.0] * 10)) == 0.5  # >= at the cell threshold
    assert share_of_calls(p, cell_threshold=0.4) == 1.0


def test_empty_and_single_cell_smears():
    for name, score in SMEAR_SCORES.items():
        assert math.isnan(score(np.array([]))), name
        assert score(np.array([0.7])) == pytest.approx(1.0 if name == "share" else 0.7), name
    assert top_k_mean(np.array([0.2, 0.6]), k=3) == pytest.approx(0.4)  # fewer cells than k
    assert noisy_or(np.array([1.0, 0.3])) == 1.0
    assert set(SMEAR_SCORES) == {"share", "mean_prob", "top3_mean", "noisy_or", "expected_positive"}


def test_which_scores_rank_a_confident_positive_above_many_weak_false_positives():
    positive = np.array([0.99] + [0.01] * 29)  # one confident target cell, clean background
    weak_negative = np.full(30, 0.3)  # no cell called positive, every cell a weak false positive
    ranks_positive_first = {name: score(positive) > score(weak_negative) for name, score in SMEAR_SCORES.items()}
    # share and top-3 look at confident cells; mean, sum and noisy-OR add up the weak evidence
    assert ranks_positive_first == {"share": True, "top3_mean": True, "mean_prob": False,
                                    "expected_positive": False, "noisy_or": False}


def test_one_cell_smear_against_a_large_smear_with_two_positive_cells():
    one_cell = np.array([0.6])
    large = np.array([0.97, 0.97] + [0.02] * 28)
    # a single borderline cell makes a 100% share: shares (and means) over-trust tiny smears
    assert share_of_calls(one_cell) == 1.0 > share_of_calls(large)
    assert mean_probability(one_cell) > mean_probability(large)
    # scores that count evidence rank the large smear higher
    assert expected_positive(large) > expected_positive(one_cell)
    assert noisy_or(large) > noisy_or(one_cell) and top_k_mean(large) > top_k_mean(one_cell)


def test_smear_scores_reject_invalid_probabilities():
    with pytest.raises(SmearnetError, match="within"):
        mean_probability(np.array([0.2, 1.5]))
    with pytest.raises(SmearnetError, match="1-D"):
        noisy_or(np.zeros((2, 2)))
    with pytest.raises(SmearnetError):
        top_k_mean(np.array([0.1]), k=0)


# --- smear table ----------------------------------------------------------------------------


def _cells() -> pd.DataFrame:
    rows = [
        # smear A: 4 cells, one truly positive; argmax predicts covid_rl for a cell whose
        # covid_rl probability is only 0.45 (three classes), so the share comes from labels
        ("A", "covid_rl", "covid_rl", 0.45, 0.30),
        ("A", "lymphocyte", "lymphocyte", 0.10, 0.85),
        ("A", "lymphocyte", "lymphocyte", 0.20, 0.70),
        ("A", "lymphocyte", "lymphocyte", 0.05, 0.90),
        # smear B: a single cell, negative, predicted negative
        ("B", "lymphocyte", "lymphocyte", 0.30, 0.60),
    ]
    return pd.DataFrame(rows, columns=["smear_id", "label", "predicted", "prob_covid_rl", "prob_lymphocyte"])


def test_smear_table_with_empty_and_single_cell_smears():
    table = smear_table(_cells(), POSITIVE, all_smear_ids=["C", "A", "B"])
    assert list(table["smear_id"]) == ["C", "A", "B"]  # the given order, never the ids' own (pseudonyms)
    c, a, b = (table.iloc[i] for i in range(3))

    assert a["n_cells"] == 4 and a["n_true_positive_cells"] == 1
    assert a["n_predicted_positive"] == 1 and a["share_predicted_positive"] == 0.25
    assert bool(a["truth_positive"])
    assert a["score_share"] == 0.0  # no covid_rl probability reaches 0.5
    assert a["score_mean_prob"] == pytest.approx(0.2)
    assert a["score_top3_mean"] == pytest.approx(0.25)
    assert a["score_expected_positive"] == pytest.approx(0.8)

    assert b["n_cells"] == 1 and b["share_predicted_positive"] == 0.0 and not b["truth_positive"]
    assert b["score_noisy_or"] == pytest.approx(0.3)

    assert c["n_cells"] == 0 and c["n_predicted_positive"] == 0 and not c["truth_positive"]
    assert math.isnan(c["share_predicted_positive"])
    assert all(math.isnan(c[f"score_{name}"]) for name in SMEAR_SCORES)


def test_smear_table_cell_threshold_counts_probabilities():
    table = smear_table(_cells(), POSITIVE, cell_threshold=0.2)
    a = table.set_index("smear_id").loc["A"]
    assert a["n_predicted_positive"] == 2 and a["share_predicted_positive"] == 0.5
    assert a["score_share"] == 0.5


def test_smear_table_errors():
    with pytest.raises(SmearnetError, match="prob_covid_rl"):
        smear_table(_cells().drop(columns="prob_covid_rl"), POSITIVE)
    with pytest.raises(SmearnetError, match="not in all_smear_ids"):
        smear_table(_cells(), POSITIVE, all_smear_ids=["A"])


# --- ROC, threshold, classify ---------------------------------------------------------------


def test_perfectly_separating_scores():
    scores = np.array([0.0, 0.01, 0.1, 0.3, 0.5])
    truth = np.array([False, False, False, True, True])
    roc = roc_points(scores, truth)
    assert roc["auc"] == 1.0
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0) and (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    threshold = select_threshold(scores, truth)
    assert 0.1 < threshold < 0.3
    assert threshold == pytest.approx(0.2)  # midpoint between the classes
    assert list(classify(scores, threshold)) == list(truth)
    assert auc_interval(scores, truth, n_resamples=100) == (1.0, 1.0)


def test_reversed_scores_give_auc_zero():
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    truth = np.array([False, False, True, True])
    assert roc_points(scores, truth)["auc"] == 0.0
    # every threshold has TPR - FPR <= 0: the lowest tie calls every smear positive
    assert all(classify(scores, select_threshold(scores, truth)))


def test_youden_ties_take_the_lowest_threshold():
    scores = np.array([0.1, 0.3, 0.2, 0.4])
    truth = np.array([False, False, True, True])
    # TPR - FPR is 0.5 at thresholds 0.4 and 0.2; the lowest (0.2) wins, midpoint to 0.1
    assert select_threshold(scores, truth) == pytest.approx(0.15)


def test_fixed_rule_classify_semantics_and_unknown_rule():
    assert select_threshold([0.5, 0.1], [True, False], "fixed") == 0.02
    assert select_threshold([], [], "fixed", fixed=0.05) == 0.05
    assert list(classify([0.02, 0.0199, 0.05, 0.0], 0.02)) == [True, False, True, False]
    with pytest.raises(SmearnetError, match="'youden', 'fixed'"):
        select_threshold([0.5, 0.1], [True, False], "otsu")
    with pytest.raises(SmearnetError, match="NaN"):
        classify([0.1, float("nan")], 0.02)
    with pytest.raises(SmearnetError, match="positive"):
        select_threshold([0.5, 0.1], [True, True])


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 60) / 4  # many ties
    truth = rng.random(60) < 0.4
    assert roc_points(scores, truth)["auc"] == pytest.approx(roc_auc_score(truth, scores))


def test_auc_interval_coverage():
    rng = np.random.default_rng(7)
    shift = 1.0
    true_auc = norm.cdf(shift / math.sqrt(2))
    repetitions, covered = 100, 0
    truth = np.array([True] * 30 + [False] * 30)
    for repetition in range(repetitions):
        scores = np.concatenate([rng.normal(shift, 1, 30), rng.normal(0, 1, 30)])
        low, high = auc_interval(scores, truth, n_resamples=200, seed=repetition)
        covered += low <= true_auc <= high
    assert 0.85 <= covered / repetitions <= 1.0


# --- evaluation -----------------------------------------------------------------------------


def _simulated_table(n_smears: int = 40, seed: int = 0) -> pd.DataFrame:
    """Half the smears positive; positive smears' share of positive calls overlaps negatives'."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n_smears) < n_smears // 2
    share = np.where(truth, rng.uniform(0.01, 0.10, n_smears), rng.uniform(0.0, 0.03, n_smears))
    return pd.DataFrame(
        {
            "smear_id": [f"s{i:03d}" for i in range(n_smears)],
            "n_cells": 100,
            "share_predicted_positive": share,
            "truth_positive": truth,
        }
    )


@pytest.mark.parametrize("mode", ["same", "held_out", "cross_validated"])
def test_smear_evaluation_modes_have_consistent_counts(mode):
    table = _simulated_table()
    result = smear_evaluation(table, threshold_selection=mode, n_resamples=200)
    confusion = result["confusion"]
    assert sum(confusion.values()) == result["n_blind_smears"]
    assert result["n_smears"] == 40 and result["n_empty_smears_excluded"] == 0
    assert result["threshold_selection"] == mode and result["rule"] == "youden"
    assert result["auc"]["low"] <= result["auc"]["value"] <= result["auc"]["high"]
    assert 0.5 < result["auc"]["value"] <= 1.0
    assert set(result["binary_summary"]) == {"sensitivity", "specificity", "precision", "npv", "accuracy"}
    assert len(result["roc"]["fpr"]) == len(result["roc"]["tpr"])
    if mode == "same":
        assert result["note"] == SAME_NOTE and result["n_blind_smears"] == 40
    elif mode == "held_out":
        assert "note" not in result
        assert result["n_selection_smears"] + result["n_blind_smears"] == 40
        assert len(result["blind_smear_ids"]) == result["n_blind_smears"]
        assert confusion["tp"] + confusion["fn"] == 10  # stratified: half the positives are blind
    else:
        assert result["n_blind_smears"] == 40 and len(result["fold_thresholds"]) == 5
    json.dumps(json_safe(result), allow_nan=False)


def test_smear_evaluation_is_reproducible_and_seeded():
    table = _simulated_table()
    first = smear_evaluation(table, n_resamples=100, seed=1)
    assert first == smear_evaluation(table, n_resamples=100, seed=1)
    assert first["blind_smear_ids"] != smear_evaluation(table, n_resamples=100, seed=2)["blind_smear_ids"]


def test_smear_evaluation_reproduces_paper_with_fixed_threshold():
    shares = [0.05] * 57 + [0.01] + [0.0] * 33 + [0.03]
    truth = [True] * 58 + [False] * 34
    table = pd.DataFrame({"smear_id": range(92), "share_predicted_positive": shares, "truth_positive": truth})
    result = smear_evaluation(table, rule="fixed", fixed=0.02, threshold_selection="same", n_resamples=100)
    assert result["threshold"] == 0.02
    assert result["confusion"] == {"tp": 57, "fp": 1, "tn": 33, "fn": 1}
    rounded = {name: round(rate["value"], 3) for name, rate in result["binary_summary"].items()}
    assert rounded == {"sensitivity": 0.983, "specificity": 0.971, "precision": 0.983, "npv": 0.971, "accuracy": 0.978}


def test_smear_evaluation_excludes_empty_smears_explicitly():
    table = smear_table(_cells(), POSITIVE, all_smear_ids=["A", "B", "C"])
    extra = pd.DataFrame(
        {
            "smear_id": ["D", "E"],
            "n_cells": [10, 10],
            "share_predicted_positive": [0.2, 0.0],
            "truth_positive": [True, False],
        }
    )
    table = pd.concat([table, extra], ignore_index=True)
    result = smear_evaluation(table, threshold_selection="same", n_resamples=50)
    assert result["n_empty_smears_excluded"] == 1 and result["excluded_smear_ids"] == ["C"]
    assert result["n_smears"] == 4
    assert sum(result["confusion"].values()) == 4


def test_smear_evaluation_too_few_smears():
    table = _simulated_table(8)
    one_positive = table.iloc[[0, 4, 5, 6, 7]]
    with pytest.raises(SmearnetError, match="at least 2 positive and 2 negative"):
        smear_evaluation(one_positive, threshold_selection="held_out")
    with pytest.raises(SmearnetError, match="at least 5 positive"):
        smear_evaluation(table, threshold_selection="cross_validated", folds=5)
    assert smear_evaluation(table, threshold_selection="cross_validated", folds=4, n_resamples=50)["folds"] == 4
    with pytest.raises(SmearnetError, match="at least 1 positive"):
        smear_evaluation(table.iloc[4:], threshold_selection="same")


def test_smear_evaluation_argument_errors():
    table = _simulated_table()
    with pytest.raises(SmearnetError, match="'same', 'held_out', 'cross_validated'"):
        smear_evaluation(table, threshold_selection="bootstrap")
    with pytest.raises(SmearnetError, match="allowed rules"):
        smear_evaluation(table, rule="otsu")
    with pytest.raises(SmearnetError, match="score_noisy_or"):
        smear_evaluation(table, score="score_noisy_or")
    with pytest.raises(SmearnetError, match="selection_fraction"):
        smear_evaluation(table, selection_fraction=1.0)
