"""Inference engines side by side: eager fp32 (the reference) against bf16, torch.compile (fp32, bf16, PT2E int8),
ONNX Runtime fp32/int8 and OpenVINO (fp32, bf16, NNCF int8 under accuracy control), for one or more trained models
over a fixed number of cells, in one run.

    .venv/bin/python benchmarks/inference_engines.py --model models/xception71 [--model models/xception71@299 ...]
        [--manifest data/split/manifest.csv] [--cells 200] [--probe-cells 48] [--engines eager-fp32,...]
        [--batch-sizes 1,8,16] [--threads 1,2] [--accuracy-control-images 200]

`--model DIR[@SIZE]`: a train-stage (or registered) model folder, optionally run at SIZE px instead of the size it
was trained at (e.g. an xception71 trained at 96 px timed at the paper's 299 px: its accuracy there says little,
and its agreement with eager fp32 counts near-ties; its time is what that input costs).

Cells are the manifest's test split, topped up from its validation split to ``--cells``; nothing here is chosen
on them (the pipeline's `inference.engine: auto` chooses on validation cells). Each engine runs in a process of
its own for each thread count (a 7-engine run in one process peaked at 17.7 GB). Batch sizes are compared on the
first ``--probe-cells`` of the cells (0: on all of them) and the fastest is timed on all. int8 is calibrated on
``--calibration-images`` training cells; OpenVINO int8 is quantised under accuracy control (agreement with eager
fp32 may fall by at most ``--max-agreement-drop``, 0.003 = `inference.fidelity`'s) on ``--accuracy-control-images``
validation cells, disjoint from both the calibration cells and the test cells it is measured on, at the size the
model was trained at (plain NNCF int8 at another size). Each row: build time (export, quantisation, compilation),
ms/image over the cells (decode + resize included, median of ``--repeats``), the image pipeline alone, the
process's peak RSS, accuracy and agreement with eager fp32 (computed once, in the parent, with all threads). Name
the CPU with every figure: the first line prints it. Writes ``reports/benchmarks/inference_engines.{csv,md}``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from smearnet.evaluation.benchmark import benchmark_specs, device_name, markdown_table
from smearnet.models.engines import EngineSpec, Fidelity, build_engine, parse_engine_label
from smearnet.models.inference import calibration_batches, load_trained, predict_probabilities
from smearnet.io import read_table, write_text

DEFAULT_ENGINES = ("eager-fp32,eager-bf16-cl,compile-bf16-cl,onnxruntime-fp32,onnxruntime-int8,compile-int8-cl,"
                   "compile-int8+bf16-cl,openvino-fp32,openvino-bf16,openvino-int8,openvino-int8+bf16")
COLUMNS = ["model", "engine", "threads", "batch_size", "images", "build_seconds", "ms_per_image", "images_per_second",
           "speedup", "preprocess_ms_per_image", "process_peak_rss_mb", "accuracy", "agreement",
           "max_probability_difference", "batches_tried"]


def benchmark_cells(manifest: pd.DataFrame, count: int) -> pd.DataFrame:
    """`count` cells spread evenly over the test split, then the validation split (a manifest is often ordered by
    class: the first rows alone would be one class)."""
    import numpy as np

    cells = pd.concat([manifest[manifest["split"] == "test"], manifest[manifest["split"] == "val"]])
    if count >= len(cells):
        return cells.reset_index(drop=True)
    test = int((manifest["split"] == "test").sum())
    pool = cells.iloc[:test] if count <= test else cells
    return pool.iloc[np.linspace(0, len(pool) - 1, count).round().astype(int)].reset_index(drop=True)


def matmul_peak_tflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul throughput (TFLOP/s) in `dtype` on all threads: the CPU's practical peak."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def conv_peak_tops(precision: str, channels: int = 1024, size: int = 32, depth: int = 8, batch: int = 8,
                   repeats: int = 5) -> float:
    """Measured throughput (tera-ops/s) of a stack of `depth` 1x1 convolutions + ReLU, `channels` wide, through
    the compile engine in `precision` (bf16, or PT2E int8 with activations kept int8 between the convolutions):
    what dense convolutions can reach here, the way an engine runs them."""
    layers = [torch.nn.Conv2d(3, channels, 1, bias=False)]
    for _ in range(depth):
        layers += [torch.nn.Conv2d(channels, channels, 1, bias=False), torch.nn.ReLU()]
    images = torch.randn(batch, 3, size, size)
    engine = build_engine(torch.nn.Sequential(*layers), {"input_size": [size, size]},
                          EngineSpec(engine="compile", precision=precision, channels_last=True, batch_size=batch),
                          calibration=lambda: [images])
    engine(images)
    start = time.perf_counter()
    for _ in range(repeats):
        engine(images)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    return 2 * batch * size * size * channels * (3 + depth * channels) * repeats / seconds / 1e12


def layer_time_split(net: torch.nn.Module, images: torch.Tensor, *, bf16: bool) -> dict[str, dict[str, float]]:
    """Forward time and FLOPs by layer kind (depthwise conv, other conv, linear, rest) for one batch, eager,
    channels_last, from forward hooks around every Conv2d/Linear; 'rest' is the remainder of the forward time."""
    import collections

    net = net.eval().to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    stats: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"seconds": 0.0, "gflop": 0.0})
    started: dict[int, float] = {}

    def kind(module) -> str:
        if isinstance(module, torch.nn.Conv2d):
            return "depthwise conv" if module.groups > 1 and module.groups == module.in_channels else "dense conv"
        return "linear"

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, output):
        entry = stats[kind(module)]
        entry["seconds"] += time.perf_counter() - started.pop(id(module))
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            macs = output.numel() * module.in_features
        entry["gflop"] += 2 * macs / 1e9

    handles = [h for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(images)
            stats.clear()
            start = time.perf_counter()
            net(images)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    stats["rest (norm, activation, pooling, adds)"]["seconds"] = total - sum(v["seconds"] for v in stats.values())
    return dict(stats)


def print_limit(model, images: torch.Tensor) -> None:
    """Where the time goes in eager bf16, against the CPU's measured matmul peak: the floor an engine can reach."""
    peak = matmul_peak_tflops(torch.bfloat16)
    split = layer_time_split(model.net, images, bf16=True)
    total = sum(v["seconds"] for v in split.values())
    gflop = sum(v["gflop"] for v in split.values())
    print(f"\nWhere eager bf16 + channels_last spends one batch of {len(images)} ({1000 * total / len(images):.1f} "
          f"ms/image, {gflop / len(images):.1f} GFLOP/image); measured bf16 matmul peak {peak:.2f} TFLOP/s "
          f"(fp32: {matmul_peak_tflops(torch.float32):.2f}):")
    for name, entry in sorted(split.items(), key=lambda item: -item[1]["seconds"]):
        rate = entry["gflop"] / entry["seconds"] / 1000 if entry["seconds"] > 0 and entry["gflop"] else float("nan")
        print(f"  {name:40s} {1000 * entry['seconds'] / len(images):7.2f} ms/image "
              f"({100 * entry['seconds'] / total:4.1f}%), {entry['gflop'] / len(images):6.2f} GFLOP/image, "
              f"{rate:.3f} TFLOP/s")
    dense = split.get("dense conv", {"gflop": 0.0})["gflop"] / len(images)
    print(f"  floor at the bf16 matmul peak: {1000 * gflop / len(images) / (peak * 1000):.1f} ms/image")
    for precision in ("bf16", "int8"):
        rate = conv_peak_tops(precision)
        print(f"  1x1 convolutions through compile {precision}: {rate:.2f} tera-ops/s, so the dense convolutions "
              f"alone need {dense / rate:.1f} ms/image")


