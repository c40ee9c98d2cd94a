"""Smear scores side by side: simulator, composed development smears, choice blind to the assessment."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from smearnet.config import compose_config
from smearnet.errors import SmearnetError
from smearnet.smear.mil import MILConfig
from smearnet.smear import smear_table
from smearnet.smear import (
    BACKGROUND,
    LOOKALIKE,
    MIL_SCORE,
    SCORES,
    TARGET,
    AggregateParams,
    CellSet,
    SmearDesign,
    SmearMix,
    choose_score,
    compose_bags,
    development_folds,
    implied_cell_auc,
    natural_bags,
    plan_smear_mixes,
    run_aggregation,
    score_aucs,
    score_smears,
    scores_markdown,
    simulate_smear_probabilities,
)

POSITIVE = "covid_rl"

# --- simulator ---------------------------------------------------------------------------------


def test_simulated_smears_follow_the_design():
    sim = simulate_smear_probabilities(60, 40, (20, 40), (1, 3), lookalike_smears=0.5, lookalike_cells=(1, 4), seed=1)
    assert len(sim.probabilities) == len(sim.kinds) == 100 and sim.truth.sum() == 60
    for p, kinds, positive in zip(sim.probabilities, sim.kinds, sim.truth, strict=True):
        assert len(p) == len(kinds) and 20 <= len(p) <= 40
        assert np.all((p > 0) & (p < 1))
        n_target, n_lookalike = int((kinds == TARGET).sum()), int((kinds == LOOKALIKE).sum())
        assert (1 <= n_target <= 3) if positive else n_target == 0
        assert n_lookalike == 0 or 1 <= n_lookalike <= 4
    with_lookalikes = np.mean([(kinds == LOOKALIKE).any() for kinds in sim.kinds])
    assert 0.35 < with_lookalikes < 0.65
    again = simulate_smear_probabilities(60, 40, (20, 40), (1, 3), lookalike_smears=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(sim.probabilities, again.probabilities, strict=True))
    other = simulate_smear_probabilities(60, 40, (20, 40), (1, 3), lookalike_smears=0.5, seed=2)
    assert not np.array_equal(sim.probabilities[0], other.probabilities[0])


def test_simulated_cell_rates_match_the_stated_confusion():
    sim = simulate_smear_probabilities(2000, 200, 30, (1, 3), sensitivity=0.7, false_positive_rate=0.02,
                                       lookalike_false_positive_rate=0.4, lookalike_smears=1.0, seed=3)
    p, kinds = np.concatenate(sim.probabilities), np.concatenate(sim.kinds)
    assert np.mean(p[kinds == TARGET] >= 0.5) == pytest.approx(0.7, abs=0.03)  # ~4000 cells: 4 SE
    assert np.mean(p[kinds == BACKGROUND] >= 0.5) == pytest.approx(0.02, abs=0.003)
    assert np.mean(p[kinds == LOOKALIKE] >= 0.5) == pytest.approx(0.4, abs=0.03)
    empirical = roc_auc_score(kinds[kinds != LOOKALIKE] == TARGET, p[kinds != LOOKALIKE])
    assert implied_cell_auc(0.7, 0.02) == pytest.approx(empirical, abs=0.01)


def test_simulated_cell_table_never_reads_the_truth():
    sim = simulate_smear_probabilities(30, 30, seed=4)
    table = smear_table(sim.cells(), POSITIVE)
    np.testing.assert_array_equal(table["truth_positive"], sim.truth)
    # argmax calls equal p >= 0.5 calls: a missed target cell is not "predicted" positive
    np.testing.assert_allclose(table["share_predicted_positive"], table["score_share"])


def test_where_scores_break_in_simulation():
    """Many weak false positives swamp sum p and noisy-OR (they track smear size); top-3 and MIL resist."""
    sim = simulate_smear_probabilities(150, 150, (20, 40), (1, 3), false_positive_rate=0.05, spread=0.7, seed=5)
    aucs = score_aucs(smear_table(sim.cells(), POSITIVE), SCORES[:-1], confidence=0.95, n_resamples=50, seed=0)
    assert aucs["score_top3_mean"]["value"] > aucs["score_noisy_or"]["value"] + 0.1
    assert aucs["score_top3_mean"]["value"] > aucs["score_expected_positive"]["value"] + 0.15
    clean = simulate_smear_probabilities(150, 150, false_positive_rate=0.001, sensitivity=0.95,
                                         lookalike_false_positive_rate=0.05, seed=5)
    clean_aucs = score_aucs(smear_table(clean.cells(), POSITIVE), SCORES[:-1], confidence=0.95, n_resamples=50,
                            seed=0)
    assert all(entry["value"] > 0.97 for entry in clean_aucs.values())


@pytest.mark.parametrize("kwargs, match", [
    ({"false_positive_rate": 0.0}, "false_positive_rate"),
    ({"sensitivity": 1.0}, "sensitivity"),
    ({"spread": 0.0}, "spread"),
    ({"target_cells": (0, 2)}, "target_cells"),
    ({"cells_per_smear": (30, 20)}, "cells_per_smear"),
    ({"lookalike_smears": 1.5}, "lookalike_smears"),
])
def test_simulator_rejects_impossible_settings(kwargs, match):
    with pytest.raises(SmearnetError, match=match):
        simulate_smear_probabilities(5, 5, **kwargs)


# --- composed development smears ------------------------------------------------------------------


def test_composed_bags_have_the_planned_cells():
    labels = np.array(["covid_rl"] * 6 + ["classic_rl"] * 10 + ["normal"] * 100)
    mixes = plan_smear_mixes(50, 50, SmearDesign((20, 30), (1, 3), 0.5, (1, 4)), np.random.default_rng(0))
    bags = compose_bags(labels, mixes, np.random.default_rng(1), positive_class=POSITIVE,
                        lookalike_classes=["classic_rl"])
    for bag, mix in zip(bags, mixes, strict=True):
        counts = pd.Series(labels[bag]).value_counts()
        assert counts.get("covid_rl", 0) == mix.n_target and counts.get("classic_rl", 0) == mix.n_lookalike
        assert counts.get("normal", 0) == mix.n_background and len(set(bag)) == len(bag)  # distinct cells
    # without look-alike cells, their places go to background cells
    no_lookalikes = compose_bags(labels[labels != "classic_rl"], [SmearMix(True, 2, 3, 10)], np.random.default_rng(2),
                                 positive_class=POSITIVE, lookalike_classes=["classic_rl"])
    assert len(no_lookalikes[0]) == 15
    with pytest.raises(SmearnetError, match="No 'covid_rl' cells"):
        compose_bags(labels[6:], [SmearMix(True, 1, 0, 5)], np.random.default_rng(0), positive_class=POSITIVE,
                     lookalike_classes=["classic_rl"])


def toy_cells(seed: int, patients: tuple[int, int, int] = (3, 3, 2), dim: int = 6) -> CellSet:
    """Development-like cells: one class per patient; covid cells shifted along embedding dimension 0."""
    rng = np.random.default_rng(seed)
    rows, embeddings = [], []
    number = 0
    for label, n_patients, shift in zip(("covid_rl", "normal", "classic_rl"), patients, (2.5, 0.0, 1.0), strict=True):
        for _ in range(n_patients):
            number += 1
            for _ in range(int(rng.integers(15, 40))):
                embedding = rng.normal(size=dim)
                embedding[0] += shift
                p = float(1.0 / (1.0 + np.exp(-(3.0 * embedding[0] - 5.0))))
                rows.append({"smear_id": f"s{seed}-{number:02d}", "patient_id": f"p{seed}-{number:02d}",
                             "label": label, "predicted": POSITIVE if p >= 0.5 else "normal", "prob_covid_rl": p})
                embeddings.append(embedding)
    return CellSet(pd.DataFrame(rows), np.array(embeddings))


def test_folds_hold_out_whole_patients_of_both_classes():
    cells = toy_cells(0, (3, 4, 2)).cells
    folds, unit = development_folds(cells, POSITIVE, folds=5, seed=0)
    assert unit == "patient" and folds.max() + 1 == 3  # capped by the 3 positive patients
    assert cells.assign(fold=folds).groupby("patient_id")["fold"].nunique().max() == 1
    for fold in range(3):
        held = cells[folds == fold]
        assert (held["label"] == POSITIVE).any() and (held["label"] != POSITIVE).any()
    one_positive_patient = toy_cells(1, (1, 3, 1)).cells
    folds, unit = development_folds(one_positive_patient, POSITIVE, folds=3, seed=0)
    assert unit == "cell" and folds.max() + 1 == 3
    with pytest.raises(SmearnetError, match="at least 2 positive"):
        development_folds(one_positive_patient.iloc[:1], POSITIVE, folds=3, seed=0)


def test_score_smears_puts_each_mil_score_on_its_own_smear():
    cell_set = toy_cells(2)
    ids, bags = natural_bags(cell_set.cells)

    class Marker:  # scores a bag by its first cell's embedding, so rows can be traced
        def score(self, embeddings):
            return np.array([bag[0, 1] for bag in embeddings])

    table = score_smears(cell_set, ids, bags, POSITIVE, Marker())  # type: ignore[arg-type]
    assert list(table["smear_id"]) == sorted(ids)
    for smear_id, bag in zip(ids, bags, strict=True):
        assert table.set_index("smear_id").loc[smear_id, MIL_SCORE] == cell_set.embeddings[bag[0], 1]
    assert set(SCORES) <= set(table.columns)


# --- choice ---------------------------------------------------------------------------------------


def development_table(seed: int = 0, n: int = 80) -> pd.DataFrame:
    """Top-3 mean separates the classes; MIL is just below it; the rest are noise."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) < n // 2
    table = pd.DataFrame({"smear_id": range(n), "truth_positive": truth})
    for score in SCORES:
        table[score] = rng.random(n)
    table["score_top3_mean"] = truth + rng.normal(0, 0.3, n)
    table[MIL_SCORE] = truth + rng.normal(0, 0.35, n)
    return table


