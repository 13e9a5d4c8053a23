"""Data-parallel training over torch.distributed: two gloo processes on the CPU.

A data-parallel step must be the single-process step on the union of the ranks' shards (loss
and parameters after the step, float64), every rank must take its own share of each batch, and
the main job under torchrun must write one run folder and resume after a kill.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_gmvae import GMVAE
from pyro_gmvae.guides import make_guide
from pyro_gmvae.harness.run import RunConfig, gpu_placement, run
from pyro_gmvae.train import Trainer, _stream_seed, iterate_minibatches

D, K, B = 6, 3, 8
REPO = pathlib.Path(__file__).resolve().parents[1]


def pair():
    pyro.set_rng_seed(0)
    model = GMVAE(data_dim=D, k=K, z_dim=2, hidden=(8, 8)).double()
    return model, make_guide(None, model).double()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.4, dtype=torch.float64), generator=g)


TRAINER = dict(estimator="enum", lr=0.05, clip_norm=1.0, seed=0)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, guide = pair()
        if rank:  # another initialisation: the replicas start from rank 0's parameters
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        trainer = Trainer(model, guide, **TRAINER, data_parallel=True)
        x = data(B)
        part = B // world
        loss = trainer.step(x[rank * part : (rank + 1) * part])
        params = [p.detach().clone() for p in trainer.params]

        # fit(): record the rows each rank steps on.
        seen = []
        step = trainer.step
        trainer.step = lambda xb: (seen.append(xb.clone()), step(xb))[1]
        trainer.fit(data(32, seed=2), 1, B, binarize="dynamic")
        torch.save({"loss": loss, "params": params, "seen": seen}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _open_worker(rank, world, init_file, out, resume, report_dir):
    """Every rank calls run() on a folder that rank 0 will refuse; records what each raised."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            run(RunConfig(dataset="arcs", binarize="none", out=out, epochs=1), resume=resume)
            raised = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            raised = [type(err).__name__, str(err)]
        pathlib.Path(report_dir, f"rank{rank}.json").write_text(json.dumps(raised))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("resume", [False, True])
