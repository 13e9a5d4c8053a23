"""The README's Python example runs as written (on MNIST, when the data root holds it)."""

import os
import pathlib
import re

import pytest

from pyro_gmvae.harness.data import DATA_ENV_VAR

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ROOT = pathlib.Path(os.environ.get(DATA_ENV_VAR) or REPO.parent / "shared" / "data")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.mark.skipif(not (DATA_ROOT / "MNIST" / "raw").is_dir(), reason="no MNIST in the data root")
def test_readme_training_example_runs(monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(DATA_ROOT))
    (example,) = [b for b in python_blocks() if "trainer.fit" in b]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (2000, 10)
    assert float(namespace["loss"]) > 0  # −ELBO summed over a batch of binary images


def test_readme_pipeline_example_runs():
    (example,) = [b for b in python_blocks() if "GMVAEClustering(n_clusters=10)" in b]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["clusters"].shape == (1797,) and namespace["probs"].shape == (1797, 10)