def test_choice_takes_the_best_score_and_breaks_near_ties_by_preference():
    table = development_table()
    aucs = {score: roc_auc_score(table["truth_positive"], table[score]) for score in SCORES}
    assert aucs["score_top3_mean"] > aucs[MIL_SCORE] > 0.9 > max(aucs["score_share"], aucs["score_noisy_or"])
    strict = choose_score(table, tie_tolerance=0.0, n_resamples=50)
    assert strict.chosen == "score_top3_mean" and strict.tied == ["score_top3_mean"]
    assert "the highest of all scores" in strict.reason
    # make MIL the best by a hair: inside the tolerance the simpler top-3 mean still wins
    table[MIL_SCORE] = table["score_top3_mean"] + 1e-9 * table["truth_positive"]
    table.loc[table.index[0], MIL_SCORE] += 10.0  # one more positive ranked first: AUC unchanged or higher
    near = choose_score(table, tie_tolerance=0.01, n_resamples=50)
    assert near.chosen == "score_top3_mean" and MIL_SCORE in near.tied
    assert "preference order" in near.reason
    for score in SCORES:
        assert near.aucs[score]["low"] <= near.aucs[score]["value"] <= near.aucs[score]["high"]


def test_choice_function_sees_only_the_development_table():
    parameters = list(inspect.signature(choose_score).parameters)
    assert parameters[0] == "development" and not any("assess" in name for name in parameters)
    with pytest.raises(SmearnetError, match="none of the score columns"):
        choose_score(pd.DataFrame({"truth_positive": [True, False]}))


