"""Dilokthanakul et al. 2016, Fig. 6: GMVAE-w with the convolutional networks on SVHN samples.

The paper trains its GMVAE (:class:`pyro_gmvae.GMVAEW`) with the 32x32x3 convolutional
recogniser and decoder of its Table A.2 (:class:`pyro_gmvae.nets.ConvEncoder` /
``ConvDecoder``) on SVHN and shows one row of generated images per cluster; it reports no SVHN
accuracy. SVHN is colour, so the grey levels are not binarised: the likelihood is a diagonal
Gaussian on the [0, 1] pixel values (``likelihood="gaussian"``, ``binarize="none"``), whose
decoder emits a mean and a variance per pixel. Row c of ``samples.png`` shows decoder means at
x = μ_c(w): column 0 at w = 0, the other columns at one w ~ N(0, I) per column, shared by all
rows (:func:`pyro_gmvae.harness.plots.sample_grid`), so a column compares clusters at the same w.

The data are read by ``torchvision.datasets.SVHN`` from ``--data-dir`` (or $PYRO_GMVAE_DATA):
``train_32x32.mat`` and ``test_32x32.mat``. Example (a GPU; the paper's x_dim 200, w_dim 150)::

    python examples/svhn.py --k 10 --epochs 50 --device cuda --out runs/svhn
"""

import argparse
import json
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images")
    p.add_argument("--x-dim", type=int, default=200)
    p.add_argument("--w-dim", type=int, default=150)
    p.add_argument("--hidden", type=int, default=500, help="width of the prior network")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--free-bits", type=float, default=0.5, help="λ on the z-prior term")
    p.add_argument("--cols", type=int, default=10, help="samples per cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/svhn")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    from pyro_gmvae.harness.plots import plot_image_grid, sample_grid
    from pyro_gmvae.harness.run import RunConfig, load_run, run

    args = parse_args(argv)
    out = Path(args.out)
    cfg = RunConfig(
        model="gmvae_w", arch="conv", dataset="svhn", likelihood="gaussian", binarize="none",
        k=args.k, epochs=args.epochs, limit=args.limit, test_limit=args.test_limit,
        latent_dim=args.x_dim, w_dim=args.w_dim, hidden=args.hidden, batch_size=args.batch_size,
        lr=args.lr, free_bits=args.free_bits,
        seed=args.seed, data_dir=args.data_dir, device=args.device, out=str(out / "run"),
        eval_batch_size=500, progress=args.progress,
    )  # fmt: skip
    summary = run(cfg, resume=(out / "run" / "checkpoint.pt").exists())
    model, _ = load_run(out / "run")
    images = sample_grid(model, n_cols=args.cols, seed=args.seed)
    plot_image_grid(
        images, out / "samples.png", (3, 32, 32),
        row_labels=[f"c = {c}" for c in range(args.k)],
        title=f"GMVAE-w samples on SVHN, one row per cluster (epoch {summary['epoch']})",
        xlabel="column 1: w = 0; other columns: one w ~ N(0, I) each, shared across rows",
    )  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"epoch {summary['epoch']}: test ELBO {summary['test_elbo']:.1f} nats/image, "
        f"Hungarian {summary['acc_hungarian']:.3f}, clusters used {summary['clusters_used']}; "
        f"samples in {out / 'samples.png'}"
    )
    return summary


if __name__ == "__main__":
    main()
