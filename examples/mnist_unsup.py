"""The main job: unsupervised clustering of MNIST with a mixture VAE (``pyro-gmvae train``).

    python examples/mnist_unsup.py                       # the default recipe, vade-umap
    python examples/mnist_unsup.py --recipe shu          # Rui Shu's GMVAE as in his code
    python examples/mnist_unsup.py --help                # every flag

The code lives in :mod:`pyro_gmvae.harness.cli`, whose docstring describes the run directory.
"""

from pyro_gmvae.harness.cli import build_parser, main  # noqa: F401  (build_parser: for --help in tests)

if __name__ == "__main__":
    main()
