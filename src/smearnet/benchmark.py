"""Table 1 of paper 1: accuracy, memory and execution time of each trained backbone (timm benchmark style)."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import psutil
import torch

from smearnet.errors import SmearnetError
from smearnet.inference import TrainedModel, predict_probabilities


class PeakMemory:
    """Peak process RSS (MB) above the level at entry, sampled every few milliseconds; CUDA peak when used."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self):
        self._process = psutil.Process()
        self._baseline = self._process.memory_info().rss
        self._peak = self._baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mb = (self._peak - self._baseline) / 2**20
        return False


def benchmark_model(model: TrainedModel, manifest: pd.DataFrame, *, batch_size: int, warmup: int, repeats: int,
                    precision: str = "fp32", channels_last: bool = False) -> dict:
    """Accuracy and time over every cell of `manifest`: `warmup` untimed passes, then `repeats` timed passes."""
    if manifest.empty:
        raise SmearnetError("The benchmark split holds no cells.", "check data/split/manifest.csv (test split).")
    targets = np.array([model.classes.index(label) for label in manifest["label"]])
    options = dict(batch_size=batch_size, precision=precision, channels_last=channels_last, progress=False)
    warm = manifest.iloc[: max(batch_size, 1)]
    for _ in range(warmup):
        predict_probabilities(model, warm, **options)
    times = []
    with PeakMemory() as memory:
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            probabilities = predict_probabilities(model, manifest, **options)
            times.append(time.perf_counter() - start)
    total = float(np.median(times))
    accuracy = float((probabilities.argmax(axis=1) == targets).mean())
    return {
        "model": model.name,
        "arch": model.meta["model_cfg"]["arch"],
        "input_size": "x".join(str(v) for v in model.input_spec["input_size"]),
        "device": device_name(),
        "precision": precision,
        "images": int(len(manifest)),
        "accuracy": round(accuracy, 4),
        "total_seconds": round(total, 3),
        "ms_per_image": round(1000 * total / len(manifest), 3),
        "images_per_second": round(len(manifest) / total, 2),
        "peak_memory_mb": round(memory.peak_mb, 1),
        "memory_kind": "cuda_peak" if torch.cuda.is_available() else "process_rss_increase",
        "parameters_m": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 2),
        "threads": torch.get_num_threads(),
    }


def select_model(rows: Sequence[dict], rule: str = "accuracy_then_time") -> tuple[str, str]:
    """The paper's choice: highest accuracy, ties broken by shorter time. Returns (name, reason)."""
    if not rows:
        raise SmearnetError("No trained backbone to select from.", "check `train.models` and the train stage.")
    if rule != "accuracy_then_time":
        raise SmearnetError(f"Unknown `benchmark.select_by` rule `{rule}`.", "use `accuracy_then_time`.")
    ranked = sorted(rows, key=lambda r: (-r["accuracy"], r["total_seconds"]))
    best = ranked[0]
    reason = f"highest test accuracy {best['accuracy']:.4f}"
    if len(ranked) > 1:
        runner = ranked[1]
        if runner["accuracy"] == best["accuracy"]:
            reason = (f"tied accuracy {best['accuracy']:.4f} with {runner['model']}; faster "
                      f"({best['total_seconds']} s vs {runner['total_seconds']} s)")
        else:
            reason += f" (next: {runner['model']} at {runner['accuracy']:.4f})"
    return best["model"], reason


def device_name() -> str:
    """CPU model (or CUDA device) for the benchmark row."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of `rows`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
