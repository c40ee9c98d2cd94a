"""DVC stage `split`: patient-grouped, stratified train/val/test that keeps every earlier patient's split;
assessment smears kept apart.

`data/split_assignments/patients.csv` is the split's memory (patient_id, split; raw ids, DVC-cached, never in git).
dvc.yaml declares it `persist: true`, so DVC keeps it between runs: it is read before dealing and rewritten with
the new patients appended (`smearnet.data.split.sticky_split_by_patient`).
"""

from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import read_table, write_json, write_manifest
from smearnet.data.split import (assessment_smear_warning, assignment_counts, read_assignments, split_summary,
                                 sticky_split_by_patient)

ASSIGNMENTS = Path("data/split_assignments/patients.csv")


def main() -> None:
    params = stage_params("split")
    manifest = read_table(Path("data/ingested/manifest.csv"))
    earlier = read_assignments(ASSIGNMENTS)
    split_manifest, assignments = sticky_split_by_patient(manifest, params.split, seed=int(params.seed),
                                                          earlier=earlier, positive_class=params.data.positive_class)
    summary = split_summary(split_manifest, params.data.positive_class)
    warning = assessment_smear_warning(summary, params.data.positive_class)  # stops here, not after training
    write_manifest(split_manifest, Path("data/split/manifest.csv"))
    write_manifest(assignments, ASSIGNMENTS)
    # metrics/split.json is git-tracked and must be what any clone computes from the same data; how many patients
    # the memory kept depends on this workspace's history, so it is printed, not committed.
    write_json(summary, Path("metrics/split.json"))
    counts = assignment_counts(split_manifest, earlier)
    print(f"split: {counts['kept']} patients kept their earlier split, {counts['new']} newly dealt, "
          f"{counts['remembered_absent']} remembered but absent from this manifest")
    if warning:
        print(f"split: warning: {warning}")


if __name__ == "__main__":
    run_cli(main)