def test_a_refusal_of_rank_0_stops_every_rank(tmp_path, resume):
    """Rank 0 alone reads the run folder; what stops it (a run already there, a corrupt
    checkpoint) reaches the other ranks as one named error, and none waits in a collective."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (out / "config.json").write_text("{}")
    context = mp.start_processes(_open_worker, nprocs=2, start_method="spawn", join=False,
                                 args=(2, str(tmp_path / "init"), str(out), resume, str(tmp_path)))  # fmt: skip
    deadline = time.time() + 120
    while not context.join(timeout=1):
        assert time.time() < deadline, "a rank hung"
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    expected = (
        ["CorruptCheckpointError", "unreadable"]
        if resume
        else ["FileExistsError", "already holds a run"]
    )
    assert zero[0] == expected[0] and expected[1] in zero[1]
    assert one[0] == "OtherRankError" and one[1] == f"rank 0 stopped: {zero[0]}: {zero[1]}"
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing written


def test_one_data_parallel_step_equals_a_step_on_the_union(two_ranks):
    """Loss and parameters after one step of 2 gloo processes = one process's step on the union
    of their shards, with the same draws per point (each rank's stream), float64."""
    model, guide = pair()
    trainer = Trainer(model, guide, **TRAINER)
    x, total = data(B), 0.0
    for rank, shard in enumerate(x.split(B // 2)):
        # The union's loss and gradient are sums over points: shard by shard, each point drawn
        # from the stream its rank used.
        trainer._rng = trainer._seeded_stream(_stream_seed(0, rank))
        with trainer.context():
            total = total + trainer.estimator.loss_and_grads(
                trainer.model_fn, trainer.guide_fn, shard
            )
    torch.nn.utils.clip_grad_norm_(trainer.params, TRAINER["clip_norm"])  # on the union's gradient
    trainer.optimizer.step()
    for result in two_ranks:
        torch.testing.assert_close(result["loss"], total, rtol=1e-12, atol=1e-10)
        for p, q in zip(result["params"], trainer.params):
            torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-12)


def test_each_rank_takes_its_own_share_of_every_batch(two_ranks):
    """fit(): the ranks draw the same global batches and each steps on its half of each."""
    seen0, seen1 = two_ranks[0]["seen"], two_ranks[1]["seen"]
    assert len(seen0) == len(seen1) == 32 // B
    expected = iterate_minibatches(data(32, seed=2), B, torch.Generator().manual_seed(0))
    for a, b, batch in zip(seen0, seen1, expected):
        assert a.shape == b.shape == (B // 2, D)
        assert torch.equal(torch.cat([a, b]), batch)  # the same stream as one process's


@pytest.mark.parametrize(
    "processes, gpus, expected",
    [(2, 2, [(0, "nccl"), (1, "nccl")]), (2, 1, [(0, "gloo"), (0, "gloo")]),
     (4, 2, [(0, "gloo"), (1, "gloo"), (0, "gloo"), (1, "gloo")]), (1, 8, [(0, "nccl")])],
)  # fmt: skip
def test_processes_get_a_gpu_each_or_share_them_over_gloo(processes, gpus, expected):
    assert [gpu_placement(r, processes, gpus) for r in range(processes)] == expected


def test_distinct_ranks_draw_from_distinct_streams():
    assert len({_stream_seed(0, r) for r in range(8)}) == 8 and _stream_seed(5, 0) == 5


# ----------------------------------------------------------------- the main job under torchrun

DATA_ROOT = pathlib.Path(os.environ.get("PYRO_GMVAE_DATA") or REPO.parent / "shared" / "data")
needs_mnist = pytest.mark.skipif(not (DATA_ROOT / "MNIST" / "raw").is_dir(),
                                 reason=f"no MNIST under {DATA_ROOT}")  # fmt: skip
TINY = ["--recipe", "shu", "--limit", "400", "--test-limit", "200", "--batch-size", "20",
        "--hidden", "16", "--latent-dim", "4", "--no-progress"]  # fmt: skip


def torchrun(out, *extra):
    env = dict(os.environ, PYRO_GMVAE_DATA=str(DATA_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(REPO / "examples" / "mnist_unsup.py"), *TINY,
               "--out", str(out), *extra]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def test_a_batch_the_processes_cannot_share_is_one_line(tmp_path):
    """Under torchrun (WORLD_SIZE set), a batch size that is not a multiple of the processes is
    refused naming the flag, before any process group or folder exists."""
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "mnist_unsup.py"), "--model",
                           "gmvae", "--dataset", "arcs", "--batch-size", "25", "--epochs", "1",
                           "--out", str(tmp_path / "run"), "--no-progress"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "argument --batch-size: 25 must be a multiple of the 2 data-parallel" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@needs_mnist
def test_torchrun_main_job_writes_one_run_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(out, "--epochs", "40")
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() or not _rows(out):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    workers = _children(proc.pid)
    assert len(workers) == 2
    # A kill without warning, of the launcher and of both workers (each in a session of its own).
    for pid in [*_children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    epochs = len(_rows(out)) + 2  # what the killed run finished, and two more

    proc = torchrun(out, "--epochs", str(epochs), "--resume")
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # each once, by rank 0
    # 400 rows in global batches of 20 (10 per process): 20 steps an epoch.
    assert [r["step"] for r in rows] == [20 * e for e in range(1, epochs + 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not list(out.glob("*.tmp"))
    assert log.count("Hungarian") <= 1  # one report, from rank 0

    # A second run into the finished folder: every rank refuses with the CLI's one line (its
    # own check, before run(); run()'s refusal from rank 0 is test_a_refusal_of_rank_0...).
    proc = torchrun(out, "--epochs", str(epochs))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert log.count("already holds a run") == 2, log[-3000:]  # one line from each rank
    assert [r["epoch"] for r in _rows(out)] == list(range(1, epochs + 1))  # nothing touched


def _children(pid):
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rows(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
