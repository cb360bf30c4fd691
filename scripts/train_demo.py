"""Train the demo's model and write its weights into the camkit.demo package.

    python scripts/train_demo.py            # seed 0: the shipped weights
    python scripts/train_demo.py --seed 1 --out /tmp/demo_weights.pt

The model (camkit.demo.model.DemoCNN) learns to name the shape in generated single-object scenes
(camkit.demo.data): every epoch draws fresh training scenes, so it never sees a scene twice. The
same seed gives the same scenes, the same initial weights and the same order of updates; the
script runs on the CPU with a fixed number of threads. It prints the accuracy on held-out
scenes (the "val" split, never used for training) and stores it in the weights file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from camkit.demo.data import CLASSES, generate
from camkit.demo.model import WEIGHTS_FILE, DemoCNN

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "camkit" / "demo" / WEIGHTS_FILE


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` whose predicted class is ``y``."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds data, weights and order")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--train-size", type=int, default=8000, help="fresh scenes per epoch")
    parser.add_argument("--val-size", type=int, default=2000, help="held-out scenes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16, help="channels of the first block")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (fixed for reproducibility)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny activations late in training slow the CPU otherwise
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = DemoCNN(num_classes=len(CLASSES), width=args.width)
    steps = args.epochs * (args.train_size // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=steps, pct_start=0.15
    )
    val = generate(args.val_size, split="val", seed=args.seed)
    x_val, y_val = val.tensor(), torch.from_numpy(val.labels[:, 0])
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train = generate(
            args.train_size, split="train", seed=args.seed, start=epoch * args.train_size
        )
        x, y = train.tensor(), torch.from_numpy(train.labels[:, 0])
        perm = torch.randperm(len(x), generator=order)
        model.train()
        total = 0.0
        for i in range(args.train_size // args.batch_size):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = accuracy(model, x_val, y_val)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / (i + 1):.4f}, "
            f"held-out accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    acc = accuracy(model, x_val, y_val)
    ckpt = {
        "format": 1,
        "classes": list(CLASSES),
        "width": args.width,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "val_accuracy": acc,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: the archive's bytes do not depend on its name
        torch.save(ckpt, f)
    tmp.replace(args.out)
    size = args.out.stat().st_size
    print(f"held-out accuracy {acc:.4f} on {args.val_size} scenes; wrote {args.out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
