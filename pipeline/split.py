"""DVC stage `split`: patient-grouped, stratified train/val/test; assessment smears kept apart."""

from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import read_table, write_json, write_manifest
from smearnet.data.split import split_by_patient, split_summary


def main() -> None:
    params = stage_params("split")
    manifest = read_table(Path("data/ingested/manifest.csv"))
    split_manifest = split_by_patient(manifest, params.split, seed=int(params.seed))
    write_manifest(split_manifest, Path("data/split/manifest.csv"))
    write_json(split_summary(split_manifest), Path("metrics/split.json"))


if __name__ == "__main__":
    run_cli(main)
