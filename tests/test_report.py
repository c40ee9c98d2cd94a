from smearnet.evaluation.report import build_report

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
