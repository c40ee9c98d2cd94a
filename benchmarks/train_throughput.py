"""Training throughput on this machine: a plain PyTorch loop against the project's Lightning pipeline.

For each backbone at its configured input size (conf/model/*.yaml), one batch of random images is trained on
repeatedly (random init: no hub needed) in each precision mode (``+cl``: channels_last), by

- plain:     the model, Adam, the triangular CyclicLR and cross-entropy in a bare loop;
- lightning: ``CellClassifier`` in a Trainer from ``build_trainer`` (conf/trainer/cpu.yaml), logger and
             checkpointing off.

Each step is timed end to end, so Lightning's hooks, metrics and logging count. Reported: images/s at the
median step time and peak RSS of a separate run of each loop, and Lightning's overhead over the plain loop.
Other jobs on a shared machine shift timings by 10-20% within a minute, more than the 5% overhead target, so
where a step is quick the overhead is also measured *paired*: one run alternates a Lightning step and a plain
step (two models), and the overhead is the median of the per-pair ratios. Lightning's fixed cost per step is
measured the same way on a model with almost no compute (lightcnn at 8x10 px, batch 2); divided by each
model's plain step time it gives the overhead least disturbed by other jobs. Last, the time one cycle of
``experiment=paper`` (12,750 images) would take on this CPU per paper backbone.

Each backbone runs in its own subprocess (clean peak memory, survives an out-of-memory kill), by default with
OMP_WAIT_POLICY=PASSIVE: with libgomp's default (active) waiting, any other busy process on a 2-core machine
makes a 2-thread training step ~9x slower (measured: resnet18 64 px, 4.0 s instead of 0.46 s a step), while
passive waiting costs ~7-10% on an idle machine. Examples:

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --models resnet18 lightcnn --modes fp32 fp32+cl bf16 bf16+cl
    python benchmarks/train_throughput.py --models xception71 --batch-size 10 --size 299
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ALL_MODELS = ["resnet18", "lightcnn", "xception71", "repvgg_b3g4", "efficientnet_b8"]
PAPER_MODELS = ["xception71", "repvgg_b3g4", "efficientnet_b8"]
# Per-step batch: the demo's 32 for the small models. The paper trains its backbones with batch 10; 4 keeps the
# default run within minutes (CPU images/s barely depends on the batch at these sizes; --batch-size 10 checks),
# and EfficientNet-B8 at 672 px needs ~6 GB per training image, so it runs one image a step.
DEFAULT_BATCH = {"resnet18": 32, "lightcnn": 32, "xception71": 4, "repvgg_b3g4": 4, "efficientnet_b8": 1}
MODES = {"fp32": ("32-true", False), "fp32+cl": ("32-true", True), "bf16": ("bf16-mixed", False),
         "bf16+cl": ("bf16-mixed", True)}
# Lightning's fixed per-step cost: a model whose step is nearly all framework (paired measurement).
FIXED_COST_PROBE = {"model": "lightcnn", "size": (8, 10), "batch_size": 2, "modes": ["fp32"], "seconds": 3.0}
PAPER_CYCLE_IMAGES = 12_750
PAPER_CYCLES = 36
CLASSES = ["normal", "classic_rl", "covid_rl"]
RESULT_PREFIX = "RESULT "


@dataclass
class LoopResult:
    """A separate, timed run of one loop."""

    timed_steps: int
    median_step_seconds: float
    images_per_second: float
    peak_rss_gb: float


@dataclass
class PairedResult:
    """Alternating Lightning and plain steps: Lightning's overhead, little disturbed by other jobs."""

    pairs: int
    overhead: float  # median over pairs of lightning step / plain step - 1
    extra_ms: float  # median over pairs of lightning step - plain step


@dataclass
class ModeResult:
    """Everything measured for one model in one precision mode."""

    model: str
    arch: str
    size: str
    batch: int
    mode: str
    plain: LoopResult
    lightning: LoopResult
    paired: PairedResult | None


@dataclass
class RunSpec:
    """What one timed run trains."""

    model_cfg: dict
    train_cfg: dict
    trainer_cfg: dict
    images: object
    targets: object
    bf16: bool
    channels_last: bool
    length: int  # batches in the loader: warm-up plus the most timed steps


class RepeatedBatch:
    """The same (images, targets) batch `length` times: a sized iterable both loops (and Lightning) accept."""

    def __init__(self, images, targets, length: int):
        self.batch = (images, targets)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        for _ in range(self.length):
            yield self.batch


