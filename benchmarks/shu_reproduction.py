"""Shu's GMVAE reproduced: our runs of ``--recipe shu`` beside his logged runs, at equal steps.

His logs (``benchmarks/results/shu_logs_gmvae.json``, extracted from github.com/RuiShu/vae-clustering
``logs/gmvae.log.0-6``) give the majority-label test accuracy after each of his epochs of 500
Adam steps (batch 100). Our runs evaluate after each epoch of 600 steps (60k images, batch 100),
and record the step count in ``metrics.jsonl``. The comparison is made at the steps where both
have a value: step s is his epoch s / 500, so every 3000 steps (our epoch 5, his epoch 6).

    python benchmarks/shu_reproduction.py runs/shu100/mnist-shu-seed0 runs/shu100/mnist-shu-seed1

writes ``benchmarks/results/shu_reproduction.md`` (the table, with each run's commit and
budget) and ``docs/figures/shu_reproduction.png`` (the curves against steps).
"""

import argparse
import json
import math
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "benchmarks" / "results" / "shu_logs_gmvae.json"
HIS_STEPS_PER_EPOCH = 500


def his_curves(path=LOGS) -> dict[str, dict[int, float]]:
    """{run: {step: majority-label test accuracy}} of Shu's logged runs."""
    logs = json.loads(Path(path).read_text())
    return {
        name: {HIS_STEPS_PER_EPOCH * e: acc for e, acc in zip(run["epoch"], run["t_acc"])}
        for name, run in logs["runs"].items()
    }


def our_curve(run_dir) -> dict[int, float]:
    """{step: majority-label test accuracy} of one of our runs (its metrics.jsonl)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["acc_majority"] for r in rows if r["step"] > 0}


def common_steps(ours: dict[str, dict], his: dict[str, dict], every: int) -> list[int]:
    """The steps, multiples of ``every``, at which one of our runs and one of his have a value."""
    steps = set().union(*(set(c) for c in ours.values()))
    his_any = set().union(*(set(c) for c in his.values()))
    return sorted(s for s in steps & his_any if s % every == 0)


def table(ours: dict[str, dict], his: dict[str, dict], steps: list[int]) -> str:
    names = list(ours)
    head = (
        "| steps | his epoch | "
        + " | ".join(names)
        + " | Shu: runs | Shu: mean ± std | Shu: min – max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in steps:
        values = [c[s] for c in his.values() if s in c]
        spread = statistics.pstdev(values) if len(values) > 1 else math.nan
        lines.append(
            f"| {s} | {s // HIS_STEPS_PER_EPOCH} | "
            + " | ".join(f"{100 * ours[n][s]:.1f}" if s in ours[n] else "–" for n in names)
            + f" | {len(values)} | {100 * statistics.mean(values):.1f} ± {100 * spread:.1f} "
            f"| {100 * min(values):.1f} – {100 * max(values):.1f} |"
        )
    return "\n".join(lines) + "\n"


def provenance(run_dir) -> str:
    config = json.loads((Path(run_dir) / "config.json").read_text())
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return (f"- `{run_dir}`: seed {config['seed']}, {last['epoch']} of {config['epochs']} epochs "
            f"({last['step']} steps), {last['time_s'] / 3600:.1f} h of wall time, "
            f"{config.get('threads')} thread(s)")  # fmt: skip


def plot(ours, his, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, curve in enumerate(his.values()):
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], color="0.7", lw=0.8,
                label="Shu's logged runs" if i == 0 else None)  # fmt: skip
    for name, curve in ours.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], lw=1.5, label=name)
    right = max(max(c) for c in ours.values())
    ax.set_xlim(0, right * 1.05)
    ax.set_xlabel("optimiser steps (batch 100)")
    ax.set_ylabel("majority-label test accuracy")
    ax.set_title("GMVAE (Shu's recipe), K = 10, MNIST")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of --recipe shu")
    p.add_argument("--every", type=int, default=3000, help="tabulate every this many steps")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shu_reproduction.md"))
    p.add_argument("--figure", default=str(REPO / "docs" / "figures" / "shu_reproduction.png"))
    args = p.parse_args(argv)
    ours = {Path(r).name: our_curve(r) for r in args.runs}
    his = his_curves()
    steps = common_steps(ours, his, args.every)
    text = (
        "Majority-label accuracy on the 10k MNIST test images (each cluster takes its most "
        "common label), Shu's recipe (`--recipe shu`), at equal optimiser steps. Ours: one "
        "evaluation per 600 steps; Shu's: one per 500 (his logs, "
        "`benchmarks/results/shu_logs_gmvae.json`).\n\n" + table(ours, his, steps) + "\n"
        + "\n".join(provenance(r) for r in args.runs) + "\n\nCommand: `python "
        "benchmarks/shu_reproduction.py " + " ".join(args.runs) + "`\n"
    )  # fmt: skip
    Path(args.out).write_text(text)
    plot(ours, his, args.figure)
    print(text)
    return text


if __name__ == "__main__":
    main()
