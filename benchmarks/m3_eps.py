"""How ill-conditioned M3's literal update is: the largest step and the final loss per eps.

NS(M1) has entries of about 1/sqrt(cols); dividing it element by element by sqrt(V) + eps
makes the step about lr * NS / eps wherever V is tiny (rare or zero gradients). Usage:
python benchmarks/m3_eps.py   (a 2-layer MLP on a synthetic regression, 200 steps, lr 1e-3)
"""

from __future__ import annotations

import torch

import nestc


def run(eps: float, steps: int = 200) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(512, 32)
    x[:, :8] *= 1e-3  # inputs that barely move some weights: tiny V there
    y = torch.randn(512, 8)
    opt = nestc.load("std/optim/m3.nest").build("M3", model.parameters(), lr=1e-3, eps=eps,
                                                ns_dtype="float32")
    biggest = 0.0
    first = None
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        biggest = max(biggest, max((p - b).abs().max().item()
                                   for p, b in zip(model.parameters(), before)))
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    return biggest, first, final


def main() -> None:
    print(f"{'eps':>8}  {'largest |step|':>14}  {'loss at start':>13}  {'loss after 200':>14}")
    for eps in (1e-8, 1e-6, 1e-4, 1e-3, 1e-2):
        big, first, final = run(eps)
        print(f"{eps:>8.0e}  {big:>14.3g}  {first:>13.4f}  {final:>14.4g}")


if __name__ == "__main__":
    main()
