"""Near-duplicate search benchmark: how long the pair search takes, against comparing every pair.

Why it exists: ingest (near-duplicate grouping into pseudo-patients), the data gate and the label audit all ask
pipeline.phash.close_pairs for every pair of films whose perceptual hashes differ in a few bits. Comparing every
pair grows with the square of the archive: a second for 10,000 films, over two minutes for 200,000, about eight
for MIMIC-CXR's 377,000, paid on each ingest and each gate. close_pairs searches by hash bands instead (see its
docstring). This benchmark times it against the every-pair block scan (pipeline.phash._block_scan, what
close_pairs did before and still does for wide distances) on the same hashes, checks that both find the same
pairs, and times the hashing too. The figures replace a timed unit test: speed is measured here, as a ratio in
one run, never asserted in the test suite.

Two sets of hashes, because the band search's speed depends on how evenly films spread over a band's values:
  synthetic  --films random films (some with brighter copies): hashes near uniform, the band search's best case;
  real       the PneumoniaMNIST chest films of ../shared/data (5,232, with brighter copies of every tenth),
             replicated with a few random bits flipped up to --films: chest films share one layout, so their
             hashes crowd some band values (about 6 times uniform); skipped with a note when ../shared is absent.

Run it from the repository root:

    .venv/bin/python benchmarks/near_duplicates.py                 # 20,000 films of 64 px, best of 3
    .venv/bin/python benchmarks/near_duplicates.py --films 200000 --repeats 1

Its last line is `close_pairs_vs_every_pair=<x.xx>` (the smaller of the two sets' speed-ups; above 1: the band
search is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import BUSY_WARNING, cpu_snapshot, others_cpu_s  # noqa: E402
from pipeline.phash import _block_scan, close_pairs, phash  # noqa: E402

NEAR = 4  # validation.near_duplicate_distance's default
PNEUMONIAMNIST = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
REAL_FLIPS = 3  # bits flipped in each replica of a real film's hash: films alike, not copies of each other


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def synthetic_hashes(films: int, size: int, repeats: int) -> tuple[np.ndarray, str]:
    """Hashes of `films` random films, every fiftieth a brighter copy of another; and the hashing's figures."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (films, size, size), dtype=np.uint8)
    images[1::50] = np.clip(images[::50][: len(images[1::50])].astype(int) + 10, 0, 255)
    seconds, hashes = best_of(repeats, lambda: phash(images))
    return hashes, f"hashing {seconds:.3f} s ({films / seconds:,.0f} films/s of {size} px)"


def real_hashes(films: int) -> np.ndarray:
    """The hashes of PneumoniaMNIST's chest films and brighter copies of every tenth, replicated up to `films` with
    REAL_FLIPS random bits flipped in each replica (a larger archive of films laid out like these)."""
    data = np.load(PNEUMONIAMNIST)
    images = np.concatenate([data["train_images"], data["val_images"]])
    images = np.concatenate([images, np.clip(images[::10].astype(int) + 15, 0, 255).astype(np.uint8)])
    hashes = phash(images)
    rng = np.random.default_rng(1)
    replicas = hashes[rng.integers(0, len(hashes), max(0, films - len(hashes)))]
    for _ in range(REAL_FLIPS):
        replicas ^= np.left_shift(np.uint64(1), rng.integers(0, 63, len(replicas)).astype(np.uint64))
    return np.concatenate([hashes, replicas])[:films]


def compare(name: str, hashes: np.ndarray, repeats: int) -> float:
    """Time close_pairs and the every-pair scan on `hashes`, print a line, and return the speed-up (exit 1 when the
    two disagree on a single pair)."""
    bands_s, bands = best_of(repeats, lambda: close_pairs(hashes, NEAR))
    every_s, every = best_of(repeats, lambda: _block_scan(hashes, NEAR))
    same = np.array_equal(bands, every)
    print(f"{name:<10} {len(hashes):>9,} {len(bands):>8,} {bands_s:>10.3f} {every_s:>12.3f} {every_s / bands_s:>9.1f}x"
          f"  {'same pairs' if same else 'DIFFERENT PAIRS'}")
    if not same:
        sys.exit(1)
    return every_s / bands_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=20_000, help="films per set (default 20,000)")
    parser.add_argument("--size", type=int, default=64, help="synthetic films' side in px (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()

    cpu, started = cpu_snapshot(), time.perf_counter()
    synthetic, hashing = synthetic_hashes(args.films, args.size, args.repeats)
    print(f"pairs within {NEAR} bits, close_pairs (hash bands) against comparing every pair; {hashing}")
    print(f"{'set':<10} {'films':>9} {'pairs':>8} {'bands (s)':>10} {'every pair (s)':>12} {'speed-up':>10}")
    speedups = [compare("synthetic", synthetic, args.repeats)]
    if PNEUMONIAMNIST.is_file():
        speedups.append(compare("real", real_hashes(args.films), args.repeats))
    else:
        print(f"real: skipped, {PNEUMONIAMNIST} is absent (the shared data folder is not beside the repository)")
    busy = others_cpu_s(cpu) / ((time.perf_counter() - started) * (os.cpu_count() or 1))
    if busy > BUSY_WARNING:
        print(f"warning: other processes took about {busy:.0%} of the CPU while timing; the figures are unreliable")
    print(f"close_pairs_vs_every_pair={min(speedups):.2f}")


if __name__ == "__main__":
    main()
