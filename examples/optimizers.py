"""Train one small model with AdamW, Muon and M3 compiled from the stdlib; plot the losses.

A 4-layer MLP classifies 10 synthetic "digit" classes: each class is a fixed random 8x8
pattern, and samples are noisy, randomly shifted copies of it. Writes out/optimizers.png and
prints the final losses and test accuracies. The learning rates come from a few tries each,
not from a tuned comparison. Usage: python examples/optimizers.py [--steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import nestc

OUT = Path("out")


def dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(10, 8, 8, generator=g) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    images = torch.stack([torch.roll(patterns[c], tuple(s.tolist()), dims=(0, 1))
                          for c, s in zip(labels, shifts)])
    images = images + 0.6 * torch.randn(images.shape, generator=g)
    return images.reshape(n, 64), labels


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
        torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def train(make_opt, steps: int, x, y, xt, yt) -> tuple[list[float], float]:
    net = model()
    opt = make_opt(net.parameters())
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 64, (step + 1) * 64) % len(x)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    return losses, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(OUT / "optimizers.png"))
    args = ap.parse_args()
    x, y = dataset(4096, seed=1)
    xt, yt = dataset(1024, seed=2)
    adam = nestc.load("std/optim/adam.nest")
    muon = nestc.load("std/optim/muon.nest")
    m3 = nestc.load("std/optim/m3.nest")
    # Newton-Schulz in float32: bfloat16 matmuls are slow on most CPUs
    runs = {
        "AdamW (lr 1e-3)": lambda p: adam.build("AdamW", p, lr=1e-3, weight_decay=0.01),
        "Muon (lr 0.02, aux AdamW 1e-3)": lambda p: muon.build(
            "Muon", p, lr=0.02, weight_decay=0.01, adamw_lr=1e-3, ns_dtype="float32"),
        "M3 (lr 2e-4, slow every 10)": lambda p: m3.build(
            "M3", p, lr=2e-4, slow_every=10, adamw_lr=1e-3, ns_dtype="float32"),
    }
    results = {}
    for name, make in runs.items():
        losses, acc = train(make, args.steps, x, y, xt, yt)
        results[name] = losses
        tail = sum(losses[-20:]) / min(20, len(losses))
        print(f"{name:<32} final loss {tail:.4f}   test accuracy {acc:.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, losses in results.items():
        smooth = torch.tensor(losses).unfold(0, 10, 1).mean(1) if len(losses) >= 10 else \
            torch.tensor(losses)
        ax.plot(range(len(smooth)), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average of 10)")
    ax.set_yscale("log")
    ax.set_title("A 4-layer MLP on noisy shifted patterns, optimizers compiled by nestc")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
