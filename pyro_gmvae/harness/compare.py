"""Multi-seed comparisons: run or reuse a set of runs, aggregate their metrics, tabulate them.

The comparison scripts (``examples/compare_models.py``, ``compare_guides.py``,
``compare_elbos.py``, ``table1.py``) train one run directory per setting and seed through
:func:`pyro_gmvae.harness.run.run`, then report each setting as mean ± std over its seeds. These are the
pieces they share; the band plot is :func:`pyro_gmvae.harness.plots.plot_seed_bands`.

A metric key is a key of a ``metrics.jsonl`` row or of ``summary.json``; ``"neg_<key>"`` is the
negated ``<key>`` (e.g. ``neg_test_elbo``, a loss in nats), NaN when the run did not record it
(``test_iw_bound`` without ``iw_samples``).
"""

import contextlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from .run import CHECKPOINT, RunConfig, read_metrics, run

SUMMARY = "summary.json"


def read_summary(run_dir) -> dict:
    """The final summary of a finished run (its ``summary.json``)."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def run_or_reuse(cfg: RunConfig) -> tuple[dict, bool]:
    """(summary, trained): the run ``cfg`` describes, trained only if it is not finished.

    A run directory whose ``summary.json`` reached ``cfg.epochs`` is reused as it is
    (``trained`` False); otherwise the run resumes from its checkpoint when there is one (an
    interrupted run, or a finished one given more epochs), else starts afresh.
    """
    out = Path(cfg.out)
    if (out / SUMMARY).exists():
        summary = read_summary(out)
        if summary.get("epoch") == cfg.epochs:
            return summary, False
    return run(cfg, resume=(out / CHECKPOINT).exists()), True


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_one(cfg: RunConfig) -> tuple[dict, bool]:
    with _one_thread():
        summary, trained = run_or_reuse(cfg)
    return dict(summary), trained  # the plain summary: the trained modules stay behind


def run_many(configs, workers: int = 1) -> list[tuple[dict, bool]]:
    """:func:`run_or_reuse` for every config, results in the configs' order.

    Each run uses one torch thread (and one numba thread, UMAP's), so that ``workers`` runs can
    share the machine's cores, and so that a run's numbers do not depend on how many ran beside
    it: ``workers=1`` runs them one by one in this process, ``workers > 1`` as that many
    concurrent processes (spawned, so CUDA works in them; several can share one GPU). The
    runs are independent: each seeds itself from its config, in its own run directory.
    """
    configs = list(configs)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    # Set before any worker imports numba or torch; an explicit setting of the user's is kept.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if workers == 1 or len(configs) <= 1:
        return [_run_one(cfg) for cfg in configs]
    context = get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(configs)), mp_context=context) as pool:
        return list(pool.map(_run_one, configs))


def run_line(label: str, summary: dict) -> str:
    """One line for a run just trained: its label, then Hungarian accuracy, H(Y|X), the test
    −ELBO and the wall time."""
    return (f"{label}: Hungarian {summary['acc_hungarian']:.3f}, "
            f"H(Y|X) {summary['cond_entropy']:.3f}, test -ELBO {-summary['test_elbo']:.2f}, "
            f"{summary['wall_time_s']:.0f} s")  # fmt: skip


def metric_value(row: dict, key: str) -> float:
    """``row[key]``, or ``-row[k]`` for ``key = "neg_<k>"`` (NaN when the row lacks ``k``)."""
    if key.startswith("neg_"):
        return -row.get(key[4:], math.nan)
    return row[key]


def metric_curves(run_dirs, key: str, x_key: str = "epoch"):
    """(xs, values): one metric of several runs (seeds) per evaluation.

    ``values`` has shape (runs, evaluations), truncated to the shortest run; ``xs`` is ``x_key``
    at each evaluation averaged over the runs (the epoch is the same in all of them; ``time_s``
    differs).
    """
    rows = [read_metrics(d) for d in run_dirs]
    if not rows or any(not r for r in rows):
        raise ValueError(f"no metrics.jsonl rows in some of {[str(d) for d in run_dirs]}")
    n = min(len(r) for r in rows)
    xs = np.array([[row[x_key] for row in r[:n]] for r in rows], dtype=float).mean(0)
    values = np.array([[metric_value(row, key) for row in r[:n]] for r in rows], dtype=float)
    return xs, values


def comparison_curves(dirs: dict, panels) -> dict:
    """For :func:`pyro_gmvae.harness.plots.plot_comparison`: ``dirs`` maps (model, variant) to run
    directories (one per seed); returns (model, variant) -> {(key, x key): (xs, values)} for
    each panel's (key, x key, title)."""
    return {
        group: {(key, x_key): metric_curves(run_dirs, key, x_key) for key, x_key, _ in panels}
        for group, run_dirs in dirs.items()
    }


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of ``values`` times ``scale``, with the population std (numpy's default,
    ddof = 0); NaNs are left out, and all-NaN values show as ``"–"``."""
    values = np.asarray(values, dtype=float) * scale
    if np.isnan(values).all():
        return "–"
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}"


def markdown_table(groups: dict, columns, label_headers) -> str:
    """A markdown table with one row per group of runs: its labels, its number of runs, then
    :func:`mean_std` of every column over the runs.

    ``groups`` maps a label (a string, or a tuple of strings for several label columns) to the
    runs' summaries; ``columns`` is a sequence of ``(metric key, title, scale)``; a title's
    ``|`` must be escaped (``\\|``). ``label_headers`` names the label columns.
    """
    label_headers = list(label_headers)
    titles = label_headers + ["seeds"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for label, summaries in groups.items():
        labels = [label] if isinstance(label, str) else list(label)
        if len(labels) != len(label_headers):
            raise ValueError(f"label {label!r} does not match the headers {label_headers}")
        cells = [
            mean_std([metric_value(s, key) for s in summaries], scale) for key, _, scale in columns
        ]
        lines.append("| " + " | ".join([*labels, str(len(summaries)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_results(out, markdown: str, record: dict) -> None:
    """Write a comparison's report into folder ``out``: ``results.md`` (``markdown``) and
    ``results.json`` (``record``: the arguments, every run's summary, ...)."""
    out = Path(out)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
