"""Table 1 of paper 1: accuracy, memory and execution time of each trained backbone (timm benchmark style)."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch

from smearnet.data.loaders import make_loader
from smearnet.errors import SmearnetError
from smearnet.models.engines import EngineSpec, Fidelity
from smearnet.models.hardware import cpu_isa
from smearnet.models.inference import TrainedModel, predict_probabilities


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


def benchmark_model(model: TrainedModel, manifest: pd.DataFrame, *, warmup: int, repeats: int,
                    reference: np.ndarray | None = None, build_seconds: float = 0.0,
                    preprocess_ms: float | None = None) -> dict:
    """Accuracy and time over every cell of `manifest` through the model's engine (eager fp32 when none):
    `warmup` untimed passes over one batch, then `repeats` timed passes over all cells (median kept).

    `reference`, the fp32 eager probabilities of the same cells, gives the share of cells whose predicted class
    agrees with it and the largest probability difference. Decoding and resizing are timed with the model (as a
    user waits for them) and also alone (`preprocess_ms_per_image`; pass `preprocess_ms` when already measured
    for these cells), so a slow image pipeline shows.
    """
    if manifest.empty:
        raise SmearnetError("The benchmark split holds no cells.", "check data/split/manifest.csv (validation split).")
    spec = model.engine.spec if model.engine is not None else EngineSpec()
    targets = np.array([model.classes.index(label) for label in manifest["label"]])
    options = dict(batch_size=spec.batch_size, progress=False)
    for _ in range(warmup):
        predict_probabilities(model, manifest.iloc[: max(spec.batch_size, 1)], **options)
    times = []
    with PeakMemory() as memory:
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            probabilities = predict_probabilities(model, manifest, **options)
            times.append(time.perf_counter() - start)
    total = float(np.median(times))
    accuracy = float((probabilities.argmax(axis=1) == targets).mean())
    row = {
        "model": model.name,
        "arch": model.meta["model_cfg"]["arch"],
        "input_size": "x".join(str(v) for v in model.input_spec["input_size"]),
        "device": device_name(),
        "engine": spec.engine,
        "precision": spec.precision,
        "channels_last": spec.channels_last,
        "batch_size": spec.batch_size,
        "tta": spec.tta,
        "images": int(len(manifest)),
        "accuracy": round(accuracy, 4),
        "total_seconds": round(total, 3),
        "ms_per_image": round(1000 * total / len(manifest), 3),
        "images_per_second": round(len(manifest) / total, 2),
        "preprocess_ms_per_image": round(preprocess_ms if preprocess_ms is not None
                                         else 1000 * preprocess_seconds(model, manifest) / len(manifest), 3),
        "build_seconds": round(build_seconds, 2),
        "peak_memory_mb": round(memory.peak_mb, 1),
        "memory_kind": "cuda_peak" if torch.cuda.is_available() else "process_rss_increase",
        "parameters_m": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 2),
        "threads": torch.get_num_threads(),
    }
    if reference is not None:
        row["agreement"] = round(float((probabilities.argmax(axis=1) == reference.argmax(axis=1)).mean()), 5)
        row["max_probability_difference"] = round(float(np.abs(probabilities - reference).max()), 5)
    row["probabilities"] = probabilities
    return row


def preprocess_seconds(model: TrainedModel, manifest: pd.DataFrame) -> float:
    """Time to decode, crop, resize and normalise every cell of `manifest` (the loader alone, no network)."""
    loader = make_loader(manifest, model.classes, model.input_spec, batch_size=32, shuffle=False)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def selection_cells(split_manifest: pd.DataFrame, max_images: int | None = None) -> pd.DataFrame:
    """The cells the benchmark stage compares backbones and engines on and selects by: the validation split (the
    first `max_images` of it), never the test split, which the evaluate stage measures the selected model on once."""
    val = split_manifest[split_manifest["split"] == "val"]
    if val.empty:
        raise SmearnetError("The split has no validation cells, and the benchmark compares and selects backbones on "
                            "them (never on the test split).", "give split.val a share of the patients.")
    return val.iloc[:max_images] if max_images else val


def select_model(rows: Sequence[dict], rule: str = "accuracy_then_time") -> tuple[str, str]:
    """The paper's choice: highest accuracy, ties broken by shorter time, on the rows' cells (the benchmark stage's
    are validation cells: a choice is never made on the test split). Returns (name, reason)."""
    if not rows:
        raise SmearnetError("No trained backbone to select from.", "check `train.models` and the train stage.")
    if rule != "accuracy_then_time":
        raise SmearnetError(f"Unknown `benchmark.select_by` rule `{rule}`.", "use `accuracy_then_time`.")
    ranked = sorted(rows, key=lambda r: (-r["accuracy"], r["total_seconds"]))
    best = ranked[0]
    reason = f"highest validation accuracy {best['accuracy']:.4f}"
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
    return f"cpu ({name}, {cpu_isa()}, {torch.get_num_threads()} threads)"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of `rows`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def benchmark_specs(model: TrainedModel, specs: Sequence, cells: pd.DataFrame, *, warmup: int, repeats: int,
                    cache_dir=None, calibration=None, accuracy_control=None, on_row=None,
                    reference: np.ndarray | None = None) -> list[dict]:
    """One row per engine spec over the same cells, in one run; `agreement` is measured against `reference` (eager
    fp32 probabilities of `cells`) or, without it, against the first spec (eager fp32 in every caller).
    `build_seconds` covers export, quantisation or compilation and the first batch; the image pipeline is timed
    alone once. `on_row(row)` sees each row as done."""
    from smearnet.models.inference import with_engine

    preprocess_ms = 1000 * preprocess_seconds(model, cells) / len(cells) if len(cells) else 0.0
    warm_batch, _ = next(iter(make_loader(cells.iloc[:1], model.classes, model.input_spec, batch_size=1,
                                          shuffle=False)))
    rows = []
    for spec in specs:
        start = time.perf_counter()
        engined = with_engine(model, spec, cache_dir=cache_dir, calibration=calibration,
                              accuracy_control=accuracy_control)
        engined.logits(warm_batch.expand(spec.batch_size, -1, -1, -1).contiguous())  # compile / load a session
        row = benchmark_model(engined, cells, warmup=warmup, repeats=repeats, reference=reference,
                              build_seconds=time.perf_counter() - start, preprocess_ms=preprocess_ms)
        if reference is None:
            reference = row["probabilities"]
            row.update(agreement=1.0, max_probability_difference=0.0)
        row.pop("probabilities")
        rows.append(row)
        del engined
        if spec.engine == "compile":
            torch._dynamo.reset()  # drop the compiled graphs and their frozen weights before the next engine
        if on_row is not None:
            on_row(row)
    return rows


@dataclass(frozen=True)
class AutoEngine:
    """`inference.auto`: with `inference.engine: auto`, the benchmark stage times these engines on the validation
    cells and the model runs by the fastest that keeps `fidelity` (`pick_engine`)."""

    candidates: tuple[EngineSpec, ...]
    fidelity: Fidelity = Fidelity()
    time_tolerance: float = 0.1       # engines within this share of the fastest time count as equally fast: the
                                      # first of them in `candidates` order is taken (timing noise does not flip it)
    skipped: tuple[EngineSpec, ...] = ()  # configured candidates not timed here: PyTorch bf16 without native bf16

    @classmethod
    def from_mapping(cls, inference: Mapping[str, Any]) -> AutoEngine:
        """From the `inference` section: `auto.candidates`, `auto.time_tolerance`, `fidelity`. Every candidate
        runs with `inference.tta` as configured: test-time augmentation is part of what the model computes, not of
        the engine, so auto never drops it. On a CPU without native bf16 the candidates that run PyTorch's bf16
        kernels are skipped (`skipped`): emulated, they are many times slower than fp32 and would only cost time."""
        from smearnet.models.engines import parse_engine_label
        from smearnet.models.hardware import native_bf16

        auto = inference["auto"]
        tta = bool(inference.get("tta", False))
        candidates = tuple(replace(spec, tta=spec.tta or tta) for spec in
                           (parse_engine_label(label, int(inference["batch_size"])) for label in auto["candidates"]))
        if not candidates:
            raise SmearnetError("inference.engine is auto but inference.auto.candidates is empty.",
                                "list the engines to try, e.g. [eager-bf16-cl, openvino-bf16, compile-int8-cl].")
        skipped = () if native_bf16() else tuple(spec for spec in candidates if spec.needs_native_bf16)
        return cls(candidates=tuple(spec for spec in candidates if spec not in skipped),
                   fidelity=Fidelity.from_mapping(inference["fidelity"]), time_tolerance=float(auto["time_tolerance"]),
                   skipped=skipped)


def pick_engine(rows: Sequence[dict], auto: AutoEngine) -> tuple[dict, str]:
    """The fastest row among `auto.candidates` whose agreement with the reference (`rows[0]`, eager fp32) and
    accuracy meet `auto`'s limits (of those within `time_tolerance` of the fastest, the first candidate), with the
    reason; the reference itself when none does."""
    reference = rows[0]
    labelled = {row_spec(r): r for r in rows}
    candidates = [labelled[spec] for spec in auto.candidates if spec in labelled]
    kept = [r for r in candidates if auto.fidelity.keeps(r["agreement"], r["accuracy"], reference["accuracy"])]
    limits = auto.fidelity.describe(reference["accuracy"], reference["images"])
    refused = "; ".join([f"{_label(r)} refused (agreement {r['agreement']:.4f}, accuracy {r['accuracy']:.4f})"
                         for r in candidates if r not in kept]
                        + ([f"not timed: {', '.join(spec.label for spec in auto.skipped)} (bf16 is emulated on this "
                            f"CPU)"] if auto.skipped else []))
    if not candidates:
        return reference, f"no candidate could be timed here, so eager fp32; {refused}"
    if not kept:
        return reference, f"no candidate kept {limits}, so eager fp32" + (f"; {refused}" if refused else "")
    fastest = min(r["ms_per_image"] for r in kept)
    best = next(r for r in kept if r["ms_per_image"] <= fastest * (1 + auto.time_tolerance))  # candidates order
    others = ", ".join(f"{_label(r)} {r['ms_per_image']} ms" for r in kept if r is not best)
    return best, (f"{_label(best)}: the fastest, within {auto.time_tolerance:.0%} ({best['ms_per_image']} ms/image, "
                  f"agreement {best['agreement']:.4f}, accuracy {best['accuracy']:.4f}) of the engines that keep "
                  f"{limits}" + (f"; also kept: {others}" if others else "") + (f"; {refused}" if refused else ""))


def row_spec(row: Mapping) -> EngineSpec:
    """The engine a Table 1 row was measured with."""
    return EngineSpec(engine=row["engine"], precision=row["precision"], channels_last=bool(row["channels_last"]),
                      batch_size=int(row["batch_size"]), tta=bool(row.get("tta", False)))


def _label(row: Mapping) -> str:
    spec = row_spec(row)
    return f"{spec.label}@{spec.batch_size}"


def chosen_inference(row: Mapping) -> dict[str, Any]:
    """The `inference` keys that name the engine of a Table 1 row (what selection.json records)."""
    return asdict(row_spec(row))


@dataclass(frozen=True)
class BenchmarkSettings:
    """What the benchmark stage reads, parsed once: the configured inference engine (`inference`), the extra
    engines to time beside it and how (`benchmark`), and the seed that draws int8 calibration cells."""

    inference: EngineSpec = field(default_factory=EngineSpec)
    engines: tuple[EngineSpec, ...] = ()  # `benchmark.engines`: extra rows, each checked like `inference`
    warmup: int = 1
    repeats: int = 2
    max_images: int | None = None         # None: the whole validation split
    select_by: str = "accuracy_then_time"
    cache_dir: Path | None = None         # `inference.cache_dir`: ONNX exports and int8 programs
    calibration_images: int = 128         # `inference.calibration_images`: int8 only
    seed: int = 0
    auto: AutoEngine | None = None        # `inference.engine: auto`: the engines to pick from and the limits
    inference_cfg: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the section, for `accuracy_control`

    @classmethod
    def from_params(cls, benchmark: Mapping[str, Any], inference: Mapping[str, Any], *, seed: int) -> BenchmarkSettings:
        """From the `benchmark` and `inference` sections; an extra engine without a batch size or `tta` takes the
        configured engine's."""
        from smearnet.models.engines import AUTO, engine_spec

        auto = None
        if inference.get("engine") == AUTO:
            auto = AutoEngine.from_mapping(inference)
            configured = auto.candidates[0] if auto.candidates else auto.skipped[0]  # batch size and tta
        else:
            configured = engine_spec(inference)
        extra = tuple(engine_spec(entry, batch_size=(entry or {}).get("batch_size", configured.batch_size),
                                  tta=(entry or {}).get("tta", configured.tta))
                      for entry in (benchmark.get("engines") or []))
        max_images = benchmark.get("max_images")
        cache_dir = inference.get("cache_dir")
        return cls(inference=configured, engines=extra, warmup=int(benchmark["warmup"]),
                   repeats=int(benchmark["repeats"]), max_images=int(max_images) if max_images else None,
                   select_by=str(benchmark["select_by"]), cache_dir=Path(cache_dir) if cache_dir else None,
                   calibration_images=int(inference.get("calibration_images", 128)), seed=int(seed), auto=auto,
                   inference_cfg=dict(inference))

    @property
    def specs(self) -> list[EngineSpec]:
        """The engines timed, in order: eager fp32 (the reference, with the configured engine's test-time
        augmentation, so agreement measures the engine alone), the extra engines, the configured one (with `auto`:
        every candidate)."""
        specs = [EngineSpec(batch_size=self.inference.batch_size, tta=self.inference.tta)]
        for spec in (*self.engines, *(self.auto.candidates if self.auto else (self.inference,))):
            if spec not in specs:
                specs.append(spec)
        return specs