def poisoned(assessment: CellSet) -> CellSet:
    """The same smears and truth with all the evidence reversed (probabilities, calls) or scrambled (embeddings)."""
    cells = assessment.cells.copy()
    cells["prob_covid_rl"] = 1.0 - cells["prob_covid_rl"]
    cells["predicted"] = np.where(cells["predicted"] == POSITIVE, "normal", POSITIVE)
    embeddings = np.random.default_rng(99).normal(size=assessment.embeddings.shape) * 50.0
    return CellSet(cells, embeddings)


def test_the_choice_never_reads_the_assessment_smears():
    params = AggregateParams(mil=MILConfig(hidden=16, attention=8, epochs=6, batch_size=16), smears_per_class=30,
                             folds=3, bootstrap_resamples=100)
    development, assessment = toy_cells(10), toy_cells(11, (4, 4, 2))
    honest = run_aggregation(development, assessment, POSITIVE, params, seed=0)
    bad = run_aggregation(development, poisoned(assessment), POSITIVE, params, seed=0)
    none = run_aggregation(development, None, POSITIVE, params, seed=0)
    for other in (bad, none):
        assert other.choice == honest.choice and other.threshold == honest.threshold
        pd.testing.assert_frame_equal(other.development.composed, honest.development.composed)
        pd.testing.assert_frame_equal(other.development.natural, honest.development.natural)
        probe = [development.embeddings[:20]]
        assert other.development.aggregator.score(probe)[0] == honest.development.aggregator.score(probe)[0]
    # the poison did reach the assessment: its AUCs flipped
    assert honest.assessment is not None and bad.assessment is not None and none.assessment is None
    honest_auc, bad_auc = (result.assessment.aucs["score_mean_prob"]["value"] for result in (honest, bad))
    assert honest_auc > 0.8 and bad_auc < 0.2


