"""Shu's GMVAE reproduced: our runs of ``--recipe shu`` beside his logged runs, at equal steps.

His logs (``benchmarks/results/shu_logs_gmvae.json``, extracted from github.com/RuiShu/vae-clustering
``logs/gmvae.log.0-6``) give the majority-label test accuracy after each of his epochs of 500
Adam steps (batch 100). Our runs evaluate after each epoch of 600 steps (60k images, batch 100),
and record the step count in ``metrics.jsonl``. The comparison is made at the steps where both
have a value: step s is his epoch s / 500, so every 3000 steps (our epoch 5, his epoch 6).

    python benchmarks/shu_reproduction.py runs/shu100/mnist-shu-seed1

reads each run directory given (``config.json``, ``metrics.jsonl``, ``summary.json`` when it has
finished) into ``benchmarks/results/shu_reproduction.json``, the committed record of every run
so far, where it replaces that run's entry and keeps the others. A run directory lives on one
machine; the record keeps its curve and provenance once the machine is gone. From the whole
record it writes ``benchmarks/results/shu_reproduction.md`` (the table, with each run's commit
and budget) and ``docs/figures/shu_reproduction.png`` (the curves against steps). With no run
directory it rebuilds both from the record alone.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from pyro_gmvae.harness.run import read_metrics, write_json

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "benchmarks" / "results" / "shu_logs_gmvae.json"
RECORD = REPO / "benchmarks" / "results" / "shu_reproduction.json"
HIS_STEPS_PER_EPOCH = 500
FINAL_METRICS = ("acc_hungarian", "acc_majority", "nmi", "ari", "test_elbo")


def his_curves(path=LOGS) -> dict[str, dict[int, float]]:
    """{run: {step: majority-label test accuracy}} of Shu's logged runs."""
    logs = json.loads(Path(path).read_text())
    return {
        name: {HIS_STEPS_PER_EPOCH * e: acc for e, acc in zip(run["epoch"], run["t_acc"])}
        for name, run in logs["runs"].items()
    }


def our_curve(run_dir, rows=None) -> dict[int, float]:
    """{step: majority-label test accuracy} of one of our runs (its metrics.jsonl)."""
    rows = read_metrics(run_dir) if rows is None else rows
    return {r["step"]: r["acc_majority"] for r in rows if r["step"] > 0}


def run_entry(run_dir) -> dict:
    """One run directory as a record entry: its curve, how far it got, and where it ran.

    ``commit`` is the one config.json holds, the commit the run was launched at: a resume keeps
    it. Where a run was resumed at other commits, say so in the entry's ``note``.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no evaluation yet (metrics.jsonl is empty)")
    last = rows[-1]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return {
        "dir": str(run_dir),
        "seed": config["seed"],
        "epochs": config["epochs"],
        "epochs_done": last["epoch"],
        "steps": last["step"],
        "wall_h": round(last["time_s"] / 3600, 2),
        "cpu_h": round(summary["cpu_time_s"] / 3600, 2) if summary else None,
        "threads": config.get("threads"),
        "estimator": config.get("estimator"),
        "commit": (config.get("versions", {}).get("git_commit") or "unknown")[:7],
        "hardware": config.get("hardware"),
        "final": {m: summary[m] for m in FINAL_METRICS if m in summary} if summary else None,
        "curve": {str(s): a for s, a in sorted(our_curve(run_dir, rows).items())},
    }


def load_record(path=RECORD) -> dict[str, dict]:
    path = Path(path)
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def save_record(runs: dict[str, dict], path=RECORD) -> None:
    # write_json is atomic (a temporary file, then a rename): an interrupt leaves the old record.
    write_json({"runs": dict(sorted(runs.items()))}, path)


def curves(runs: dict[str, dict]) -> dict[str, dict[int, float]]:
    return {name: {int(s): a for s, a in run["curve"].items()} for name, run in runs.items()}


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


def provenance(name: str, run: dict) -> str:
    """One line per run: how far it got, where and how it ran, its final test scores."""
    line = (f"- `{name}` (`{run['dir']}`): seed {run['seed']}, {run['epochs_done']} of "
            f"{run['epochs']} epochs ({run['steps']} steps), {run['wall_h']:.1f} h of wall time"
            + (f", {run['cpu_h']:.1f} CPU hours" if run.get("cpu_h") else "")
            + f"; threads: {run['threads']}; estimator: {run['estimator']}; "
            f"commit: {run['commit']}")  # fmt: skip
    final = run.get("final")
    if final:
        line += (f"; final test scores: Hungarian {100 * final['acc_hungarian']:.1f} %, "
                 f"NMI {final['nmi']:.3f}, ARI {final['ari']:.3f}, "
                 f"test ELBO {final['test_elbo']:.2f}")  # fmt: skip
    return line + (f". {run['note']}" if run.get("note") else "")


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
        # A run kept only at the table's steps is drawn with its points marked.
        sparse = len(steps) < max(steps) / 1200
        ax.plot(steps, [curve[s] for s in steps], lw=1.5, marker="o" if sparse else None,
                ms=3, label=f"{name} (kept at the table's steps)" if sparse else name)  # fmt: skip
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
    p.add_argument("runs", nargs="*", help="run directories of --recipe shu to add to the record")
    p.add_argument("--every", type=int, default=3000, help="tabulate every this many steps")
    p.add_argument("--record", default=str(RECORD), help="the record of every run so far")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shu_reproduction.md"))
    p.add_argument("--figure", default=str(REPO / "docs" / "figures" / "shu_reproduction.png"))
    args = p.parse_args(argv)
    try:
        runs = load_record(args.record)
    except (ValueError, KeyError) as e:
        p.error(f"{args.record} is not a readable record ({type(e).__name__}: {e})")
    for run_dir in args.runs:
        missing = [f for f in ("config.json", "metrics.jsonl") if not (Path(run_dir) / f).is_file()]
        if missing:
            p.error(f"{run_dir} is not a run directory: it has no {' or '.join(missing)}")
        try:
            runs[Path(run_dir).name] = run_entry(run_dir)
        except (ValueError, KeyError) as e:  # a corrupt or unfinished file (JSONDecodeError too)
            p.error(f"{run_dir}: cannot read the run ({type(e).__name__}: {e})")
    if not runs:
        p.error(f"no runs: give run directories, or a record that holds some ({args.record})")
    save_record(runs, args.record)
    ours = curves(runs)
    his = his_curves()
    steps = common_steps(ours, his, args.every)
    text = (
        "Majority-label accuracy on the 10k MNIST test images (each cluster takes its most "
        "common label), Shu's recipe (`--recipe shu`), at equal optimiser steps. Ours: one "
        "evaluation per 600 steps; Shu's: one per 500 (his logs, "
        "`benchmarks/results/shu_logs_gmvae.json`). Our runs as recorded in "
        "`benchmarks/results/shu_reproduction.json`:\n\n" + table(ours, his, steps) + "\n"
        + "\n".join(provenance(n, r) for n, r in runs.items()) + "\n\nCommand: `python "
        "benchmarks/shu_reproduction.py " + " ".join(args.runs) + "`\n"
    )  # fmt: skip
    Path(args.out).write_text(text)
    plot(ours, his, args.figure)
    print(text)
    return text


if __name__ == "__main__":
    main()
