"""Markdown tables from bench_step.py JSON files (the READMEs' tables are made with this).

python benchmarks/make_table.py benchmarks/results/cpu_b100.json benchmarks/results/cpu_b1000.json
python benchmarks/make_table.py --summary FILE.json ...   # one compact table over all the files
"""

import json
import sys

SUMMARY_IMPLS = ("pyro", "pyro_noval", "pyro_jit")


def _f(value, scale=1.0, spec=".1f"):
    return "–" if value is None else format(value / scale, spec)


def table(report):
    meta, rows = report["meta"], []
    basis = "CPU" if meta["device"] == "cpu" else "wall"
    rows.append(
        f"`{meta['command']}` — {meta['date_utc']}, {meta['cpu_model']} ({meta['cpu_count']} CPUs, "
        f"{meta['torch_threads']} torch thread(s)), device {meta['device']}, torch {meta['torch']}, "
        f"pyro {meta['pyro']}; load average {_f(meta['loadavg_start'][0])} → {_f(meta['loadavg_end'][0])}; "
        f"float32 matmul {_f(report['matmul']['flops_per_s'], 1e9)} GFLOP per {basis} second.\n"
    )
    rows.append(
        f"| model | B | impl | step ms ({basis}) | step ms (wall) | epoch s ({basis}) | examples/s | "
        "peak MB | GFLOP/step | GFLOP/epoch | GFLOP/s | % of matmul | host reads/step | "
        "× reference [quartiles] |"
    )
    rows.append("|" + "---|" * 14)
    for r in report["results"]:
        for name, v in r["impls"].items():
            key = f"{name}/reference"
            ratio = "1" if name == "reference" else (
                f"{r['ratios'][key]:.3f} [{r['ratio_quartiles'][key][0]:.2f}, {r['ratio_quartiles'][key][1]:.2f}]"
            )  # fmt: skip
            rows.append(
                f"| {r['model']} | {r['batch_size']} | {name} | {_f(v['step_s'], 1e-3)} | "
                f"{_f(v['step_wall_s'], 1e-3)} | {_f(v['epoch_s'])} | {_f(v['examples_per_s'], 1, '.0f')} | "
                f"{_f(v['peak_mem_bytes'], 2**20, '.0f')} | {_f(v['flops_per_step'], 1e9, '.2f')} | "
                f"{_f(v['flops_per_epoch'], 1e9, '.0f')} | {_f(v['achieved_flops_per_s'], 1e9)} | "
                f"{_f(v['fraction_of_matmul'], 0.01, '.0f')} | {v['host_reads_per_step']} | {ratio} |"
            )
    rows.append("\nTargets:\n")
    for t in report["targets"]:
        status = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        value = "" if t["value"] is None else f" ({t['value']:.3f})"
        rows.append(f"- {status} {t['target']}{value}")
    return "\n".join(rows)


def _ratio(r, name):
    key = f"{name}/reference"
    if key not in r["ratios"]:
        return "–"
    low, high = r["ratio_quartiles"][key]
    return f"{r['ratios'][key]:.2f} [{low:.2f}, {high:.2f}]"


def summary(reports):
    """Step time of the reference and Pyro's ratios to it (median [quartiles]), per model and B."""
    basis = {"CPU" if rep["meta"]["device"] == "cpu" else "wall" for rep in reports}
    rows = [
        f"| model | B | reference step ms ({'/'.join(sorted(basis))}) | pyro epoch s | "
        + " | ".join(f"{n} × reference" for n in (*SUMMARY_IMPLS, "naive"))
        + " |",
        "|" + "---|" * (5 + len(SUMMARY_IMPLS)),
    ]
    for rep in reports:
        for r in rep["results"]:
            ratios = " | ".join(_ratio(r, n) for n in (*SUMMARY_IMPLS, "naive"))
            rows.append(
                f"| {r['model']} | {r['batch_size']} | {_f(r['impls']['reference']['step_s'], 1e-3)}"
                f" | {_f(r['impls']['pyro']['epoch_s'])} | {ratios} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--summary":
        print(summary([json.loads(open(path).read()) for path in args[1:]]))
    else:
        for path in args:
            print(table(json.loads(open(path).read())) + "\n")
