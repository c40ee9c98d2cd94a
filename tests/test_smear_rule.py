"""SmearRule: the one smear call, its packaging, and the smear stage's measurement of it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from smearnet.errors import SmearnetError
from smearnet.io import json_safe
from smearnet.smear.mil import MILConfig, train_mil
from smearnet.smear import SmearRule, load_rule, measure_rule, save_rule

CLASSES = ["normal", "classic_rl", "covid_rl"]


def probabilities(p_covid):
    p = np.asarray(p_covid, dtype=float)
    return np.stack([1 - p - 0.01, np.full_like(p, 0.01), p], axis=1)


def test_share_rule_calls_smears_by_the_share_of_argmax_positive_cells():
    rule = SmearRule(score="share_predicted_positive", positive_class="covid_rl", threshold=0.25)
    ids = ["a"] * 4 + ["b"] * 4 + ["c"]
    p = probabilities([0.9, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.1, 0.5])
    p[-1] = np.nan  # smear c: its only cell could not be decoded
    smears, weights = rule.classify(ids, p, CLASSES)
    by_id = smears.set_index("smear_id")
    assert by_id.loc["a", "score"] == 0.25 and by_id.loc["a", "call"] == "positive"  # >= threshold is positive
    assert by_id.loc["b", "score"] == 0.0 and by_id.loc["b", "call"] == "negative"
    assert math.isnan(by_id.loc["c", "score"]) and by_id.loc["c", "call"] == "undetermined"
    assert weights[:4].sum() == pytest.approx(1.0) and weights[0] == weights[:4].max() and math.isnan(weights[-1])


def test_temperature_calibrates_probability_scores_but_never_an_argmax_share():
    ids, p = ["a"] * 3, probabilities([0.9, 0.2, 0.05])
    cold = SmearRule(score="score_mean_prob", positive_class="covid_rl", threshold=0.5)
    warm = SmearRule(score="score_mean_prob", positive_class="covid_rl", threshold=0.5, temperature=4.0)
    assert cold.classify(ids, p, CLASSES)[0]["score"][0] != warm.classify(ids, p, CLASSES)[0]["score"][0]
    share = [SmearRule(score="share_predicted_positive", positive_class="covid_rl", threshold=0.5, temperature=t)
             for t in (1.0, 4.0)]
    assert share[0].classify(ids, p, CLASSES)[0]["score"][0] == share[1].classify(ids, p, CLASSES)[0]["score"][0]


def test_rules_refuse_what_they_cannot_do():
    with pytest.raises(SmearnetError, match="Unknown smear score 'median'"):
        SmearRule(score="median", positive_class="covid_rl")
    with pytest.raises(SmearnetError, match="no threshold"):
        SmearRule(score="score_share", positive_class="covid_rl").classify(["a"], probabilities([0.5]), CLASSES)
    with pytest.raises(SmearnetError, match="embeddings and the MIL aggregator"):
        SmearRule(score="score_mil", positive_class="covid_rl", threshold=0.5).classify(
            ["a"], probabilities([0.5]), CLASSES)


def test_a_mil_rule_is_saved_with_its_aggregator_and_calls_the_same_after_loading(tmp_path):
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(6, 4)) + (1.5 if i % 2 else 0.0) for i in range(20)]
    aggregator = train_mil(bags, [bool(i % 2) for i in range(20)], MILConfig(hidden=8, attention=4, epochs=5), seed=0)
    rule = SmearRule(score="score_mil", positive_class="covid_rl", threshold=0.5, temperature=1.3,
                     chosen_by="test", threshold_from="test")
    save_rule(rule, tmp_path, aggregator)
    loaded, loaded_aggregator = load_rule(tmp_path)
    assert loaded == rule and (tmp_path / "mil").is_dir()
    ids = [f"s{i}" for i in range(20) for _ in range(6)]
    embeddings, p = np.concatenate(bags), probabilities(rng.uniform(0.01, 0.9, size=120))
    before, w_before = rule.classify(ids, p, CLASSES, embeddings=embeddings, aggregator=aggregator)
    after, w_after = loaded.classify(ids, p, CLASSES, embeddings=embeddings, aggregator=loaded_aggregator)
    pd.testing.assert_frame_equal(before, after)
    np.testing.assert_allclose(w_before, w_after)
    assert np.allclose([w_after[i * 6:(i + 1) * 6].sum() for i in range(20)], 1.0)  # attention per smear
    # A request in which no image could be decoded has zero-width embeddings (serving.batches.classify_in_batches):
    # its smears are undetermined, not an error.
    nothing, weights = loaded.classify(["a", "a", "b"], np.full((3, 3), np.nan), CLASSES,
                                       embeddings=np.zeros((3, 0), dtype=np.float32), aggregator=loaded_aggregator)
    assert list(nothing["call"]) == ["undetermined"] * 2 and np.isnan(weights).all()


def evaluation_cells(parts: bool) -> pd.DataFrame:
    rows = []
    for index in range(16):
        positive = index % 2 == 0
        p = [0.8 if positive and j == 0 else 0.05 + 0.01 * (index % 5) for j in range(5)]
        for j, value in enumerate(p):
            rows.append({"smear_id": f"s{index:02d}", "label": "covid_rl" if positive and j == 0 else "normal",
                         "prob_normal": 0.99 - value, "prob_classic_rl": 0.01, "prob_covid_rl": value,
                         **({"part": index // 8} if parts else {})})
    return pd.DataFrame(rows)


def test_measurement_fixes_the_threshold_as_configured_and_calls_through_the_rule():
    proposed = SmearRule(score="score_top3_mean", positive_class="covid_rl", threshold=0.9,
                         threshold_from="development")
    kept = measure_rule(proposed, evaluation_cells(parts=False), CLASSES, selection="development", n_resamples=50)
    assert kept.rule.threshold == 0.9 and kept.result["threshold_selection"] == "development"
    assert kept.calls["blind"].all() and set(kept.calls["call"]) == {"negative"}  # 0.9 is above every score
    assert not kept.threshold_on_blind and not kept.threshold_on_evaluation  # chosen on development smears

    chosen = measure_rule(proposed, evaluation_cells(parts=True), CLASSES, selection="held_out", n_resamples=50)
    assert chosen.rule.threshold != 0.9 and chosen.rule.score == "score_top3_mean"
    assert set(chosen.blind_smear_ids) == {f"s{i:02d}" for i in range(8, 16)}  # part 1 is judged blind
    blind = chosen.calls[chosen.calls["blind"]]
    assert chosen.result["confusion"]["tp"] == int(((blind["call"] == "positive") & blind["truth_positive"]).sum())
    assert chosen.result["deployed_rule"] == chosen.rule.to_dict()
    assert not chosen.threshold_on_blind and chosen.threshold_on_evaluation  # chosen on part 0, judged on part 1
    for selection in ("same", "cross_validated"):  # the deployed threshold is chosen on every smear: no smear is blind
        in_sample = measure_rule(proposed, evaluation_cells(parts=False), CLASSES, selection=selection, folds=2,
                                 n_resamples=50)
        assert in_sample.threshold_on_blind and set(in_sample.blind_smear_ids) == set(in_sample.calls["smear_id"])
    with pytest.raises(SmearnetError, match="threshold_selection"):
        measure_rule(proposed, evaluation_cells(parts=False), CLASSES, selection="best_on_test")


# --- per site ---------------------------------------------------------------------------------------


def with_sites(cells: pd.DataFrame, site_of_smear) -> pd.DataFrame:
    return cells.assign(site=[site_of_smear(int(smear_id[1:])) for smear_id in cells["smear_id"]])


def test_per_site_smear_metrics_appear_with_two_sites_and_not_with_one():
    proposed = SmearRule(score="score_top3_mean", positive_class="covid_rl", threshold=0.3,
                         threshold_from="development")
    cells = with_sites(evaluation_cells(parts=False), lambda i: "hospital_a" if i < 10 else "hospital_b")
    measured = measure_rule(proposed, cells, CLASSES, selection="development", n_resamples=50)
    sites = measured.result["per_site"]
    assert list(sites) == ["hospital_a", "hospital_b"]
    b = sites["hospital_b"]  # smears s10..s15: three positive, three negative
    calls = measured.calls[measured.calls["smear_id"].isin([f"s{i}" for i in range(10, 16)])]
    assert b["n_smears"] == 6 and b["n_positive_smears"] == 3 and b["n_negative_smears"] == 3
    assert b["auc"]["value"] == pytest.approx(roc_auc_score(calls["truth_positive"], calls["score"]))
    assert b["confusion"]["tp"] == int(((calls["call"] == "positive") & calls["truth_positive"]).sum())
    assert {"sensitivity", "specificity"} <= set(b) and "note" not in b
    assert sum(site["n_smears"] for site in sites.values()) == measured.result["n_smears"]

    one = measure_rule(proposed, with_sites(evaluation_cells(parts=False), lambda i: "hospital_a"), CLASSES,
                       selection="development", n_resamples=50)
    plain = measure_rule(proposed, evaluation_cells(parts=False), CLASSES, selection="development", n_resamples=50)
    assert "per_site" not in one.result and "per_site_note" not in one.result
    assert json_safe(one.result) == json_safe(plain.result)  # one site: the metrics file does not change


def test_a_site_without_negative_smears_says_so_and_mixed_site_smears_are_not_split_by_site():
    proposed = SmearRule(score="score_top3_mean", positive_class="covid_rl", threshold=0.3,
                         threshold_from="development")
    only_positive = {10, 12, 14}
    cells = with_sites(evaluation_cells(parts=False), lambda i: "hospital_b" if i in only_positive else "hospital_a")
    b = measure_rule(proposed, cells, CLASSES, selection="development", n_resamples=50).result["per_site"]["hospital_b"]
    assert b["n_negative_smears"] == 0 and math.isnan(b["auc"]["value"]) and math.isnan(b["specificity"]["value"])
    assert "no negative smears" in b["note"] and b["sensitivity"]["value"] == 1.0

    composed = evaluation_cells(parts=True)
    composed["site"] = np.where(np.arange(len(composed)) % 2, "hospital_a", "hospital_b")  # every smear mixes sites
    result = measure_rule(proposed, composed, CLASSES, selection="held_out", n_resamples=50).result
    assert "per_site" not in result
    assert "16 of 16 evaluation smears mix cells of several sites" in result["per_site_note"]


def test_the_number_of_cells_alone_is_reported_beside_the_rules_auc():
    """Positive smears with more cells than negative ones: the count alone separates them (AUC 1), and a noisy-OR of
    cells that carry no signal at all still reaches that AUC, which is what the baseline is there to show."""
    rows = []
    for index in range(12):
        positive = index % 2 == 0
        for j in range(10 if positive else 4):
            rows.append({"smear_id": f"s{index:02d}", "label": "covid_rl" if positive and j == 0 else "normal",
                         "prob_normal": 0.89, "prob_classic_rl": 0.01, "prob_covid_rl": 0.1})
    proposed = SmearRule(score="score_noisy_or", positive_class="covid_rl", threshold=0.5,
                         threshold_from="development")
    result = measure_rule(proposed, pd.DataFrame(rows), CLASSES, selection="development", n_resamples=50).result
    assert result["cell_count_auc"]["value"] == 1.0 == result["auc"]["value"]
    assert (result["cell_count_auc"]["n_positive"], result["cell_count_auc"]["n_negative"]) == (6, 6)
    same_size = measure_rule(proposed, evaluation_cells(parts=False), CLASSES, selection="development",
                             n_resamples=50).result
    assert same_size["cell_count_auc"]["value"] == 0.5  # every smear 5 cells: the count tells nothing
    assert same_size["auc"]["value"] == 1.0


def test_per_site_figures_of_a_cross_validated_threshold_are_the_overall_figures_split_by_site():
    """Each smear is judged by the threshold of the folds it was not in, per site as overall: the sites' confusions
    add up to the overall one (the shipped threshold, chosen on every smear, would judge them in-sample)."""
    rng = np.random.default_rng(3)
    rows = []
    for index in range(40):
        positive = index % 2 == 0
        for value in rng.beta(3 if positive else 2, 5, size=6):  # overlapping smears: the folds' thresholds differ
            rows.append({"smear_id": f"s{index:02d}", "label": "covid_rl" if positive and value > 0.2 else "normal",
                         "prob_normal": 0.99 - value, "prob_classic_rl": 0.01, "prob_covid_rl": value})
    cells = with_sites(pd.DataFrame(rows), lambda i: "hospital_a" if i % 3 else "hospital_b")
    proposed = SmearRule(score="score_mean_prob", positive_class="covid_rl", threshold=0.5)
    measured = measure_rule(proposed, cells, CLASSES, selection="cross_validated", folds=5, n_resamples=50)
    sites = measured.result["per_site"].values()
    overall = measured.result["confusion"]
    assert {key: sum(site["confusion"][key] for site in sites) for key in overall} == overall
    shipped = measured.calls["call"] == "positive"
    assert (shipped != (measured.calls["blind_call"] == "positive")).any()  # the case the fold calls are for


def test_a_served_version_without_its_rule_file_keeps_the_share_rule_only_when_that_is_what_it_names(tmp_path):
    from smearnet.smear.calls import served_rule

    legacy, _ = served_rule(tmp_path, {"positive_class": "covid_rl", "smear_threshold": 0.02})
    assert legacy.score == "share_predicted_positive" and legacy.threshold == 0.02
    with pytest.raises(SmearnetError, match="names the smear score 'score_noisy_or'"):
        served_rule(tmp_path, {"positive_class": "covid_rl", "smear_threshold": 0.637, "smear_score": "score_noisy_or"})
    save_rule(SmearRule(score="score_noisy_or", positive_class="covid_rl", threshold=0.637), tmp_path)
    assert served_rule(tmp_path, {"smear_score": "score_noisy_or"})[0].threshold == 0.637
