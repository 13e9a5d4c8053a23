"""Time whole training epochs, measured rather than extrapolated from one step.

The loop is the main job's own, ``Trainer.fit``, without evaluations on the test set: MNIST's 60k
training images resident on the device, a seeded row permutation and dynamic binarisation per
batch, Pyro's validation on for the first step only, the NaN guard, and the loss summed on the
device and read back once per epoch. Wall time, with a device synchronisation before the clock
stops. Epoch 0 includes the first-step checks (and, for ``enum-jit``, tracing), so it is reported
apart from the later epochs.

    python benchmarks/bench_epoch.py --device cuda --batch-sizes 100 500 1000 \
        --out benchmarks/results/cuda_epoch.json
    python benchmarks/bench_epoch.py --max-steps 60 --out /tmp/cpu_epoch.json   # CPU: a part epoch

``--max-steps`` trains each epoch on the first ``max-steps × B`` rows only (the same steps on
fewer rows; its mean loss is then not the main job's) and scales its time to the full epoch,
one-off costs of epoch 0 included (said in the output and the JSON). Without MNIST files
(``PYRO_GMVAE_DATA``), ``--synthetic`` uses random grey levels.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_step import metadata, sync  # noqa: E402
from pyro_gmvae import MODELS, make_guide, make_model  # noqa: E402
from pyro_gmvae.harness.data import load_dataset  # noqa: E402
from pyro_gmvae.nets import set_validation  # noqa: E402
from pyro_gmvae.train import Trainer, resolve_device  # noqa: E402

MNIST_TRAIN = 60000


def training_images(synthetic, device, limit=None, seed=0):
    """MNIST's training images as grey levels (N, 784) on the device, or random ones."""
    if synthetic:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(limit or MNIST_TRAIN, 784, generator=g).to(device)
    return load_dataset("mnist", train=True, limit=limit, device=device).x


def time_epochs(model_name, k, batch_size, estimator, x, epochs, max_steps, seed=0):
    """Wall seconds of each epoch of ``Trainer.fit`` (scaled to the full epoch when
    ``max_steps`` cuts it short: the epoch then runs over the first ``max_steps`` batches' worth
    of rows, the same steps on fewer rows)."""
    torch.manual_seed(seed)
    model = make_model(model_name, data_dim=x.shape[1], k=k)
    trainer = Trainer(model, make_guide(None, model), estimator=estimator, device=x.device,
                      seed=seed)  # fmt: skip
    full = x.shape[0] // batch_size
    steps = min(full, max_steps or full)
    rows_used = x[: steps * batch_size]
    rows, losses = [], []
    set_validation(False)  # binarised batches are binary: no per-step data checks, as in run()
    try:
        for epoch in range(epochs):
            sync(x.device)
            t0 = time.perf_counter()
            # One fit call per epoch, so that each is timed; after the first, Pyro's checks stay
            # off, as they do after the first step of the main job's single call.
            with pyro.validation_enabled(epoch == 0):
                trainer.fit(rows_used, epoch + 1, batch_size, binarize="dynamic",
                            evaluate=lambda done, loss: losses.append(loss))  # fmt: skip
            sync(x.device)
            seconds = time.perf_counter() - t0
            rows.append(
                {"epoch": epoch, "steps_timed": steps, "steps_per_epoch": full,
                 "seconds_timed": seconds, "epoch_s": seconds * full / steps,
                 "examples_per_s": steps * batch_size / seconds, "mean_loss": losses[-1]}
            )  # fmt: skip
    finally:
        set_validation(True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gmvae"], choices=list(MODELS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--estimator", default="enum", choices=["enum", "enum-jit"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration (>= 2)")
    parser.add_argument("--max-steps", type=int, help="steps timed per epoch (default: all)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--synthetic", action="store_true", help="random images, no MNIST files")
    parser.add_argument("--limit", type=int, help="train on the first N images (default all)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("argument --epochs: at least 2 (epoch 0 includes first-call work)")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("argument --max-steps: must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x = training_images(args.synthetic, device, args.limit)
    results = []
    for name in args.models:
        for batch_size in args.batch_sizes:
            rows = time_epochs(name, args.k, batch_size, args.estimator, x, args.epochs,
                               args.max_steps)  # fmt: skip
            later = [r["epoch_s"] for r in rows[1:]]
            result = {"model": name, "batch_size": batch_size, "epochs": rows,
                      "epoch_s_after_first": sorted(later)[len(later) // 2]}  # fmt: skip
            results.append(result)
            part = "" if rows[0]["steps_timed"] == rows[0]["steps_per_epoch"] else (
                f" (scaled from {rows[0]['steps_timed']} of {rows[0]['steps_per_epoch']} steps)"
            )  # fmt: skip
            print(
                f"{name:12s} B={batch_size:5d} {args.estimator}: epoch 0 {rows[0]['epoch_s']:.2f} s,"
                f" later epochs (median) {result['epoch_s_after_first']:.2f} s{part}"
            )
    if args.out:
        meta = metadata(argparse.Namespace(epoch_size=x.shape[0], k=args.k, quick=False), device)
        meta.pop("data_checks")
        meta.update(estimator=args.estimator, synthetic=args.synthetic, max_steps=args.max_steps)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