def parse_model(entry: str) -> tuple[Path, int | None]:
    """`DIR[@SIZE]` as (folder, size or None)."""
    folder, _, size = entry.partition("@")
    return Path(folder), int(size) if size else None


def load_model(entry: str, manifest_path: Path, count: int, center_crop: float | None = None) -> tuple:
    """The trained model of `entry` (at its @SIZE and `center_crop` when given), the input size it was trained at,
    the benchmark cells, the training cells and the validation cells (accuracy control)."""
    folder, size = parse_model(entry)
    model = load_trained(folder)
    trained_at = tuple(int(v) for v in model.input_spec["input_size"])
    if size or center_crop:
        spec = dict(model.input_spec)
        if size:
            spec["input_size"] = (size, size)
        if center_crop:
            spec["center_crop"] = center_crop
        model = replace(model, input_spec=spec)
    manifest = read_table(manifest_path)
    return (model, trained_at, benchmark_cells(manifest, count), manifest[manifest["split"] == "train"],
            manifest[manifest["split"] == "val"])


def at_trained_size(model, trained_at: tuple[int, int]) -> bool:
    """Whether `model` runs at the size it was trained at."""
    return tuple(int(v) for v in model.input_spec["input_size"]) == trained_at


def worker(args) -> None:
    """One engine at one thread count, in this process alone: the batch sizes compared on the probe cells, the
    fastest timed on all cells; rows written as JSON lines (the probe rows marked)."""
    import json
    import resource

    import numpy as np

    from smearnet.models.engines import AccuracyControl

    torch.set_num_threads(args.threads)
    model, trained_at, cells, train, val = load_model(args.model[0], args.manifest, args.cells, args.center_crop)
    calibration = calibration_batches(model, train, images=args.calibration_images)
    control = None
    if args.accuracy_control_images > 0 and at_trained_size(model, trained_at):
        control = AccuracyControl(args.max_agreement_drop,
                                  calibration_batches(model, val, images=args.accuracy_control_images))
    reference = np.load(args.reference)
    specs = [parse_engine_label(args.engines, int(batch)) for batch in args.batch_sizes.split(",")]
    options = dict(warmup=1, repeats=args.repeats, cache_dir=args.cache_dir, calibration=calibration,
                   accuracy_control=control)
    probe = min(args.probe_cells or len(cells), len(cells))
    rows = []
    if len(specs) > 1 and probe < len(cells):
        rows = [{**row, "probe": True} for row in
                benchmark_specs(model, specs, cells.iloc[:probe], reference=reference[:probe], **options)]
        specs = [specs[min(range(len(rows)), key=lambda i: rows[i]["ms_per_image"])]]
    rows += benchmark_specs(model, specs, cells, reference=reference, **options)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_text("".join(json.dumps({**r, "process_peak_rss_mb": round(peak_mb)}) + "\n" for r in rows), args.out_json)


