"""The benchmarks run and end with the line other tools parse (never a timing assertion: CI machines are shared)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


def write_chest_like_jpegs(folder, n: int = 6) -> None:
    """`n` 600 x 520 grey JPEGs: a ramp under noise, each brighter than the last (distinct films)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(600), np.arange(520)).astype(np.float32) / 5
    for i in range(n):
        pixels = (ramp + rng.normal(0, 20, ramp.shape) + 40 * i).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}ab.jpg", quality=90)


def test_the_ingest_benchmark_measures_films_from_any_folder(tmp_path):
    """`--real-dir` runs the real-film mode on JPEGs outside ../shared (the issue's check on other films): the
    copies ingest without a quarantined file (the benchmark checks it), every ratio is printed, and the folder it
    read is left as it was."""
    films = tmp_path / "archive" / "p10" / "s5001"  # not label folders: the benchmark assigns labels itself
    write_chest_like_jpegs(films)
    before = {file: file.read_bytes() for file in films.iterdir()}

    done = subprocess.run(
        [sys.executable, "benchmarks/ingest.py", "--real-dir", str(tmp_path / "archive"), "--copies", "24", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "24 files from 6 real films" in done.stdout
    assert "round 1: 1 worker" in done.stdout  # each round's ratios against the bare loops around each ingest
    ratios = dict(line.split("=") for line in done.stdout.splitlines() if line.startswith("real_") and "=" in line)
    for name in ("real_ingest_vs_bare_draft", "real_ingest_2_vs_1_workers", "real_cached_vs_cold",
                 "real_reingest_new_films_vs_cold", "real_bare_2_vs_1_processes", "real_bare_without_exif_vs_bare"):
        assert float(ratios[name]) > 0, done.stdout
    assert {file: file.read_bytes() for file in films.iterdir()} == before


def test_the_ingest_memory_benchmark_measures_the_cold_ingest_and_the_re_ingest_of_each_size_apart():
    """`--synthetic-large` runs `cxr ingest` cold, then again after 1% more films, for each size in one benchmark
    process: each run's peak RSS is its own process's (a real process's, not a zero), the re-ingest decodes only
    the new films (the rest come from the decode cache), and two sizes give the extrapolation to 200,000."""
    done = subprocess.run([sys.executable, "benchmarks/ingest.py", "--synthetic-large", "200", "400"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for n, added in ((200, 2), (400, 4)):
        assert f"decoded {n} films at" in done.stdout and f"decoded {added} films at" in done.stdout, done.stdout
        assert f"re-ingest with {added} new films:" in done.stdout, done.stdout
        found = re.search(rf"^large_peak_rss_mib=(\d+) large_reingest_peak_rss_mib=(\d+) n={n}$", done.stdout, re.MULTILINE)
        assert found and min(int(found[1]), int(found[2])) > 50, done.stdout  # pandas alone takes more
    assert "extrapolated from 200 and 400 films:" in done.stdout


def test_the_near_duplicate_benchmark_finds_the_same_pairs_as_comparing_every_pair():
    """It exits 1 when the band search and the every-pair scan disagree on a single pair; its last line is the
    speed-up (the real set joins when ../shared is present)."""
    done = subprocess.run([sys.executable, "benchmarks/near_duplicates.py", "--films", "3000", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("synthetic ") and line.endswith("same pairs") for line in lines), done.stdout
    assert re.fullmatch(r"close_pairs_vs_every_pair=\d+\.\d{2}", lines[-1]), lines[-1]


@pytest.mark.slow
def test_the_ingest_benchmark_times_the_flow_on_dask_against_the_process_pool(tmp_path):
    """`--dask` runs the ingest flow on a local Dask cluster and on Prefect's threads (each must decode every file
    cleanly, or the benchmark stops) on a quarter of the films and on all, and prints the whole flow's ratio per
    round and each path's per-core rate and fixed cost."""
    write_chest_like_jpegs(tmp_path / "archive")
    done = subprocess.run(
        [sys.executable, "benchmarks/ingest.py", "--real-dir", str(tmp_path / "archive"), "--copies", "24", "--repeats", "1",
         "--dask"], cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"Dask \(2 worker processes\) against Prefect's threads .*, 24 films, per round: \d+\.\d\dx$",
                     done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"per-core rate once running \(6 -> 24 films, medians\): Dask \d+ img/s, the pool \d+ img/s; "
                     r"fixed cost per ingest: Dask -?\d+\.\d s, the pool -?\d+\.\d s$", done.stdout, re.MULTILINE), done.stdout
    assert re.fullmatch(r"real_dask_vs_process_pool=\d+\.\d{2}", done.stdout.strip().splitlines()[-2]), done.stdout
    assert re.fullmatch(r"real_dask_per_core_vs_process_pool=-?\d+\.\d{2}", done.stdout.strip().splitlines()[-1]), done.stdout
