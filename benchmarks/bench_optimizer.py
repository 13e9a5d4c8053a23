"""Time one optimiser step over each model's parameters: the trainer's fused Adam against the
per-tensor loop (torch's default on CPU) and the multi-tensor ``foreach`` version.

The step is the same update in all three (``tests/test_train.py`` checks the fused one against
the loop); only its implementation differs. Gradients are random, the parameters copies of the
MNIST-sized models' (``bench_step.build``), one torch thread by default; CPU time on CPU.

    python benchmarks/bench_optimizer.py --out benchmarks/results/cpu_adam.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_step import build, metadata, sync  # noqa: E402
from pyro_gmvae import MODELS  # noqa: E402

VARIANTS = {
    "fused": dict(fused=True),
    "per_tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
}


def step_seconds(params, device, repeats, **kwargs):
    params = [p.detach().clone().requires_grad_() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
    for _ in range(3):  # the state exists, as after the first training step
        opt.step()
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        opt.step()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for name in args.models:
        model, guide = build(name, 10, False, device)
        params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
        row = {"model": name, "parameters": sum(p.numel() for p in params)}
        row["step_s"] = {
            v: step_seconds(params, device, args.repeats, **kw) for v, kw in VARIANTS.items()
        }
        results.append(row)
        times = " ".join(f"{v} {t * 1e3:.2f} ms" for v, t in row["step_s"].items())
        print(f"{name:12s} {row['parameters'] / 1e6:5.2f} M parameters: {times}")
    if args.out:
        meta = metadata(argparse.Namespace(epoch_size=None, k=10, quick=False), device)
        meta.pop("data_checks"), meta.pop("epoch_size")
        report = {"meta": meta, "results": results}
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
