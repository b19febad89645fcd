"""The benchmarks run and end with the line other tools parse (never a timing assertion: CI machines are shared)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_train_throughput_quick_run_ends_with_the_overhead_ratio():
    done = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--quick", "--models", "seed_cnn", "--sizes", "28"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    row = next(line.split() for line in lines if line.startswith("seed_cnn "))
    assert row[1] == "28" and row[6] == "yes"  # the pipeline's epoch did exactly the bare loop's arithmetic
    assert re.fullmatch(r"overhead_ratio=\d+\.\d{4}", lines[-1]), lines[-1]
    assert float(lines[-1].split("=")[1]) > 0
