"""DVC stage `upsample`: augment every class of the training split up to `augment.per_class` images."""

from pathlib import Path

import pandas as pd

from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.io import atomic_directory, read_table, write_json, write_manifest
from smearnet.upsample import materialise, plan_upsampling, upsample_summary


def main() -> None:
    cfg = load_params()
    split_manifest = read_table(Path("data/split/manifest.csv"))
    train = split_manifest[split_manifest["split"] == "train"]
    classes = list(cfg.data.classes)
    plan = plan_upsampling(train, classes, int(cfg.augment.per_class), seed=int(cfg.seed))
    with atomic_directory(Path("data/upsampled")) as out_dir:
        created = materialise(plan, out_dir, cfg.augment, workers=int(cfg.augment.workers))
        originals = train.assign(augmented_from="")[list(created.columns)]
        upsampled = pd.concat([originals, created], ignore_index=True)
        write_manifest(upsampled, out_dir / "manifest.csv")
    write_json(upsample_summary(train, upsampled, classes, int(cfg.augment.per_class)), Path("metrics/upsample.json"))


if __name__ == "__main__":
    run_cli(main)
