"""Smear-level (per-patient) decisions: scores, composition, choice, thresholds and the one deployed rule.

- ``scores``: pure smear scores of cell probabilities and the per-smear table.
- ``roc``: ROC, AUC intervals, threshold rules and the evaluation of a score over smears.
- ``compose``: the one composition model for smears simulated from cells.
- ``cell_threshold``: when one cell counts as a positive call (``smear.cell_threshold``), chosen on validation cells.
- ``selection``: every score cross-validated on composed development smears, one chosen (aggregate stage).
- ``rule``: ``SmearRule``, the rule that is measured, packaged with a model and applied by ``classify``.
- ``simulate``: smears simulated under a stated cell-level confusion (benchmarks).
- ``report``: the aggregate stage's Markdown.
"""

from smearnet.smear.cell_threshold import (CELL_THRESHOLD_SETTINGS, CellThreshold, check_cell_threshold_setting,
                                           f1_cell_threshold, positive_call_summary, resolve_cell_threshold)
from smearnet.smear.compose import (BACKGROUND, LOOKALIKE, TARGET, SmearDesign, SmearMix, compose_bags,
                                    compose_smears, design_fitted_to_smears, design_from_config,
                                    evaluation_smears, patient_parts,
                                    plan_smear_mixes, smear_keys)
from smearnet.smear.measure import (SELECTIONS, RuleMeasurement, measure_rule, positive_cell_metrics,
                                    site_smear_metrics, smear_sites)
from smearnet.smear.report import roc_curves, scores_markdown
from smearnet.smear.roc import (SAME_NOTE, THRESHOLD_RULES, THRESHOLD_SELECTIONS, auc_interval, classify,
                                roc_points, select_threshold, smear_evaluation)
from smearnet.smear.rule import MIL_DIR, RULE_FILE, UNDETERMINED, SmearRule, load_rule, save_rule
from smearnet.smear.scores import (FIXED_SCORES, MIL_SCORE, SCORE_DESCRIPTIONS, SCORES, SMEAR_SCORES, cell_calls,
                                   expected_positive, mean_probability, noisy_or, share_of_calls, smear_table,
                                   top_k_mean)
from smearnet.smear.selection import (AggregateParams, AggregationResult, AssessmentResult, CellSet,
                                      DevelopmentResult, ScoreChoice, assess, choose_score, development_evaluation,
                                      development_folds, natural_bags, run_aggregation, score_aucs, score_smears,
                                      train_composed_mil)
from smearnet.smear.simulate import SimulatedSmears, implied_cell_auc, simulate_smear_probabilities

__all__ = [
    "CELL_THRESHOLD_SETTINGS", "CellThreshold", "cell_calls", "check_cell_threshold_setting", "f1_cell_threshold",
    "positive_call_summary", "positive_cell_metrics", "resolve_cell_threshold", "site_smear_metrics", "smear_sites",
    "BACKGROUND", "FIXED_SCORES", "LOOKALIKE", "MIL_DIR", "MIL_SCORE", "RULE_FILE", "SAME_NOTE", "SCORES",
    "SCORE_DESCRIPTIONS", "SMEAR_SCORES", "TARGET", "THRESHOLD_RULES", "THRESHOLD_SELECTIONS", "UNDETERMINED",
    "AggregateParams", "AggregationResult", "AssessmentResult", "CellSet", "DevelopmentResult", "ScoreChoice",
    "SimulatedSmears", "SmearDesign", "SmearMix", "SmearRule", "assess", "auc_interval", "choose_score",
    "classify", "compose_bags", "compose_smears", "evaluation_smears", "measure_rule", "RuleMeasurement",
    "SELECTIONS", "design_fitted_to_smears", "design_from_config", "development_evaluation",
    "development_folds", "expected_positive", "implied_cell_auc", "load_rule", "mean_probability",
    "natural_bags", "noisy_or", "patient_parts", "plan_smear_mixes", "roc_curves", "roc_points", "run_aggregation", "scores_markdown",
    "save_rule", "score_aucs", "score_smears", "select_threshold", "share_of_calls",
    "simulate_smear_probabilities", "smear_keys", "smear_evaluation", "smear_table", "top_k_mean", "train_composed_mil",
]
