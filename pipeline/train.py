"""DVC stage `train@<backbone>`: fine-tune one configured backbone on the upsampled training split."""

import sys
from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import SmearnetError, run_cli
from smearnet.io import read_table, write_json
from smearnet.models.settings import TrainSettings
from smearnet.models.training import train_backbone


def main() -> None:
    if len(sys.argv) != 2:
        raise SmearnetError("Usage: python pipeline/train.py <backbone>.", "name one of `train.models`.")
    name = sys.argv[1]
    # An unknown backbone fails here, before any data is read.
    settings = TrainSettings.from_params(stage_params("train", item=name, item_kind="backbone"), name)
    train_manifest = read_table(Path("data/upsampled/manifest.csv"))
    split_manifest = read_table(Path("data/split/manifest.csv"))
    val_manifest = split_manifest[split_manifest["split"] == "val"]
    metrics = train_backbone(settings, train_manifest, val_manifest, Path("models") / name, Path("checkpoints") / name)
    if metrics:
        write_json(metrics, Path("metrics/train") / f"{name}.json")


if __name__ == "__main__":
    run_cli(main)
