"""Perceptual hashes of stored images, to find near-duplicate films that sha256 cannot see.

A DCT hash (pHash) of 63 bits: average each image down to 32×32, keep its 8×8 lowest DCT frequencies without
the DC term, scale them to unit length, and set a bit where a coefficient is above that coefficient's median
over the whole set. Brightness moves only the DC term, contrast only the length, and noise or a shift by
under 1% of the side barely move the lowest frequencies, so a re-saved or re-windowed film keeps its bits.

Why the set's median and not the image's own (the classic pHash): chest films share one layout, so
image-relative bits mostly say "a chest" and unrelated films collide (on PneumoniaMNIST, 207 pairs of
different films within 4 bits, against 4 with the set's median). The hashes are therefore only comparable
within one call; with fewer than a few dozen images the median is a poor reference and pairs are missed.

Why 4 bits (validation.near_duplicate_distance): on PneumoniaMNIST (5,232 films, 13.5 million pairs) and the
demo set, a copy with noise (sigma 3 grey levels), +15 brightness or 15% more contrast stays within 4 bits in
98-100% of cases (86% for contrast on the demo set), while only 4 pairs of different PneumoniaMNIST films fall
within 4 bits (within 6: 69) and none of the demo set. A 1-px shift of a 28-px film is not caught (about 10
bits): it changes the film more than the two most alike different films differ, so no distance separates them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

HASH_SIDE = 32  # the classic pHash works on a 32×32 thumbnail ...
LOW_FREQUENCIES = 8  # ... and keeps its 8×8 lowest frequencies (63 bits without the DC term)
CHUNK = 256  # images converted to float at a time: a large memory-mapped store is never read at once, and the
# 4 MB of floats is memory the allocator hands back chunk after chunk, where 16 MB (1,024 films) came fresh from the
# kernel each time, its pages faulted in one by one (three times the arithmetic at 2,000 films on this VM)
HASH_BITS = 64  # close_pairs takes any uint64 (a phash uses the low 63 bits)
MIN_BAND_BITS = 9  # close_pairs searches by bands when each keeps this many bits (distances up to 6), ...
PAIR_BLOCK = 256  # ... else compares a block of hashes with all the others at a time ...
PAIR_COMPARISONS = 2**22  # ... or fewer, so a block's comparisons stay under this (32 MB of XORs) for any archive


def phash(images: np.ndarray) -> np.ndarray:
    """One uint64 hash per image of a (N, S, S) uint8 array, relative to the whole array (see the module)."""
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images shaped (N, S, S), got {images.shape}")
    return _bits(_low_frequencies(images))


def phash_batches(batches: Iterable[np.ndarray]) -> np.ndarray:
    """phash of the images of all `batches` as one set, holding only their 63 coefficients each (250 bytes), not
    their pixels: ingest reads an archive's films back from disk in batches."""
    low = [_low_frequencies(batch) for batch in batches if len(batch)]
    return _bits(np.concatenate(low)) if low else np.empty(0, dtype=np.uint64)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    """One uint64 per row: a bit set where a coefficient is above its median over the set (see the module)."""
    if len(coefficients) == 0:
        return np.empty(0, dtype=np.uint64)
    bits = coefficients > np.median(coefficients, axis=0)
    padded = np.concatenate([np.zeros((len(bits), 64 - bits.shape[1]), dtype=bool), bits], axis=1)
    return np.packbits(padded, axis=1).view(">u8").ravel().astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many bits differ between hashes (broadcasts like numpy)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def close_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, whose hashes differ in at most `max_distance` bits, as an (M, 2) int array sorted
    by i, then j.

    Why not compare every pair: that grows with the square of the archive (10,000 films, 50 million comparisons,
    about a second; MIMIC-CXR's 377,000 films, 71 billion, minutes per ingest and per data gate). Cut the hash's
    64 bits into max_distance + 1 bands: two hashes differing in at most max_distance bits differ in at most that
    many bands, so they agree on one whole band at least (the pigeonhole principle; multi-index hashing). Only
    films that share a band's value are compared, which finds exactly the pairs the full comparison finds. When
    the bands are narrower than MIN_BAND_BITS (a distance above 6), most films share each band's value and the
    block scan compares every pair instead.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        return np.empty((0, 2), dtype=np.int64)
    bands = _bands(max_distance)
    if min(width for _, width in bands) < MIN_BAND_BITS:
        return _block_scan(hashes, max_distance)
    return _band_search(hashes, max_distance, bands)


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of max_distance + 1 bands of adjacent bits covering all 64, as even as they can be."""
    edges = [round(i * HASH_BITS / (max_distance + 1)) for i in range(max_distance + 2)]
    return [(start, stop - start) for start, stop in zip(edges, edges[1:])]


def _band_search(hashes: np.ndarray, max_distance: int, bands: list[tuple[int, int]]) -> np.ndarray:
    """close_pairs by bands (see there). For each band, the films are sorted by the band's value; within each run of
    equal values, every film is compared with the one k places further on, for k = 1, 2, ... while the run lasts,
    so the work is the number of pairs sharing a value (plus a numpy step per k), never all pairs. A pair sharing
    several bands' values is kept only at the first of them."""
    n = len(hashes)
    masks = [np.uint64(((1 << width) - 1) << shift) for shift, width in bands]
    found = [np.empty((0, 2), dtype=np.int64)]
    for band, mask in enumerate(masks):
        values = hashes & mask
        order = np.argsort(values, kind="stable")  # stable: within a run, films in index order, so i < j below
        ordered = values[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        run_end = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))  # per sorted place, where its run ends
        step, place = 1, np.flatnonzero(run_end - np.arange(n) > 1)  # sorted places with a film `step` further on
        while len(place):
            i, j = order[place], order[place + step]
            differ = hashes[i] ^ hashes[j]
            keep = np.bitwise_count(differ) <= max_distance
            for earlier in masks[:band]:
                keep &= (differ & earlier) != 0
            found.append(np.stack([i[keep], j[keep]], axis=1))
            step += 1
            place = place[run_end[place] - place > step]
    pairs = np.concatenate(found)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _block_scan(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """close_pairs by comparing every pair, a block of rows at a time: the block shrinks as the set grows
    (PAIR_COMPARISONS), since 256 rows of 200,000 hashes would be 400 MB of XORs at once."""
    found = [np.empty((0, 2), dtype=np.int64)]
    rows_per_block = max(1, min(PAIR_BLOCK, PAIR_COMPARISONS // max(len(hashes), 1)))
    for start in range(0, len(hashes), rows_per_block):
        block = hashes[start:start + rows_per_block]
        rows, later = np.nonzero(hamming(block[:, None], hashes[None, start + 1:]) <= max_distance)
        i, j = start + rows, start + 1 + later
        found.append(np.stack([i[i < j], j[i < j]], axis=1))
    return np.concatenate(found)


def _low_frequencies(images: np.ndarray) -> np.ndarray:
    """(N, 63) lowest DCT frequencies of each image's 32×32 thumbnail, without DC, scaled to unit length."""
    side, k = images.shape[1], LOW_FREQUENCIES
    # Resizing to 32×32 and taking the DCT are both linear: one (8, S) matrix does both, applied to rows then columns.
    project_t = (_dct_matrix(HASH_SIDE)[:k] @ _area_matrix(side, HASH_SIDE)).T.astype(np.float32)
    out = np.empty((len(images), k * k - 1), dtype=np.float32)
    for start in range(0, len(images), CHUNK):
        chunk = np.asarray(images[start:start + CHUNK], dtype=np.float32)
        n = len(chunk)
        rows = (chunk.reshape(n * side, side) @ project_t).reshape(n, side, k)
        # The 8×8 block comes out transposed (the same frequencies in another order); [:, 1:] drops DC either way.
        low = (rows.transpose(0, 2, 1).reshape(n * k, side) @ project_t).reshape(n, k * k)[:, 1:]
        out[start:start + n] = low / np.maximum(np.linalg.norm(low, axis=1, keepdims=True), 1e-6)
    return out


def _area_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights that average source pixels into target cells by their overlap (a box resize)."""
    edges = np.linspace(0, source, target + 1)
    pixel = np.arange(source)
    overlap = np.clip(np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is frequency k."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    basis[0] /= np.sqrt(2)
    return basis
