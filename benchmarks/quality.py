"""Clustering quality of the recipes over seeds: the numbers behind docs/results.md.

Runs every recipe × seed of ``pyro_gmvae.harness.run.RECIPES`` on a dataset at a given budget, as
parallel processes (``--workers``, one thread each, at most the core count), each in its own run
directory (a finished run is reused, an interrupted one resumed), and writes

* ``<out-dir>/quality_<dataset>.json``: one record per run with ``recipe``, ``seed``, ``epochs``,
  ``wall_s``, ``acc_hungarian``, ``nmi``, ``ari``, ``train_elbo``, ``test_elbo``, ``commit``,
  ``init_acc_hungarian`` (the accuracy right after the initialisation stage, if any) and
  ``selected_by_elbo`` (the run of its recipe with the highest final training ELBO: a
  label-free choice among restarts), plus the command and the hardware;
* ``<out-dir>/quality_<dataset>.md``: per recipe, Hungarian accuracy mean ± std, min and max
  over seeds, NMI, ARI, and the ELBO-selected run's accuracy, reported apart.

Protocol: train on the training split (60k images), evaluate on the test split (10k), K = 10.
Labels are read only by the evaluation; no setting, seed or checkpoint is chosen with them.

    python benchmarks/quality.py --dataset mnist --recipes vade-umap shu --seeds 0 1 2 3 4
    python benchmarks/quality.py --dataset fashion-mnist --recipes vade-umap --seeds 0 1 2 3 4
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyro_gmvae.harness.compare import run_many  # noqa: E402
from pyro_gmvae.harness.run import RECIPES, RunConfig, git_commit, read_metrics  # noqa: E402

# Settings a budget may override, with their types.
OVERRIDES = {"epochs": int, "pretrain_epochs": int, "limit": int, "test_limit": int,
             "latent_dim": int, "batch_size": int, "lr": float, "validation": int}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument("--recipes", nargs="+", default=["vade-umap"], choices=sorted(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="runs at once, one thread each (default: the core count)")  # fmt: skip
    p.add_argument("--runs-dir", default="runs/quality", help="where the run directories go")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--hidden", help="hidden widths, e.g. 16 or 500,500,2000 (smoke runs)")
    p.add_argument("--commit", help="the commit finished runs were trained at, for runs whose "
                   "config.json predates its record of it (default: the current one)")  # fmt: skip
    for name, kind in OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help="overrides the recipe's")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def config(args, recipe: str, seed: int) -> RunConfig:
    values = {**RECIPES[recipe], "recipe": recipe, "dataset": args.dataset, "seed": seed,
              "progress": False, "out": str(Path(args.runs_dir) / f"{args.dataset}-{recipe}-seed{seed}")}  # fmt: skip
    values.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    if args.hidden:
        widths = [int(v) for v in args.hidden.split(",")]
        values["hidden"] = widths[0] if len(widths) == 1 else widths
    return RunConfig(**values)


def record(cfg: RunConfig, summary: dict) -> dict:
    """The record of one finished run."""
    rows = read_metrics(cfg.out)
    saved = json.loads((Path(cfg.out) / "config.json").read_text())
    init = rows[0] if rows and rows[0]["epoch"] == 0 else {}
    return {
        "recipe": cfg.recipe, "dataset": cfg.dataset, "seed": cfg.seed, "epochs": cfg.epochs,
        "pretrain_epochs": cfg.pretrain_epochs, "init": cfg.init,
        "wall_s": summary["wall_time_s"], "cpu_s": summary.get("cpu_time_s"),
        "acc_hungarian": summary["acc_hungarian"],
        "nmi": summary["nmi"], "ari": summary["ari"], "acc_majority": summary["acc_majority"],
        # The training objective is −ELBO per point for these recipes (no β, no free bits).
        "train_elbo": -summary["train_loss"], "test_elbo": summary["test_elbo"],
        "init_acc_hungarian": init.get("acc_hungarian"), "run_dir": cfg.out,
        "commit": saved.get("versions", {}).get("git_commit"),
        "hardware": hardware_line(summary["hardware"]), "device": summary["hardware"]["device"],
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip


def mark_selected(records) -> None:
    """Flag, per recipe, the run with the highest final training ELBO (labels unused)."""
    for recipe in {r["recipe"] for r in records}:
        runs = [r for r in records if r["recipe"] == recipe]
        best = max(runs, key=lambda r: r["train_elbo"])
        for r in runs:
            r["selected_by_elbo"] = r is best


def table(records) -> str:
    lines = [
        "| recipe | seeds | epochs (+ pretraining) | Hungarian acc. mean ± std | min | max "
        "| ELBO-selected run | NMI | ARI | after init | test ELBO | CPU minutes per seed |",
        "|" + "---|" * 12,
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in records):
        runs = [r for r in records if r["recipe"] == recipe]
        acc = 100 * np.array([r["acc_hungarian"] for r in runs])
        chosen = next(r for r in runs if r["selected_by_elbo"])
        init = [r["init_acc_hungarian"] for r in runs if r["init_acc_hungarian"] is not None]

        def ms(key, scale=1.0, digits=3, runs=runs):
            v = scale * np.array([r[key] for r in runs], dtype=float)
            return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"

        lines.append(
            f"| {recipe} | {len(runs)} | {runs[0]['epochs']} (+ {runs[0]['pretrain_epochs']}) "
            f"| {acc.mean():.1f} ± {acc.std():.1f} | {acc.min():.1f} | {acc.max():.1f} "
            f"| {100 * chosen['acc_hungarian']:.1f} (seed {chosen['seed']}) | {ms('nmi')} "
            f"| {ms('ari')} | {f'{100 * np.mean(init):.1f}' if init else '–'} "
            f"| {ms('test_elbo', digits=1)} | {ms('cpu_s', 1 / 60, 1)} |"
        )
    return "\n".join(lines) + "\n"


def seed_table(records) -> str:
    """Every run: its seed, scores, ELBOs, budget and commit; the ELBO-selected one marked."""
    lines = [
        "| recipe | seed | Hungarian acc. | NMI | ARI | after init | train ELBO | test ELBO "
        "| CPU min | commit | selected by ELBO |",
        "|" + "---|" * 11,
    ]
    for r in sorted(records, key=lambda r: (r["recipe"], r["seed"])):
        init = r["init_acc_hungarian"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {100 * r['acc_hungarian']:.2f} | {r['nmi']:.3f} "
            f"| {r['ari']:.3f} | {'–' if init is None else f'{100 * init:.2f}'} "
            f"| {r['train_elbo']:.2f} | {r['test_elbo']:.2f} | {(r['cpu_s'] or 0) / 60:.1f} "
            f"| {(r['commit'] or '?')[:7]}{'+' if '+' in (r['commit'] or '') else ''} "
            f"| {'yes' if r['selected_by_elbo'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    commit = git_commit()  # now: the code the runs import, whatever is committed meanwhile
    configs = [config(args, r, s) for r in args.recipes for s in args.seeds]
    # One thread per run (numba's, UMAP's, included), up to --workers runs at once.
    results = run_many(configs, args.workers)
    records = [record(cfg, summary) for cfg, (summary, _) in zip(configs, results)]
    command = "python benchmarks/quality.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    for r in records:
        r["command"] = command
        r["commit"] = r["commit"] or args.commit or commit
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quality_{args.dataset}.json"
    # Records of other recipes (another invocation, another budget) are kept; these replace
    # their own recipe's.
    mine = {r["recipe"] for r in records}
    if path.exists():
        records = [r for r in json.loads(path.read_text()) if r["recipe"] not in mine] + records
    mark_selected(records)
    path.write_text(json.dumps(records, indent=2) + "\n")
    gpus = sorted({r["hardware"] for r in records if not r.get("device", "cpu").startswith("cpu")})
    where = "one CPU thread per seed" if not gpus else f"on {' and '.join(gpus)}"
    md = (
        f"{args.dataset}, K = 10, train on the training split, test on the test split; {where} "
        "(CPU minutes: the process's CPU time). Commands, commits and hardware per run: "
        f"{path.name}\n\n" + table(records) + "\n" + seed_table(records)
    )
    (out / f"quality_{args.dataset}.md").write_text(md)
    print(md)
    return records


def hardware_line(info: dict) -> str:
    """A run's hardware (``summary["hardware"]``) in words."""
    if "gpu" in info:
        return f"{info['gpu']} (seeds in parallel share it), {info['cpu_count']} CPU cores"
    return f"{info['cpu']}, {info['cpu_count']} cores, 1 thread per run"


if __name__ == "__main__":
    main()
