"""The bytes each rank sends for attention, counted in a real forward+backward on gloo
ranks, equal the planner's formula for ring, Ulysses (with and without repeated K/V heads)
and the hybrid (``python -m bench.cp_comm``)."""

import sys
from unittest import mock

import pytest

from bench import cp_comm


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_counted_bytes_equal_the_planner(capsys):
    with mock.patch.object(sys, "argv", ["cp_comm"]):
        cp_comm.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == len(cp_comm.MODELS) * len(cp_comm.METHODS)
    assert all(r[-1].strip() == "yes" for r in rows), rows
