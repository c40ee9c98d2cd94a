"""DVC stage `upsample`: augment every class of the training split up to `augment.per_class` images."""

import sys
from pathlib import Path

import pandas as pd

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import atomic_directory, read_table, write_json, write_manifest
from smearnet.data.upsample import materialise, plan_upsampling, upsample_summary


def main() -> None:
    params = stage_params("upsample")
    split_manifest = read_table(Path("data/split/manifest.csv"))
    train = split_manifest[split_manifest["split"] == "train"]
    classes = list(params.data.classes)
    augment = params.augment
    per_class = int(augment.per_class)
    plan = plan_upsampling(train, classes, per_class, seed=int(params.seed))
    with atomic_directory(Path("data/upsampled")) as out_dir:
        created = materialise(plan, out_dir, augment, workers=int(augment.workers))
        originals = train.assign(augmented_from="")[list(created.columns)]
        upsampled = pd.concat([originals, created], ignore_index=True)
        write_manifest(upsampled, out_dir / "manifest.csv")
    summary = upsample_summary(train, upsampled, classes, per_class)
    write_json(summary, Path("metrics/upsample.json"))
    if summary["above_target"]:
        counts = ", ".join(f"{c}: {summary['classes'][c]['originals']}" for c in summary["above_target"])
        print(f"smearnet: warning: class(es) {summary['above_target']} already have more training images than "
              f"augment.per_class={per_class} ({counts}); all their originals are kept and none are created, so "
              "the training set stays imbalanced. Raise augment.per_class to at least the largest class to "
              "balance it (listed as `above_target` in metrics/upsample.json).", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
