"""Near-duplicate search benchmark: how long the data gate's pair search takes, against a one-shot baseline.

Why it exists: the gate compares every film's perceptual hash with every other's (pipeline.phash.close_pairs),
which grows with the square of the data. close_pairs compares a block of rows at a time to keep memory flat;
this benchmark checks that the blocking costs no speed: it times close_pairs and a baseline that compares
all pairs in one (N, N) matrix, on the same hashes, and checks both find the same pairs. Hashing the films
(pipeline.phash.phash) is timed too. The figures replace a timed unit test: speed is measured here, as a ratio
in one run, never asserted in the test suite.

Run it from the repository root:

    .venv/bin/python benchmarks/near_duplicates.py            # 6000 films of 64 px, best of 3
    .venv/bin/python benchmarks/near_duplicates.py --films 10000

Its last line is `close_pairs_vs_one_matrix=<x.xx>` (above 1: the blocked search is faster). The (N, N)
baseline needs 8·N² bytes; keep --films at 12000 or below on a machine with 2 GB to spare.
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
from pipeline.phash import close_pairs, hamming, phash  # noqa: E402

NEAR = 4  # validation.near_duplicate_distance's default


def one_matrix_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """The baseline: every pair's distance in one (N, N) matrix, then the upper triangle."""
    close = hamming(hashes[:, None], hashes[None, :]) <= max_distance
    i, j = np.nonzero(np.triu(close, k=1))
    return np.stack([i, j], axis=1)


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=6000, help="number of films (default 6000)")
    parser.add_argument("--size", type=int, default=64, help="stored film side in px (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    films = rng.integers(0, 256, (args.films, args.size, args.size), dtype=np.uint8)
    films[1::50] = np.clip(films[::50][: len(films[1::50])].astype(int) + 10, 0, 255)  # some brighter near-copies
    cpu, started = cpu_snapshot(), time.perf_counter()
    hash_s, hashes = best_of(args.repeats, lambda: phash(films))
    blocked_s, blocked = best_of(args.repeats, lambda: close_pairs(hashes, NEAR))
    matrix_s, matrix = best_of(args.repeats, lambda: one_matrix_pairs(hashes, NEAR))
    busy = others_cpu_s(cpu) / ((time.perf_counter() - started) * (os.cpu_count() or 1))

    same = sorted(map(tuple, blocked.tolist())) == sorted(map(tuple, matrix.tolist()))
    print(f"{args.films} films of {args.size} px: hashing {hash_s:.3f} s ({args.films / hash_s:,.0f} films/s)")
    print(f"pairs within {NEAR} bits: {len(blocked)} (one-matrix baseline finds the same: {same})")
    print(f"close_pairs {blocked_s:.3f} s, one matrix {matrix_s:.3f} s")
    if busy > BUSY_WARNING:
        print(f"warning: other processes took about {busy:.0%} of the CPU while timing; the figures are unreliable")
    print(f"close_pairs_vs_one_matrix={matrix_s / blocked_s:.2f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