def _px(input_spec) -> str:
    return "x".join(str(int(v)) for v in input_spec["input_size"]) + " px"


def benchmark_entry(entry: str, args, tmp: Path) -> tuple[list[dict], str]:
    """Every engine x thread count for one `--model` entry, each in its own process; the rows and a title."""
    import json
    import subprocess
    import sys

    import numpy as np

    model, trained_at, cells, train, _ = load_model(entry, args.manifest, args.cells, args.center_crop)
    name = f"{model.name} ({model.meta['model_cfg']['arch']}) at {_px(model.input_spec)}"
    trained = "" if at_trained_size(model, trained_at) else f", trained at {_px({'input_size': trained_at})}"
    title = f"{name}{trained}, {len(cells)} cells, {device_name()}"
    print(f"\n== {title}; each engine x threads in its own process, batch {args.batch_sizes} compared on "
          f"{args.probe_cells or len(cells)} cells, the fastest timed on all", flush=True)
    with torch.inference_mode():  # the eager fp32 reference every engine's agreement is measured against
        reference = predict_probabilities(model, cells, batch_size=16, progress=False)
    if not args.no_limit:
        print_limit(model, torch.cat(calibration_batches(model, train, images=16)())[:16])
    np.save(tmp / "reference.npy", reference)
    common = [sys.executable, __file__, "--worker", "--model", entry, "--manifest", str(args.manifest),
              "--cells", str(args.cells), "--probe-cells", str(args.probe_cells), "--batch-sizes", args.batch_sizes,
              "--repeats", str(args.repeats), "--calibration-images", str(args.calibration_images),
              "--accuracy-control-images", str(args.accuracy_control_images),
              "--max-agreement-drop", str(args.max_agreement_drop), "--cache-dir", str(args.cache_dir),
              "--reference", str(tmp / "reference.npy"),
              *(["--center-crop", str(args.center_crop)] if args.center_crop else [])]
    rows = []
    for label in args.engines.split(","):
        for threads in args.threads.split(","):
            out = tmp / f"{label}-{threads}.jsonl"
            done = subprocess.run([*common, "--engines", label, "--threads", threads, "--out-json", str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{label} with {threads} threads failed:\n{done.stderr[-2000:]}", flush=True)
                continue
            tried = [json.loads(line) for line in out.read_text().splitlines()]
            timed = tried[-1]  # the fastest batch size over all cells
            rows.append({**timed, "model": name, "engine": label.split("@")[0], "threads": int(threads),
                         "build_seconds": max(r["build_seconds"] for r in tried),  # the first build
                         "batches_tried": " / ".join(f"{r['batch_size']}: {r['ms_per_image']}" for r in tried
                                                     if r.get("probe")) or str(timed["batch_size"])})
            print(" | ".join(f"{c}={rows[-1].get(c)}" for c in COLUMNS if c != "speedup"), flush=True)
    for row in rows:
        reference_row = next((r for r in rows if r["engine"] == "eager-fp32" and r["threads"] == row["threads"]), row)
        row["speedup"] = round(reference_row["ms_per_image"] / row["ms_per_image"], 2)
    return rows, title


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="DIR[@SIZE]; repeat for several models")
    parser.add_argument("--manifest", type=Path, default=Path("data/split/manifest.csv"))
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--probe-cells", type=int, default=48, help="batch sizes compared on these (0: all cells)")
    parser.add_argument("--center-crop", type=float, default=None)
    parser.add_argument("--engines", default=DEFAULT_ENGINES)
    parser.add_argument("--batch-sizes", default="1,8,16", help="each engine's best of these is reported")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, each timed separately")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--accuracy-control-images", type=int, default=200, help="0: plain NNCF int8")
    parser.add_argument("--max-agreement-drop", type=float, default=Fidelity().max_agreement_drop)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/engines"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--no-limit", action="store_true", help="skip the per-layer time split and matmul peak")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)

    [parse_engine_label(label, 1) for label in args.engines.split(",")]  # a bad label stops here, before any timing
    started = time.perf_counter()
    rows, sections = [], []
    for entry in args.model:
        with tempfile.TemporaryDirectory(prefix="smearnet-engines-") as tmp:
            model_rows, title = benchmark_entry(entry, args, Path(tmp))
        table = markdown_table(model_rows, COLUMNS)
        print("\n" + table, flush=True)
        rows += model_rows
        sections.append(f"## {title}\n\n{table}")
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(rows)} rows in {minutes:.1f} min")
    write_text(pd.DataFrame(rows).to_csv(index=False), args.out / "inference_engines.csv")
    write_text(f"# Inference engines ({device_name()}, {minutes:.1f} min)\n\n" + "\n".join(sections),
               args.out / "inference_engines.md")


if __name__ == "__main__":
    main()
