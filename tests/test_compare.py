"""pyro_gmvae.harness.compare against hand-computed values on tiny made-up runs."""

import json
import math

import numpy as np
import pytest

from pyro_gmvae.harness import compare
from pyro_gmvae.harness.run import RunConfig


def write_run(run_dir, rows, summary=None, checkpoint=False):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (run_dir / "checkpoint.pt").write_bytes(b"")
    return run_dir


def test_mean_std():
    # [1, 2, 4]: mean 7/3; population variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 14/9.
    assert compare.mean_std([1, 2, 4]) == f"2.33 ± {math.sqrt(14 / 9):.2f}" == "2.33 ± 1.25"
    assert compare.mean_std([0.5, 0.75], scale=100, digits=1) == "62.5 ± 12.5"
    assert compare.mean_std([3.0]) == "3.00 ± 0.00"
    # NaN (a metric a run did not record) is left out; all NaN shows as a dash.
    assert compare.mean_std([1.0, math.nan, 3.0]) == "2.00 ± 1.00"
    assert compare.mean_std([math.nan, math.nan]) == "–"


def test_metric_value():
    row = {"test_elbo": -90.5, "acc": 0.25}
    assert compare.metric_value(row, "acc") == 0.25
    assert compare.metric_value(row, "neg_test_elbo") == 90.5
    assert math.isnan(compare.metric_value(row, "neg_test_iw_bound"))
    with pytest.raises(KeyError):
        compare.metric_value(row, "nmi")


def test_markdown_table():
    groups = {
        ("m2", "iaf"): [{"acc": 0.5, "test_elbo": -100.0}, {"acc": 0.7, "test_elbo": -102.0}],
        ("gmvae", "iaf"): [{"acc": 0.9, "test_elbo": -95.0}],
    }
    columns = (("acc", "acc. (%)", 100), ("neg_test_elbo", r"−ELBO \| nats", 1))
    table = compare.markdown_table(groups, columns, ["model", "guide"])
    assert table == (
        "| model | guide | seeds | acc. (%) | −ELBO \\| nats |\n"
        "|---|---|---|---|---|\n"
        "| m2 | iaf | 2 | 60.00 ± 10.00 | 101.00 ± 1.00 |\n"
        "| gmvae | iaf | 1 | 90.00 ± 0.00 | 95.00 ± 0.00 |\n"
    )
    single = compare.markdown_table({"GMVAE": groups["gmvae", "iaf"]}, columns[:1], ["model"])
    assert single.splitlines()[2] == "| GMVAE | 1 | 90.00 ± 0.00 |"
    with pytest.raises(ValueError, match="does not match"):
        compare.markdown_table({"m2": []}, columns, ["model", "guide"])


def test_metric_curves(tmp_path):
    a = write_run(tmp_path / "a", [{"epoch": 1, "time_s": 1.0, "test_elbo": -10.0},
                                   {"epoch": 2, "time_s": 3.0, "test_elbo": -8.0},
                                   {"epoch": 3, "time_s": 5.0, "test_elbo": -7.0}])  # fmt: skip
    b = write_run(tmp_path / "b", [{"epoch": 1, "time_s": 2.0, "test_elbo": -12.0},
                                   {"epoch": 2, "time_s": 4.0, "test_elbo": -9.0}])  # fmt: skip
    epochs, values = compare.metric_curves([a, b], "neg_test_elbo")
    # Truncated to the shorter run (2 evaluations); one row per run.
    np.testing.assert_array_equal(epochs, [1, 2])
    np.testing.assert_array_equal(values, [[10.0, 8.0], [12.0, 9.0]])
    seconds, _ = compare.metric_curves([a, b], "neg_test_elbo", x_key="time_s")
    np.testing.assert_array_equal(seconds, [1.5, 3.5])  # averaged over the runs
    with pytest.raises(ValueError, match="no metrics"):
        compare.metric_curves([a, tmp_path / "missing"], "neg_test_elbo")


@pytest.mark.parametrize(
    "summary_epoch, checkpoint, expected",
    [(3, True, None), (2, True, True), (None, True, True), (None, False, False)],
)
def test_run_or_reuse(tmp_path, monkeypatch, summary_epoch, checkpoint, expected):
    """Reuse a run whose summary reached cfg.epochs; otherwise resume from a checkpoint if there
    is one (an interrupted run, or a finished one given more epochs), else start afresh."""
    calls = []

    def fake_run(cfg, resume=False):
        calls.append(resume)
        return {"epoch": cfg.epochs, "trained": True}

    monkeypatch.setattr(compare, "run", fake_run)
    summary = None if summary_epoch is None else {"epoch": summary_epoch, "trained": False}
    run_dir = write_run(tmp_path / "seed0", [], summary, checkpoint)
    got, trained = compare.run_or_reuse(RunConfig(epochs=3, out=str(run_dir)))
    assert calls == ([] if expected is None else [expected])
    assert trained == (expected is not None) == got["trained"]
    assert got["epoch"] == 3


def test_runs_in_parallel_equal_runs_one_by_one(tmp_path):
    """run_many with two worker processes gives every run exactly the metrics it gets alone."""
    from pyro_gmvae.harness.compare import run_many
    from pyro_gmvae.harness.run import RunConfig, read_metrics

    def configs(where):
        return [RunConfig(model="gmvae", k=3, dataset="arcs", binarize="none", hidden=8,
                          latent_dim=2, limit=60, batch_size=30, eval_batch_size=60, epochs=2,
                          seed=seed, progress=False, out=str(tmp_path / where / f"seed{seed}"))
                for seed in (0, 1)]  # fmt: skip

    parallel = run_many(configs("parallel"), workers=2)
    alone = run_many(configs("alone"), workers=1)
    assert [trained for _, trained in parallel] == [True, True]
    untimed = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]  # noqa: E731
    for seed, (a, b) in enumerate(zip(parallel, alone)):
        assert a[0]["acc_hungarian"] == b[0]["acc_hungarian"]
        assert untimed(read_metrics(tmp_path / "parallel" / f"seed{seed}")) == untimed(
            read_metrics(tmp_path / "alone" / f"seed{seed}")
        )
    # The two seeds differ: each run is seeded from its own config.
    assert read_metrics(tmp_path / "alone" / "seed0") != read_metrics(tmp_path / "alone" / "seed1")
    assert run_many(configs("alone"), workers=2)[0][1] is False  # finished runs are reused
