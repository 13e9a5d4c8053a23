"""The harness around the science: datasets (data), training runs kept in a run directory
(run), the command line (cli), multi-seed comparisons (compare), figures (plots) and the
scikit-learn estimator (clustering). It imports the science modules of ``pyro_gmvae``; they
never import it."""