def benchmark_engines(model_dir, cells: pd.DataFrame, train: pd.DataFrame,
                      settings: BenchmarkSettings) -> tuple[list[dict], dict, str]:
    """Table 1 rows for one trained model over `cells`: eager fp32 (the reference), every extra engine and the
    configured `inference` engine, all in one run so their ratios are meaningful on a noisy machine; int8 engines
    calibrate on `train` cells.

    Returns (rows, the row of the engine the model runs by, why). Each row carries `agreement` with eager fp32.
    The engine is the configured one, or with `auto` the one `pick_engine` chose among the candidates. OpenVINO
    int8 is quantised under accuracy control on `cells` (`accuracy_control`).
    """
    from smearnet.models.inference import accuracy_control, calibration_batches, load_trained

    model = load_trained(model_dir)
    specs = settings.specs
    calibration = calibration_batches(model, train, images=settings.calibration_images, seed=settings.seed)
    control = accuracy_control(model, settings.inference_cfg, cells, seed=settings.seed)
    rows = benchmark_specs(model, specs, cells, warmup=settings.warmup, repeats=settings.repeats,
                           cache_dir=settings.cache_dir, calibration=calibration, accuracy_control=control)
    if settings.auto is not None:
        return (rows, *pick_engine(rows, settings.auto))
    return rows, rows[specs.index(settings.inference)], "configured (inference.engine)"
