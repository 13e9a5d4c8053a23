"""benchmarks/shu_reproduction.py: our curve and Shu's logged ones are compared at equal steps."""

import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shu_reproduction as S  # noqa: E402


def test_his_logs_are_whole_and_in_steps():
    logs = json.loads(S.LOGS.read_text())
    assert len(logs["runs"]) == 7
    for run in logs["runs"].values():
        assert run["epoch"] == list(range(1, len(run["epoch"]) + 1))
        assert all(0 < a <= 1 for a in run["t_acc"])
    curves = S.his_curves()
    assert curves["gmvae.log.0"][500] == logs["runs"]["gmvae.log.0"]["t_acc"][0]


def test_the_table_pairs_our_step_with_his_epoch(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    # Our evaluations every 600 steps; 3000 is our epoch 5 and his epoch 6.
    rows = [{"epoch": e, "step": 600 * e, "acc_majority": 0.1 * e} for e in range(0, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = {"mine": S.our_curve(run)}
    assert 0 not in ours["mine"]  # the initialisation row (step 0) is not a training step
    his = S.his_curves()
    steps = S.common_steps(ours, his, every=3000)
    assert steps == [3000]
    line = S.table(ours, his, steps).splitlines()[2]
    expected = [r["t_acc"][5] for r in json.loads(S.LOGS.read_text())["runs"].values()]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == ["3000", "6", "50.0", "7"]
    assert (
        cells[4]
        == f"{100 * statistics.mean(expected):.1f} ± {100 * statistics.pstdev(expected):.1f}"
    )
    assert cells[5] == f"{100 * min(expected):.1f} – {100 * max(expected):.1f}"


@pytest.mark.parametrize("every", [1000, 3000])
def test_common_steps_are_multiples_of_every(every):
    ours = {"a": {600 * e: 0.5 for e in range(1, 21)}}
    steps = S.common_steps(ours, S.his_curves(), every)
    assert steps and all(s % every == 0 and s % 600 == 0 for s in steps)


def _fake_run(path, seed, epochs_done, finished):
    path.mkdir()
    config = {"seed": seed, "epochs": 10, "threads": 1, "estimator": "enum-jit",
              "versions": {"git_commit": "0123456789abcdef"}, "hardware": {"device": "cpu"}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "step": 600 * e, "time_s": 36.0 * e, "acc_majority": 0.05 * e}
            for e in range(0, epochs_done + 1)]  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        summary = {"acc_hungarian": 0.5, "acc_majority": 0.55, "nmi": 0.4, "ari": 0.3,
                   "test_elbo": -99.0, "cpu_time_s": 7200.0}  # fmt: skip
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_the_record_keeps_a_run_after_its_directory_is_gone(tmp_path):
    files = ["--record", str(tmp_path / "record.json"), "--out", str(tmp_path / "table.md"),
             "--figure", str(tmp_path / "curves.png")]  # fmt: skip
    a = _fake_run(tmp_path / "run-a", seed=0, epochs_done=10, finished=True)
    S.main([str(a), *files])
    entry = S.load_record(tmp_path / "record.json")["run-a"]
    assert entry["curve"] == {str(600 * e): 0.05 * e for e in range(1, 11)}
    assert (entry["epochs_done"], entry["steps"], entry["commit"]) == (10, 6000, "0123456")
    assert entry["wall_h"] == 0.1 and entry["cpu_h"] == 2.0 and entry["final"]["nmi"] == 0.4
    first = (tmp_path / "table.md").read_text()
    assert "| 3000 | 6 | 25.0 |" in first and "Hungarian 50.0 %" in first

    # A second run is added beside the first, whose directory no longer exists.
    (a / "metrics.jsonl").unlink()
    b = _fake_run(tmp_path / "run-b", seed=1, epochs_done=5, finished=False)
    S.main([str(b), *files])
    runs = S.load_record(tmp_path / "record.json")
    assert set(runs) == {"run-a", "run-b"} and runs["run-a"] == entry
    assert runs["run-b"]["final"] is None and runs["run-b"]["cpu_h"] is None
    second = (tmp_path / "table.md").read_text()
    assert "| 3000 | 6 | 25.0 | 25.0 |" in second and "| 6000 | 12 | 50.0 | – |" in second

    # With no run directory, the record alone gives the same table.
    assert S.main(files).split("Command:")[0] == second.split("Command:")[0]


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        S.main([str(tmp_path), "--record", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not a run directory: it has no config.json or metrics.jsonl" in err
    assert not (tmp_path / "r.json").exists()


def test_the_committed_table_is_the_committed_record():
    ours = S.curves(S.load_record())
    his = S.his_curves()
    table = S.table(ours, his, S.common_steps(ours, his, 3000))
    assert table in (REPO / "benchmarks" / "results" / "shu_reproduction.md").read_text()


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ("", "has no evaluation yet"),
        ('{"epoch": 1, "ste\n', "cannot read the run (JSONDecodeError"),
    ],
)
def test_an_unreadable_run_is_one_line(tmp_path, capsys, metrics, expected):
    run = _fake_run(tmp_path / "run", seed=0, epochs_done=1, finished=False)
    (run / "metrics.jsonl").write_text(metrics)
    with pytest.raises(SystemExit):
        S.main([str(run), "--record", str(tmp_path / "r.json")])
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r.json").exists()


def test_a_corrupt_record_is_one_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"runs": ')
    with pytest.raises(SystemExit):
        S.main(["--record", str(tmp_path / "r.json")])
    assert "is not a readable record" in capsys.readouterr().err.strip().splitlines()[-1]
