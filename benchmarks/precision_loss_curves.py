"""fp32 against bf16 autocast + channels_last training: the same init, the same batches, the loss curves side by side.

    .venv/bin/python benchmarks/precision_loss_curves.py [--models xception71 repvgg_b3g4] [--size 128] [--steps 60]
        [--batch-size 16] [--root ../shared/data/pbc]

Each model starts from one random init (seeded) and trains with the project's optimiser and schedule
(`smearnet.models.training.build_optimizer/build_schedule`, experiment=pbc's AdamW + one-cycle) on the same sequence of
PBC training batches, once in fp32 and once in bf16 autocast with channels_last. Printed per model: images/s of
each, the speed-up, the mean loss over the first and last 10 steps of each and the largest gap between the two
curves (smoothed over 5 steps). The curves are plotted to reports/benchmarks/precision_loss_curves.png.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from smearnet.config import compose_config, model_config
from smearnet.data.loaders import cell_tensor
from smearnet.data.decode import load_rgb
from smearnet.models.factory import build_model, model_input_spec
from smearnet.models.optim import build_optimizer, build_schedule


def batches(root: Path, spec, steps: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from smearnet.data.sources import manifest_from_folder

    manifest = manifest_from_folder(root)
    classes = sorted(manifest["label"].unique())
    rng = np.random.default_rng(seed)
    rows = manifest.iloc[rng.choice(len(manifest), size=min(len(manifest), steps * batch_size), replace=False)]
    images = torch.stack([cell_tensor(load_rgb(Path(p)), spec) for p in rows["path"]])
    targets = torch.tensor([classes.index(c) for c in rows["label"]])
    return [(images[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def train_curve(net, data, train_cfg, *, bf16: bool) -> tuple[list[float], float]:
    net = copy.deepcopy(net).train()
    if bf16:
        net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net.parameters(), train_cfg)
    schedule = build_schedule(optimizer, train_cfg, len(data), len(data))
    losses, images, start = [], 0, time.perf_counter()
    for x, y in data:
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        images += len(x)
    return losses, images / (time.perf_counter() - start)


def smooth(values: list[float], width: int = 5) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["xception71", "repvgg_b3g4"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/pbc"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/precision_loss_curves.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = compose_config(["experiment=pbc", f"model=[{','.join(args.models)}]", "~model.resnet18"])
    figure, axes = plt.subplots(1, len(args.models), figsize=(5 * len(args.models), 3.5), squeeze=False)
    for axis, name in zip(axes[0], args.models):
        model_cfg = dict(model_config(cfg, name), input_size=[args.size, args.size], pretrained=False,
                         allow_random_init=True, center_crop=0.75)
        data = batches(args.root, model_input_spec(model_cfg), args.steps, args.batch_size, args.seed)
        torch.manual_seed(args.seed)
        net = build_model(model_cfg, num_classes=8)
        fp32, fp32_speed = train_curve(net, data, cfg.train, bf16=False)
        bf16, bf16_speed = train_curve(net, data, cfg.train, bf16=True)
        gap = float(np.abs(smooth(fp32) - smooth(bf16)).max())
        print(f"{name} @ {args.size} px, {len(data)} steps of {args.batch_size}: fp32 {fp32_speed:.1f} img/s, "
              f"bf16+cl {bf16_speed:.1f} img/s ({bf16_speed / fp32_speed:.2f}x); loss first 10 steps "
              f"{np.mean(fp32[:10]):.3f} / {np.mean(bf16[:10]):.3f}, last 10 {np.mean(fp32[-10:]):.3f} / "
              f"{np.mean(bf16[-10:]):.3f}; largest gap of the 5-step means {gap:.3f}", flush=True)
        axis.plot(fp32, label=f"fp32 ({fp32_speed:.1f} img/s)", alpha=0.8)
        axis.plot(bf16, label=f"bf16 + channels_last ({bf16_speed:.1f} img/s)", alpha=0.8)
        axis.set(title=f"{name} @ {args.size} px", xlabel="step", ylabel="training loss")
        axis.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
