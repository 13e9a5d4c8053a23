"""The reproductions in docs/upstream.md still show the Pyro bugs that pyro_internals.py works
around: if one fails, the pinned Pyro fixed it, and the work-around can go."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "upstream.md"


def reproductions():
    """(code, the output the document shows) for each reproduction."""
    blocks = re.findall(r"```(python)?\n(.*?)```", DOC.read_text(), re.S)
    pairs = [(blocks[i][1], blocks[i + 1][1]) for i in range(len(blocks) - 1) if blocks[i][0]]
    assert len(pairs) == 2
    return pairs


@pytest.mark.parametrize("code,shown", reproductions(), ids=["tmc", "rws"])
def test_upstream_reproduction_prints_what_the_report_shows(code, shown):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    # The RWS numbers are Monte Carlo averages: equal up to the draws of another torch build.
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", out.getvalue())]
    assert numbers == pytest.approx(
        [float(v) for v in re.findall(r"-?\d+\.\d+", shown)], rel=0.1, abs=0.05
    )