class StepClock:
    """End-of-step timestamps; says when enough steps (after warm-up) have been timed."""

    def __init__(self, warmup: int, min_steps: int, min_seconds: float):
        self.warmup, self.min_steps, self.min_seconds = warmup, min_steps, min_seconds
        self.ends: list[float] = []

    def tick(self) -> bool:
        """Record the end of a step; True when the measurement is complete."""
        self.ends.append(time.perf_counter())
        durations = self.durations()
        return len(durations) >= self.min_steps and sum(durations) >= self.min_seconds

    def durations(self) -> list[float]:
        """Step times after warm-up, each from the end of the previous step (so everything between counts)."""
        timed = self.ends[self.warmup - 1:]
        return [b - a for a, b in zip(timed, timed[1:])]


# ------------------------------------------------------------------------------------------- the worker


class PlainLoop:
    """The bare training loop's state: model, Adam, triangular CyclicLR, cross-entropy."""

    def __init__(self, spec: RunSpec):
        import torch

        from smearnet.models.factory import build_model
        from smearnet.models.optim import triangular_cyclic_lr

        train_cfg = spec.train_cfg
        self.bf16 = spec.bf16
        self.net = build_model(spec.model_cfg, num_classes=len(CLASSES)).train()
        if spec.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=float(train_cfg["lr_min"]),
                                          betas=tuple(float(b) for b in train_cfg["betas"]),
                                          eps=float(train_cfg["eps"]))
        self.scheduler = triangular_cyclic_lr(self.optimizer, float(train_cfg["lr_min"]), float(train_cfg["lr_max"]),
                                              max(2, spec.length))
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def step(self, images, targets) -> None:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # also switches an outer one off
            loss = self.loss_fn(self.net(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def run_plain(spec: RunSpec, clock: StepClock) -> None:
    """The bare loop until `clock` has timed enough steps."""
    import torch

    torch.use_deterministic_algorithms(bool(spec.trainer_cfg["deterministic"]))  # as the Trainer sets it
    torch.manual_seed(0)
    loop = PlainLoop(spec)
    for images, targets in RepeatedBatch(spec.images, spec.targets, spec.length):
        loop.step(images, targets)
        if clock.tick():
            break


def run_lightning(spec: RunSpec, after_step: Callable[[], bool]) -> None:
    """The project's module and Trainer; `after_step()` runs after every step and stops training by returning True."""
    import lightning as L
    import torch

    from smearnet.models.training import CellClassifier, build_trainer

    class AfterStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if after_step():
                trainer.should_stop = True

    torch.manual_seed(0)
    module = CellClassifier(spec.model_cfg, spec.train_cfg, CLASSES)
    if spec.channels_last:
        module = module.to(memory_format=torch.channels_last)
    trainer_cfg = {**spec.trainer_cfg, "precision": "bf16-mixed" if spec.bf16 else "32-true"}
    trainer = build_trainer(trainer_cfg, {**spec.train_cfg, "cycles": 1, "patience": None}, None, logger=None,
                            enable_progress_bar=False, callbacks=[AfterStep()])
    trainer.fit(module, RepeatedBatch(spec.images, spec.targets, spec.length))


def run_paired(spec: RunSpec, warmup: int, min_pairs: int, min_seconds: float) -> PairedResult:
    """A Lightning run that takes one plain step after each of its own; per-pair step times."""
    import torch

    torch.manual_seed(0)
    plain = PlainLoop(spec)
    lightning_steps: list[float] = []
    plain_steps: list[float] = []
    last_plain_end: list[float] = []

    def after_lightning_step() -> bool:
        lightning_end = time.perf_counter()
        if last_plain_end and len(last_plain_end) > warmup - 1:
            lightning_steps.append(lightning_end - last_plain_end[-1])
        started = time.perf_counter()
        plain.step(spec.images, spec.targets)
        last_plain_end.append(time.perf_counter())
        if len(last_plain_end) > warmup:
            plain_steps.append(last_plain_end[-1] - started)
        return len(lightning_steps) >= min_pairs and sum(lightning_steps) + sum(plain_steps) >= min_seconds

    run_lightning(spec, after_lightning_step)
    pairs = list(zip(lightning_steps, plain_steps))
    return PairedResult(pairs=len(pairs), overhead=round(statistics.median(l / p for l, p in pairs) - 1, 4),
                        extra_ms=round(1000 * statistics.median(l - p for l, p in pairs), 2))


def reset_peak_rss() -> None:
    """Free what we can and restart the kernel's peak-RSS counter (VmHWM) at the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def timed_loop(spec: RunSpec, loop: str, args: argparse.Namespace, batch_size: int) -> LoopResult:
    clock = StepClock(args.warmup, args.min_steps, args.seconds)
    reset_peak_rss()
    if loop == "plain":
        run_plain(spec, clock)
    else:
        run_lightning(spec, clock.tick)
    median = statistics.median(clock.durations())
    return LoopResult(timed_steps=len(clock.durations()), median_step_seconds=round(median, 4),
                      images_per_second=round(batch_size / median, 3), peak_rss_gb=round(peak_rss_gb(), 2))


def worker(args: argparse.Namespace) -> None:
    """Measure one model in every mode; print one RESULT line (JSON) per mode."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch
    from omegaconf import OmegaConf

    from smearnet.config import compose_config

    name = args.worker
    cfg = compose_config([f"model={name}", "trainer=cpu"])
    model_cfg = OmegaConf.to_container(cfg.model[name], resolve=True)
    model_cfg.update(name=name, pretrained=False, weights_path=None)  # random init: speed does not depend on it
    if args.size:
        model_cfg["input_size"] = list(args.size)
    height, width = (int(v) for v in model_cfg["input_size"])
    batch_size = args.batch_size or DEFAULT_BATCH[name]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator)
    targets = torch.randint(0, len(CLASSES), (batch_size,), generator=generator)
    for mode in args.modes:
        precision, channels_last = MODES[mode]
        spec = RunSpec(model_cfg=model_cfg, train_cfg=OmegaConf.to_container(cfg.train, resolve=True),
                       trainer_cfg=OmegaConf.to_container(cfg.trainer, resolve=True),
                       images=images.contiguous(memory_format=torch.channels_last) if channels_last else images,
                       targets=targets, bf16=precision == "bf16-mixed", channels_last=channels_last,
                       length=args.warmup + args.max_steps)
        plain = timed_loop(spec, "plain", args, batch_size)
        lightning = timed_loop(spec, "lightning", args, batch_size)
        paired = (run_paired(spec, args.warmup, args.min_steps, 2 * args.seconds)
                  if plain.median_step_seconds < args.paired_below else None)
        result = ModeResult(model=name, arch=str(model_cfg["arch"]), size=f"{height}x{width}", batch=batch_size,
                            mode=mode, plain=plain, lightning=lightning, paired=paired)
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------------------------- the driver


def run_model(name: str, args: argparse.Namespace, timeout: float, *, size: tuple[int, int] | None = None,
              batch_size: int | None = None, modes: list[str] | None = None,
              seconds: float | None = None) -> tuple[list[ModeResult], str | None]:
    """Run one model's worker for at most `timeout` seconds; its results and a note when it did not finish.

    `size`, `batch_size`, `modes` and `seconds` override the command line's.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--modes", *(modes or args.modes),
               "--warmup", str(args.warmup), "--min-steps", str(args.min_steps),
               "--seconds", str(seconds or args.seconds), "--max-steps", str(args.max_steps),
               "--paired-below", str(args.paired_below)]
    if size or args.size:
        command += ["--size", "x".join(map(str, size or args.size))]
    if batch_size or args.batch_size:
        command += ["--batch-size", str(batch_size or args.batch_size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    note = None
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        note = f"{name}: stopped after {timeout:.0f} s (--model-timeout / --budget); modes not shown did not finish"
    results = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            paired = PairedResult(**data.pop("paired")) if data["paired"] else None
            results.append(ModeResult(**{**data, "plain": LoopResult(**data["plain"]),
                                         "lightning": LoopResult(**data["lightning"]), "paired": paired}))
    if note is None and process.returncode != 0:
        reason = ("killed, probably out of memory" if process.returncode == -9
                  else (stderr.strip().splitlines() or ["no message"])[-1])
        note = f"{name}: worker exited with code {process.returncode} ({reason})"
    return results, note


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def throughput_table(results: list[ModeResult], fixed_cost_ms: float | None) -> str:
    rows = []
    for r in results:
        separate = r.lightning.median_step_seconds / r.plain.median_step_seconds - 1
        paired = f"{r.paired.overhead:+.1%} ({r.paired.extra_ms:+.0f} ms, {r.paired.pairs} pairs)" if r.paired else "-"
        rows.append([r.model, r.size, str(r.batch), r.mode, f"{r.plain.images_per_second:.2f}",
                     f"{r.lightning.images_per_second:.2f}", f"{separate:+.1%}", paired,
                     f"{fixed_cost_ms / 1000 / r.plain.median_step_seconds:+.1%}" if fixed_cost_ms is not None else "-",
                     f"{r.plain.peak_rss_gb:.2f}", f"{r.lightning.peak_rss_gb:.2f}",
                     f"{r.plain.timed_steps}/{r.lightning.timed_steps}"])
    return format_table(["model", "size", "batch", "mode", "plain img/s", "lightning img/s", "overhead (separate)",
                         "overhead (paired)", "overhead (fixed cost)", "plain RSS GB", "lightning RSS GB",
                         "steps p/l"], rows)


def paper_cost_table(results: list[ModeResult], cycle_images: int) -> str:
    rows = []
    for model in PAPER_MODELS:
        modes = [r for r in results if r.model == model]
        if not modes:
            continue
        runs = [(f"{loop} {r.mode}", getattr(r, loop).images_per_second)
                for r in modes for loop in ("plain", "lightning")]
        configured = next(((label, speed) for label, speed in runs if label == "lightning fp32"), None)
        cells = [model, modes[0].size, str(modes[0].batch)]
        for run in (configured, max(runs, key=lambda run: run[1])):
            if run is None:
                cells += ["-", "-", "-"]
                continue
            seconds = cycle_images / run[1]
            cells += [run[0], f"{seconds:,.0f} s = {seconds / 3600:.1f} h", f"{seconds * PAPER_CYCLES / 86400:.1f} d"]
        rows.append(cells)
    return format_table(["model", "size", "batch", "as configured", "per cycle", f"{PAPER_CYCLES} cycles",
                         "fastest measured", "per cycle", f"{PAPER_CYCLES} cycles"], rows)


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=ALL_MODELS, choices=ALL_MODELS)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16+cl"], choices=list(MODES),
                        help="precision (+cl: channels_last) modes, each run by both loops")
    parser.add_argument("--size", type=parse_size, help="input size for every model, N or HxW (default: configured)")
    parser.add_argument("--batch-size", type=int, help=f"per-step batch for every model (default: {DEFAULT_BATCH})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before measuring, per run (>= 1)")
    parser.add_argument("--min-steps", type=int, default=2, help="timed steps per run at least")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="timed seconds per run at least (unless --max-steps)")
    parser.add_argument("--max-steps", type=int, default=40, help="timed steps per run at most")
    parser.add_argument("--paired-below", type=float, default=1.5,
                        help="measure the paired overhead when a plain step takes less than this many seconds")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "inherit"], default="PASSIVE",
                        help="OMP_WAIT_POLICY of the workers (inherit: this environment's)")
    parser.add_argument("--model-timeout", type=float, default=300.0, help="seconds per model before giving up")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all models; later ones are skipped")
    parser.add_argument("--no-fixed-cost", action="store_true", help="skip measuring Lightning's fixed step cost")
    parser.add_argument("--paper-cycle-images", type=int, default=PAPER_CYCLE_IMAGES)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=ALL_MODELS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.min_steps < 1:
        raise SystemExit("--warmup and --min-steps must be >= 1")
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results: list[ModeResult] = []
    notes: list[str] = []
    fixed_cost_ms = None
    if not args.no_fixed_cost:
        probe = dict(FIXED_COST_PROBE)
        probe_results, note = run_model(probe.pop("model"), args, args.model_timeout, **probe)
        if probe_results and probe_results[0].paired:
            fixed = probe_results[0].paired
            fixed_cost_ms = fixed.extra_ms
            print(f"[Lightning's fixed cost: {fixed.extra_ms:+.1f} ms a step (median of {fixed.pairs} pairs, "
                  f"lightcnn 8x10 batch 2, {probe_results[0].plain.median_step_seconds * 1000:.1f} ms a plain step)]",
                  flush=True)
        else:
            notes.append(f"Lightning's fixed cost was not measured ({note or 'no paired result'})")
    for name in args.models:
        remaining = args.budget - (time.perf_counter() - started)
        if remaining < 10:
            notes.append(f"{name}: skipped, the --budget of {args.budget:.0f} s is spent")
            continue
        model_started = time.perf_counter()
        model_results, note = run_model(name, args, min(args.model_timeout, remaining))
        results += model_results
        notes += [note] if note else []
        print(f"[{name}: {len(model_results)} modes in {time.perf_counter() - model_started:.0f} s, "
              f"load average {os.getloadavg()[0]:.1f}]", flush=True)
    print()
    print(throughput_table(results, fixed_cost_ms) if results else "no results")
    if any(r.model in PAPER_MODELS for r in results):
        print(f"\nexperiment=paper on this CPU: one cycle = {args.paper_cycle_images:,} images (at the batch measured; "
              "'as configured' = the Lightning pipeline in fp32, as trainer=cpu runs it)")
        print(paper_cost_table(results, args.paper_cycle_images))
    for note in notes:
        print(f"note: {note}")
    cores = os.cpu_count() or 1
    wait_policy = (os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit"
                   else args.omp_wait_policy)
    print(f"\noverhead = Lightning step time / plain step time - 1; paired: median over alternating steps; fixed "
          "cost: Lightning's fixed cost / plain step time. "
          f"OMP_WAIT_POLICY={wait_policy}, "
          f"torch threads {_torch_threads()}, {cores} cores, load average {load_before:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end, {time.perf_counter() - started:.0f} s in all.")
    if max(load_before, os.getloadavg()[0]) > cores:
        print("warning: other processes competed for the CPU, so timings are slower and noisier than on an idle "
              "machine.")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
