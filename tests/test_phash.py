"""Perceptual hashes: altered copies of a film stay within a few bits, different films do not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.phash import PAIR_BLOCK, close_pairs, hamming, phash

NEAR = 4  # the default validation.near_duplicate_distance


def films(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """`n` different smooth random images (8×8 blocks of grey between 40 and 200, so +-15 never clips)."""
    cells = np.random.default_rng(seed).integers(40, 200, (n, 8, 8)).astype(np.uint8)
    return np.kron(cells, np.ones((size // 8, size // 8), dtype=np.uint8))


def shifted(image: np.ndarray) -> np.ndarray:
    """One pixel to the right, the first column repeated."""
    out = image.copy()
    out[:, 1:] = image[:, :-1]
    return out


ALTERATIONS = {
    "brighter": lambda image: image + 15,
    "more contrast": lambda image: (128 + (image.astype(float) - 128) * 1.15).astype(np.uint8),
    "noise": lambda image: np.clip(image + np.random.default_rng(1).normal(0, 3, image.shape), 0, 255).astype(np.uint8),
}


@pytest.mark.parametrize("name", ALTERATIONS)
def test_altered_copy_stays_within_the_default_distance(name: str) -> None:
    images = films(200)
    altered = np.stack([ALTERATIONS[name](image) for image in images[:20]])

    hashes = phash(np.concatenate([images, altered]))

    assert hamming(hashes[:20], hashes[200:]).max() <= NEAR


def test_one_pixel_shift_is_near_at_256_px() -> None:
    """A 1-px shift is 0.4% of a 256-px film; at 28 px it is more change than between two similar films."""
    images = films(200, size=256)
    moved = np.stack([shifted(image) for image in images[:20]])

    hashes = phash(np.concatenate([images, moved]))

    assert hamming(hashes[:20], hashes[200:]).max() <= NEAR


def test_different_images_are_far_apart() -> None:
    hashes = phash(films(2000))

    assert len(close_pairs(hashes, NEAR)) == 0
    assert np.median(hamming(hashes[:1000], hashes[1000:])) >= 28  # about half of the 63 bits


def test_close_pairs_lists_each_pair_once_in_order() -> None:
    hashes = np.array([0b0000, 0b1111, 0b0001, 0b0000, 0b1110], dtype=np.uint64)

    pairs = close_pairs(hashes, 1)

    assert pairs.tolist() == [[0, 2], [0, 3], [1, 4], [2, 3]]
    assert close_pairs(hashes, 0).tolist() == [[0, 3]]


def test_hash_is_the_same_for_a_memory_mapped_store_and_any_chunking(tmp_path, monkeypatch) -> None:
    images = films(300)
    np.save(tmp_path / "images.npy", images)
    whole = phash(images)

    monkeypatch.setattr("pipeline.phash.CHUNK", 7)
    assert np.array_equal(phash(np.load(tmp_path / "images.npy", mmap_mode="r")), whole)


@pytest.mark.parametrize("size", [16, 28, 100])
def test_brighter_copy_is_near_at_any_stored_size(size: int) -> None:
    images = np.random.default_rng(0).integers(40, 200, (100, size, size)).astype(np.uint8)

    hashes = phash(np.concatenate([images, images[:5] + 15]))

    assert hashes.dtype == np.uint64
    assert hamming(hashes[:5], hashes[100:]).max() <= NEAR


def test_rejects_images_that_are_not_square() -> None:
    with pytest.raises(ValueError, match="square"):
        phash(np.zeros((3, 28, 30), dtype=np.uint8))


def test_close_pairs_finds_every_pair_across_block_boundaries() -> None:
    """Pairs whose films fall in different blocks of the search (PAIR_BLOCK rows at a time) are found too.

    How long the search takes is measured in benchmarks/near_duplicates.py, not here.
    """
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 3 * PAIR_BLOCK + 7, dtype=np.uint64)
    for i, j in ((0, PAIR_BLOCK + 1), (PAIR_BLOCK - 1, PAIR_BLOCK), (5, 3 * PAIR_BLOCK + 6)):
        hashes[j] = hashes[i] ^ np.uint64(0b101)  # two bits apart
    close = hamming(hashes[:, None], hashes[None, :]) <= NEAR
    expected = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(close, k=1))))
    assert sorted(map(tuple, close_pairs(hashes, NEAR).tolist())) == expected
    assert {(0, PAIR_BLOCK + 1), (PAIR_BLOCK - 1, PAIR_BLOCK), (5, 3 * PAIR_BLOCK + 6)} <= set(expected)


def test_close_pairs_compares_in_blocks_whose_memory_does_not_grow_with_the_set(monkeypatch) -> None:
    """At archive scale a block of PAIR_BLOCK rows against every hash is hundreds of MB (256 x 200,000 XORs): the
    block must shrink to PAIR_COMPARISONS, here made small so 4,096 hashes show it, and still find every pair."""
    import tracemalloc

    from pipeline import phash as module

    monkeypatch.setattr(module, "PAIR_COMPARISONS", 2**16)
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 2**63, 4096, dtype=np.uint64)
    hashes[4000] = hashes[7] ^ np.uint64(0b11)
    tracemalloc.start()
    try:
        pairs = close_pairs(hashes, NEAR)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB at once; 256 rows of 4,096 XORs alone are 8 MiB"
    assert [7, 4000] in pairs.tolist()
