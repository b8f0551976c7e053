"""nestc end to end: check, explain, draw, compile, train with compiled Adam, compare AdamW,
Muon and M3 compiled from the stdlib, then train the stdlib HopeLM and a Transformer on MQAR
for the same wall time.

Run with `make demo`. Pictures and the generated source go to out/.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import torch

import nestc
from nestc.cli import main as nestc_main

OUT = Path("out")


def banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 76 - len(text)))


def spiral(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three interleaved spirals in 2-D: a small classification task made in code."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4.0 * r + label * (2 * torch.pi / 3) + 0.2 * torch.randn(n, generator=g)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return x, label


def train(make_opt, steps: int = 300) -> tuple[list[float], float, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    opt = make_opt(model.parameters())
    x, y = spiral(2048, seed=1)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 128, (step + 1) * 128) % len(x)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    xt, yt = spiral(1024, seed=2)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return losses, acc, model


def main() -> None:
    OUT.mkdir(exist_ok=True)
    banner("nestc check: the optimizer stdlib and the examples")
    t = time.perf_counter()
    files = sorted(glob.glob("stdlib/**/*.nest", recursive=True) + glob.glob("examples/*.nest"))
    assert nestc_main(["check", *files]) == 0
    print(f"({(time.perf_counter() - t) * 1e3:.0f} ms in this process)")

    banner("nestc explain std/optim/adam.nest --name Adam")
    nestc_main(["explain", "std/optim/adam.nest", "--name", "Adam", "--steps", "1000"])

    banner("nestc viz: pictures of the nest")
    nestc_main(["viz", "std/optim/adam.nest", "--name", "Adam", "-o", str(OUT / "adam.svg")])
    nestc_main(["viz", "std/optim/adam.nest", "--name", "Adam", "-o", str(OUT / "adam.png")])
    nestc_main(["viz", "std/models/hope.nest", "--name", "HopeLM", "-o", str(OUT / "hope.png")])
    nestc_main(["viz", "std/models/hope.nest", "--name", "HopeLM", "-o", str(OUT / "hope.html")])

    banner("nestc compile: the generated optimizer")
    nestc_main(["compile", "std/optim/adam.nest", "--name", "AdamW", "-o", str(OUT / "adamw.py")])
    source = (OUT / "adamw.py").read_text().splitlines()
    print("\n".join(source[:24]))
    print(f"... ({len(source)} lines)")

    banner("train a 3-class spiral MLP: compiled Adam vs torch.optim.Adam")
    adam = nestc.load("std/optim/adam.nest")
    ours_losses, ours_acc, ours = train(lambda p: adam.build("Adam", p, lr=1e-2))
    ref_losses, ref_acc, ref = train(lambda p: torch.optim.Adam(p, lr=1e-2, fused=True))
    for step in (0, 49, 99, 199, 299):
        print(f"step {step + 1:>4}  loss nestc {ours_losses[step]:.4f}   torch {ref_losses[step]:.4f}")
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    print(f"test accuracy: nestc Adam {ours_acc:.3f}, torch Adam {ref_acc:.3f}")
    print(f"largest parameter difference after 300 steps: {diff:.2e}")
    banner("AdamW, Muon and M3 compiled from the stdlib, one MLP (examples/optimizers.py)")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(Path(__file__).with_name("optimizers.py")), "--out",
                    str(OUT / "optimizers.png")], check=True)

    banner("HopeLM and a Transformer on MQAR, 2 min each (nestc bench)")
    # equal parameter count and wall time, the specs' own AdamW at lr 3e-3; the Transformer has
    # 2 layers of 4 heads, HopeLM one layer of one head, which learns MQAR in a fifth of the
    # steps of 2 layers of 4 heads (docs/hope_mqar.md); a HopeLM step costs several
    # Transformer steps (the table says how many steps each did)
    nestc_main(["viz", "std/models/hope.nest", "--name", "HopeLM", "-o", str(OUT / "hope.svg")])
    nestc_main(["bench", "--models", "TransformerLM", "HopeLM", "--tasks", "mqar",
                "-p", "HopeLM.depth=1", "-p", "HopeLM.heads=1",
                "--steps", "5000", "--minutes", "2", "--batch", "32", "--lr", "3e-3",
                "--schedule", "constant", "--eval-every", "100", "--out", str(OUT / "mqar"),
                "-q"])
    table = (OUT / "mqar" / "results.md").read_text().split("## mqar", 1)[1]
    print(table.strip())
    print(f"loss and accuracy curves: {OUT / 'mqar' / 'mqar.png'}; the hierarchy: "
          f"{OUT / 'hope.svg'}")
    print(f"\npictures and source in {OUT}/: " + ", ".join(sorted(p.name for p in OUT.iterdir())))


if __name__ == "__main__":
    main()
