from smearnet.evaluation.report import build_report, difference_text

CELL = {"n_cells": 100, "accuracy": {"value": 0.9, "low": 0.82, "high": 0.95},
        "macro_f1": {"value": 0.85, "low": 0.8, "high": 0.9},
        "positive": {"class": "covid_rl", "sensitivity": {"value": 0.8, "low": 0.5, "high": 0.95},
                     "specificity": {"value": 0.99, "low": 0.95, "high": 1.0},
                     "precision": {"value": 0.7, "low": 0.4, "high": 0.9}, "accuracy": {"value": 0.98, "low": 0.9, "high": 1.0}}}
SMEAR = {"n_smears": 92, "n_positive_smears": 58, "n_negative_smears": 34, "n_blind_smears": 46, "score": "share",
         "rule": "youden", "threshold_selection": "held_out", "threshold": 0.02,
         "auc": {"value": 0.94, "low": 0.88, "high": 0.98}, "confusion": {"tp": 28, "fn": 1, "tn": 16, "fp": 1},
         "binary_summary": {k: {"value": 0.97, "low": 0.9, "high": 1.0} for k in ("sensitivity", "specificity", "precision", "accuracy")}}


def test_report_sets_numbers_beside_the_paper_and_embeds_plots():
    text = build_report("# t\n\n| model |\n|---|\n| r |\n", {"selected": "r", "reason": "best"}, CELL, SMEAR)
    assert "| AUC | 0.940 (0.880-0.980) | 0.939 |" in text
    assert "paper: TP 57, FN 1, TN 33, FP 1" in text and "TP 28" in text
    assert "![confusion matrix](evaluate/confusion.png)" in text and "![smear ROC](smear/roc.png)" in text
    assert "optimistic" in text and "Selected **r**" in text


def test_report_shows_the_rules_cell_threshold_and_each_sites_figures_when_present():
    plain = build_report("| r |\n", {"selected": "r"}, CELL, SMEAR)
    assert "## 4." not in plain and "## 5. Sites" not in plain  # one site, arg-max: nothing extra
    calls = {"counts": {"tp": 9, "fp": 3, "fn": 1, "tn": 87}, "f1": 0.818,
             "sensitivity": {"value": 0.9, "low": 0.6, "high": 0.98}, "precision": {"value": 0.75, "low": 0.47, "high": 0.91}}
    sites = {"A": {"n_cells": 60, "n_patients": 3, "accuracy": {"value": 0.95, "low": 0.86, "high": 0.98},
                   "positive": {"sensitivity": {"value": 0.8}, "precision": {"value": 0.7}}},
             "B": {"n_cells": 40, "n_patients": 2, "accuracy": {"value": 0.825, "low": 0.68, "high": 0.91},
                   "positive": {"sensitivity": {"value": 0.5}, "precision": {"value": 0.6}}}}
    smear_sites = {"A": {"n_smears": 3, "n_positive_smears": 2, "n_negative_smears": 1,
                         "auc": {"value": 1.0, "low": 1.0, "high": 1.0}},
                   "B": {"n_smears": 2, "n_positive_smears": 2, "n_negative_smears": 0, "auc": {"value": float("nan")},
                         "note": "no negative smears at this site"}}
    text = build_report("| r |\n", {"selected": "r"}, {**CELL, "per_site": sites},
                        {**SMEAR, "per_site": smear_sites,
                         "positive_cells": {"class": "covid_rl", "cell_threshold": 0.3871, "at_cell_threshold": calls,
                                            "at_argmax": {**calls, "f1": 0.5}}})
    assert "| p >= 0.3871 (the rule's) | 0.900 (0.600-0.980) | 0.750 (0.470-0.910) | 0.818 | 9 / 3 / 1 |" in text
    assert "| arg-max |" in text and "0.500" in text
    assert "| B | 40 | 2 | 0.825 (0.680-0.910) | 0.500 | 0.600 |" in text
    assert "| B | 2 (2 / 0) | n/a |" in text and "no negative smears at this site" in text


def test_report_says_how_often_composed_smears_reuse_their_cells():
    reuse = {"blind_smears": 200, "distinct_cells": 150, "cell_draws": 6000, "mean_draws_per_cell": 40.0,
             "max_draws_per_cell": 61, "note": "composed smears share cells"}
    text = build_report("| r |\n", {"selected": "r"}, CELL, {**SMEAR, "composed_cell_reuse": reuse})
    assert "The 200 blind smears are composed from 150 distinct cells, each drawn 40.0 times on average (at most 61)" in text
    assert "distinct cells" not in build_report("| r |\n", {"selected": "r"}, CELL, SMEAR)


def test_report_gives_the_patient_resampled_interval_when_cells_cluster_in_few_patients():
    clustered = {**CELL, "accuracy_by_patient": {"value": 0.9, "low": 0.6, "high": 1.0, "patients": 5}}
    text = build_report("| r |\n", {"selected": "r"}, clustered, SMEAR)
    assert "come from 5 patients" in text and "0.600-1.000" in text and "macro-F1 interval" not in text
    both = {**clustered, "macro_f1_by_patient": {"value": 0.8, "low": 0.41, "high": 0.97, "patients": 5}}
    assert "accuracy interval is 0.600-1.000 and the macro-F1 interval 0.410-0.970." in build_report(
        "| r |\n", {"selected": "r"}, both, SMEAR)
    one_each = {**CELL, "accuracy_by_patient": {"value": 0.9, "low": 0.84, "high": 0.95, "patients": 100}}
    assert "patients" not in build_report("| r |\n", {"selected": "r"}, one_each, SMEAR).split("## 3.")[0]


def test_report_gives_the_accuracy_at_the_class_mix_only_when_the_run_set_one():
    assert "class mix" not in build_report("| r |\n", {"selected": "r"}, CELL, SMEAR)
    mixed = {**CELL, "accuracy_at_class_mix": {"value": 0.962, "low": 0.931, "high": 0.978,
                                               "mix": {"normal": 90.0, "covid_rl": 10.0}}}
    text = build_report("| r |\n", {"selected": "r"}, mixed, SMEAR).split("## 3.")[0]
    assert "(normal 90%, covid_rl 10%)" in text and "accuracy 0.962 (0.931-0.978)" in text


def test_report_sets_the_number_of_cells_alone_beside_the_smear_auc():
    counted = {**SMEAR, "cell_count_auc": {"value": 0.896, "low": 0.78, "high": 0.97, "n_positive": 58,
                                           "n_negative": 34}}
    assert "| AUC of the number of cells alone (baseline) | 0.896 (0.780-0.970) | n/a |" in build_report(
        "| r |\n", {"selected": "r"}, CELL, counted)
    assert "number of cells alone" not in build_report("| r |\n", {"selected": "r"}, CELL, SMEAR)


def test_a_difference_is_written_signed_with_its_interval():
    assert difference_text({"value": 0.068, "low": -0.008, "high": 0.2061}) == "+0.068 (-0.008 to +0.206)"
    assert difference_text({"value": 0.0, "low": 0.0, "high": 0.0}) == "+0.000 (+0.000 to +0.000)"
