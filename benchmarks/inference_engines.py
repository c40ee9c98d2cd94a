"""Inference engines side by side, in one run: eager fp32 (the reference) against bf16, torch.compile and ONNX
Runtime fp32/int8, for one trained model over a fixed number of cells.

    .venv/bin/python benchmarks/inference_engines.py --model-dir models/xception71 --manifest data/split/manifest.csv \
        [--cells 1491] [--input-size 299] [--center-crop 1.0] [--engines eager-fp32,eager-bf16-cl,...] [--batch-size 8]

Cells are the manifest's test split, topped up from its validation split to ``--cells`` (the paper timed 1,491
test cells). int8 is calibrated on ``--calibration-images`` training cells. ``--input-size``/``--center-crop``
run the model at another input than it was trained at (e.g. a network trained at 128 px timed at the paper's
299 px; its accuracy then says little, the agreement with eager fp32 still does). Each row: build time (export,
quantisation, compilation), ms/image over the cells (decode + resize included, median of ``--repeats``), the
image pipeline alone, peak RSS increase, accuracy and agreement with eager fp32. Writes
``reports/benchmarks/inference_engines.{csv,md}``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from smearnet.benchmark import benchmark_model, markdown_table
from smearnet.engines import engine_spec
from smearnet.inference import calibration_batches, load_trained, with_engine
from smearnet.io import read_table, write_text

DEFAULT_ENGINES = "eager-fp32,eager-bf16-cl,compile-bf16-cl,onnxruntime-fp32,onnxruntime-int8"
COLUMNS = ["engine", "precision", "channels_last", "batch_size", "images", "build_seconds", "ms_per_image",
           "images_per_second", "speedup", "preprocess_ms_per_image", "peak_memory_mb", "accuracy", "agreement",
           "max_probability_difference"]


def parse_engine(text: str, batch_size: int):
    parts = text.split("-")
    return engine_spec({"engine": parts[0], "precision": parts[1], "channels_last": "cl" in parts[2:],
                        "batch_size": batch_size})


def benchmark_cells(manifest: pd.DataFrame, count: int) -> pd.DataFrame:
    test = manifest[manifest["split"] == "test"]
    extra = manifest[manifest["split"] == "val"]
    return pd.concat([test, extra]).iloc[:count].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, default=Path("data/split/manifest.csv"))
    parser.add_argument("--cells", type=int, default=1491)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--center-crop", type=float, default=None)
    parser.add_argument("--engines", default=DEFAULT_ENGINES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/engines"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = parser.parse_args()

    model = load_trained(args.model_dir)
    if args.input_size or args.center_crop:
        spec = dict(model.input_spec)
        if args.input_size:
            spec["input_size"] = (args.input_size, args.input_size)
        if args.center_crop:
            spec["center_crop"] = args.center_crop
        model = replace(model, input_spec=spec)
    manifest = read_table(args.manifest)
    cells = benchmark_cells(manifest, args.cells)
    train = manifest[manifest["split"] == "train"]
    calibration = calibration_batches(model, train, images=args.calibration_images)
    print(f"{model.name} ({model.meta['model_cfg']['arch']}) at {model.input_spec['input_size']}, {len(cells)} cells, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows, reference = [], None
    for text in args.engines.split(","):
        spec = parse_engine(text, args.batch_size)
        start = time.perf_counter()
        engined = with_engine(model, spec, cache_dir=args.cache_dir, calibration=calibration)
        engined.logits(calibration()[0][:1].expand(spec.batch_size, -1, -1, -1).contiguous())  # compile / load
        build = time.perf_counter() - start
        row = benchmark_model(engined, cells, warmup=1, repeats=args.repeats, reference=reference,
                              build_seconds=build)
        if reference is None:
            reference = row["probabilities"]
            row.update(agreement=1.0, max_probability_difference=0.0)
        row.pop("probabilities")
        row["speedup"] = round(rows[0]["ms_per_image"] / row["ms_per_image"], 2) if rows else 1.0
        rows.append(row)
        print(" | ".join(f"{c}={row.get(c)}" for c in COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    write_text(pd.DataFrame(rows).to_csv(index=False), args.out / "inference_engines.csv")
    write_text(f"# Inference engines: {model.name} at {model.input_spec['input_size']}, {len(cells)} cells, "
               f"{rows[0]['device']}\n\n" + table, args.out / "inference_engines.md")


if __name__ == "__main__":
    main()
