"""Recipe search on the PBC images: short from-scratch training trials, each logged to MLflow (experiment
`pbc-recipe`), to choose architecture, input size, crop, schedule and precision by measurement.

    .venv/bin/python benchmarks/pbc_recipe.py [--root ../shared/data/pbc] [--arch resnet18] [--size 112]
        [--crop 0.75] [--epochs 20] [--lr 0.002] [--weight-decay 0.05] [--label-smoothing 0.1] [--batch-size 64]

A trial is a plain PyTorch loop (no Lightning, no DVC) over the same split as `experiment=pbc` (the project's
`split_by_patient`, seed 42, 70/15/15) and the same preprocessing (`smearnet.data.loaders.cell_tensor`: centre crop,
bilinear resize, ImageNet normalisation), with everything decoded once into memory: AdamW + one-cycle,
label smoothing, random dihedral flips/rotations, bf16 autocast + channels_last. It prints and logs
validation and test accuracy, with and without 8-view dihedral test-time augmentation, and the training time.
The chosen recipe then runs through the pipeline: `dvc exp run -S experiment=pbc`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from smearnet.data.loaders import cell_tensor
from smearnet.data.sources import manifest_from_folder
from smearnet.models.engines import dihedral_views
from smearnet.data.decode import load_rgb
from smearnet.models.factory import build_model, model_input_spec
from smearnet.data.split import split_by_patient


def load_cells(paths, input_spec) -> torch.Tensor:
    return torch.stack([cell_tensor(load_rgb(Path(p)), input_spec)
                        for p in tqdm(paths, desc="decode", unit="img")]).contiguous(memory_format=torch.channels_last)


def dihedral_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped and rotated by its own random element of the dihedral group."""
    out = images.clone()
    codes = torch.randint(0, 8, (len(images),), generator=generator)
    for code in range(8):
        chosen = codes == code
        if chosen.any():
            view = images[chosen].flip(-1) if code >= 4 else images[chosen]
            out[chosen] = torch.rot90(view, code % 4, dims=(-2, -1))
    return out


@torch.inference_mode()
def accuracy(net, images, targets, *, tta: bool = False, batch: int = 256) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if tta:
                scores = sum(net(view).float().softmax(1) for view in dihedral_views(x))
            else:
                scores = net(x)
        correct += int((scores.argmax(1) == targets[start:start + batch]).sum())
    net.train()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/pbc"))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--crop", type=float, default=0.75)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()

    import mlflow

    torch.manual_seed(args.seed)
    manifest = split_by_patient(manifest_from_folder(args.root), {"train": 0.7, "val": 0.15, "test": 0.15}, args.seed)
    classes = sorted(manifest["label"].unique())
    model_cfg = {"name": args.arch, "arch": args.arch, "input_size": [args.size, args.size], "pretrained": False,
                 "allow_random_init": True, "center_crop": args.crop}
    spec = model_input_spec(model_cfg)
    parts = {}
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        parts[split] = (load_cells(rows["path"], spec), torch.tensor([classes.index(c) for c in rows["label"]]))
    net = build_model(model_cfg, num_classes=len(classes)).to(memory_format=torch.channels_last)
    images, targets = parts["train"]
    steps_per_epoch = len(images) // args.batch_size
    optimizer = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("pbc-recipe")
    with mlflow.start_run(run_name=f"{args.arch}-{args.size}-crop{args.crop}-{args.epochs}ep"):
        mlflow.log_params({**vars(args), "root": "pbc", "loop": "plain torch (benchmarks/pbc_recipe.py)"})
        start = time.perf_counter()
        for epoch in range(args.epochs):
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * args.batch_size:(step + 1) * args.batch_size]
                batch = dihedral_batch(images[index], generator).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(net(batch), targets[index],
                                                             label_smoothing=args.label_smoothing)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            elapsed = time.perf_counter() - start
            val = accuracy(net, *parts["val"])
            mlflow.log_metrics({"train_loss": float(loss), "val_accuracy": val, "elapsed_s": elapsed}, step=epoch + 1)
            print(f"epoch {epoch + 1}: {elapsed:.0f} s, loss {float(loss):.3f}, val accuracy {val:.4f}", flush=True)
        seconds = time.perf_counter() - start
        result = {"train_seconds": seconds, "images_per_second": args.epochs * steps_per_epoch * args.batch_size / seconds,
                  "val_accuracy": accuracy(net, *parts["val"]), "test_accuracy": accuracy(net, *parts["test"]),
                  "val_accuracy_tta": accuracy(net, *parts["val"], tta=True),
                  "test_accuracy_tta": accuracy(net, *parts["test"], tta=True)}
        mlflow.log_metrics(result)
        print({k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
    main()