def test_run_aggregation_metrics_and_report_name_every_score():
    params = AggregateParams(mil=MILConfig(hidden=16, attention=8, epochs=4), smears_per_class=20, folds=2,
                             bootstrap_resamples=50)
    result = run_aggregation(toy_cells(20), toy_cells(21, (3, 3, 1)), POSITIVE, params, seed=1)
    metrics = result.metrics()
    assert metrics["chosen_score"] in SCORES and metrics["fold_unit"] == "patient" and metrics["folds"] == 2
    assert set(metrics["development_composed"]["auc"]) == set(SCORES) == set(metrics["assessment"]["auc"])
    assert metrics["development_composed"]["n_smears"] == 2 * 2 * 20
    assert metrics["development_composed"]["design"] == {"cells_per_smear": [20, 40], "target_cells": [1, 3],
                                                          "lookalike_smears": 0.3, "lookalike_cells": [1, 4],
                                                          "from": "smear.compose"}
    blind = metrics["assessment"]["blind"]
    assert sum(blind["confusion"].values()) == metrics["assessment"]["n_smears"] == 7
    assert not any("roc" in entry for entry in metrics["assessment"]["auc"].values())
    report = scores_markdown(result, model_name="toy", positive_class=POSITIVE,
                             calibration={"temperature": 1.5, "val_nll_before": 0.5, "val_nll_after": 0.4,
                                          "n_cells": 10, "at_bound": False})
    assert all(f"`{score}`" in report for score in SCORES) and f"**{metrics['chosen_score']}**" in report
    assert "T = 1.500" in report and "Blind classification" in report
    assert math.isfinite(metrics["threshold"])


def test_params_from_the_composed_configuration():
    cfg = compose_config([])
    params = AggregateParams.from_config(cfg.aggregate, cfg.smear.compose, cfg.evaluation.confidence)
    assert params.design.target_cells == (1, 3) and params.lookalike_classes == ("classic_rl",)
    assert set(params.lookalike_classes) <= set(cfg.data.classes) and cfg.data.positive_class in cfg.data.classes
    with pytest.raises(SmearnetError, match="folds"):
        AggregateParams(folds=1)
    with pytest.raises(SmearnetError, match="tie_tolerance"):
        AggregateParams(tie_tolerance=0.6)


def test_every_figure_is_the_same_under_any_pseudonym_key():
    """Ids are pseudonyms under a secret key: renaming every patient and smear through two different keys must
    change no figure (folds, composition, the held-out half and the blind calls follow the data's order)."""
    from smearnet.pseudonyms import pseudonym
    from smearnet.smear import SmearRule, measure_rule

    params = AggregateParams(mil=MILConfig(hidden=16, attention=8, epochs=2), smears_per_class=10, folds=2,
                             bootstrap_resamples=50)

    def renamed(cell_set: CellSet, key: bytes) -> CellSet:
        cells = cell_set.cells.copy()
        for column in ("smear_id", "patient_id"):
            cells[column] = [pseudonym(value, key) for value in cells[column]]
        return CellSet(cells, cell_set.embeddings)

    figures = []
    for key in (b"first key", b"a different key"):
        development, assessment = renamed(toy_cells(30, (4, 4, 2)), key), renamed(toy_cells(31, (5, 5, 2)), key)
        result = run_aggregation(development, assessment, POSITIVE, params, seed=3)
        rule = SmearRule(score=result.choice.chosen, positive_class=POSITIVE, threshold=result.threshold)
        cells = assessment.cells.assign(prob_normal=1 - assessment.cells["prob_covid_rl"], prob_classic_rl=0.0)
        measured = measure_rule(rule, cells, ["classic_rl", "covid_rl", "normal"], selection="held_out",
                                n_resamples=50, seed=3)
        metrics = result.metrics()
        figures.append((metrics["chosen_score"], metrics["threshold"], metrics["development_composed"]["auc"],
                        measured.rule.threshold, measured.result["confusion"], measured.result["auc"]["value"]))
    assert figures[0] == figures[1]
