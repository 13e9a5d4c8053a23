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
