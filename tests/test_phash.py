"""Perceptual hashes: altered copies of a film stay within a few bits, different films do not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.phash import HASH_BITS, PAIR_BLOCK, _bands, close_pairs, hamming, phash

NEAR = 4  # the default validation.near_duplicate_distance
WIDE = 8  # a distance close_pairs answers by its block scan (bands would keep under MIN_BAND_BITS)


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


def every_pair_within(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """The reference: every pair's distance in one matrix."""
    close = hamming(hashes[:, None], hashes[None, :]) <= max_distance
    return sorted((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(close, k=1))))


@pytest.mark.parametrize("max_distance", range(0, 7))
def test_close_pairs_by_bands_finds_exactly_the_pairs_every_comparison_finds(max_distance: int) -> None:
    """The band search must miss no pair the full comparison finds, at the edge of its pigeonhole: copies with
    max_distance bits flipped, each in a band of its own, so that exactly one band is left whole (each band in
    turn, the 64th bit's too), and copies one bit further (every band touched, not near); beside them a film
    copied 300 times (a phantom scanned daily: one value shared by many) and unrelated random hashes."""
    rng = np.random.default_rng(max_distance)
    bands = _bands(max_distance)
    assert sum(width for _, width in bands) == HASH_BITS and len(bands) == max_distance + 1
    hashes = [rng.integers(0, 2**64, 500, dtype=np.uint64, endpoint=False)]
    for whole in range(len(bands)):  # the one band left untouched
        for flips in (max_distance, max_distance + 1):
            base = rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)
            touched = [band for band in range(len(bands)) if band != whole][:flips] + ([whole] if flips > max_distance else [])
            copy = base
            for band in touched:
                shift, width = bands[band]
                copy ^= np.uint64(1 << (shift + width - 1))  # the band's top bit: for the last band, bit 63
            hashes.append(np.array([base, copy], dtype=np.uint64))
    hashes.append(np.full(300, rng.integers(0, 2**64, dtype=np.uint64, endpoint=False), dtype=np.uint64))
    hashes = np.concatenate(hashes)
    rng.shuffle(hashes)

    pairs = close_pairs(hashes, max_distance)

    expected = every_pair_within(hashes, max_distance)
    assert pairs.tolist() == [list(pair) for pair in expected]  # each pair once, sorted by i then j
    assert len(expected) >= 300 * 299 // 2 + len(bands)  # the phantom's pairs and one near copy per band at least


def test_close_pairs_finds_every_pair_across_block_boundaries() -> None:
    """At wide distances close_pairs compares every pair; pairs whose films fall in different blocks of that
    search (PAIR_BLOCK rows at a time) are found too.

    How long the search takes is measured in benchmarks/near_duplicates.py, not here.
    """
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 3 * PAIR_BLOCK + 7, dtype=np.uint64)
    for i, j in ((0, PAIR_BLOCK + 1), (PAIR_BLOCK - 1, PAIR_BLOCK), (5, 3 * PAIR_BLOCK + 6)):
        hashes[j] = hashes[i] ^ np.uint64(0b101)  # two bits apart
    expected = every_pair_within(hashes, WIDE)
    assert close_pairs(hashes, WIDE).tolist() == [list(pair) for pair in expected]
    assert {(0, PAIR_BLOCK + 1), (PAIR_BLOCK - 1, PAIR_BLOCK), (5, 3 * PAIR_BLOCK + 6)} <= set(expected)


@pytest.mark.parametrize("max_distance", [NEAR, WIDE])
def test_close_pairs_memory_does_not_grow_with_the_square_of_the_set(monkeypatch, max_distance: int) -> None:
    """At archive scale a block of PAIR_BLOCK rows against every hash is hundreds of MB (256 x 200,000 XORs): the
    block scan's block must shrink to PAIR_COMPARISONS, here made small so 4,096 hashes show it, and the band
    search holds a few arrays of one entry per film; both still find every pair."""
    import tracemalloc

    from pipeline import phash as module

    monkeypatch.setattr(module, "PAIR_COMPARISONS", 2**16)
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 2**63, 4096, dtype=np.uint64)
    hashes[4000] = hashes[7] ^ np.uint64(0b11)
    tracemalloc.start()
    try:
        pairs = close_pairs(hashes, max_distance)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB at once; 256 rows of 4,096 XORs alone are 8 MiB"
    assert [7, 4000] in pairs.tolist()
