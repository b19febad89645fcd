"""The decode cache, parallel decoding and de-duplication, on the demo set's real files."""

import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.demo_data import write_demo_data
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths


def _project(root, *overrides):
    params = root / "params.yaml"
    params.write_text("data:\n  image_size: 32\n")
    return ProjectPaths(root), load_config(params, list(overrides))


def _outputs(paths):
    return paths.manifest.read_bytes(), paths.images.read_bytes(), paths.quarantine.read_bytes()


def test_reingest_after_adding_files_decodes_only_the_new_ones(tmp_path):
    write_demo_data(tmp_path / "full", n=66, seed=3, size=64)
    films = sorted(p for p in (tmp_path / "full").rglob("*") if p.is_file() and p.parent.name in ("normal", "pneumonia"))
    new = films[::10]  # about 10 %
    source = tmp_path / "data" / "raw" / "films"
    for film in films:
        if film not in new:
            target = source / film.relative_to(tmp_path / "full")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(film, target)
    paths, config = _project(tmp_path, "data.sources=[data/raw/films]", "data.num_workers=1")

    first = ingest_stage(paths, config)
    for film in new:
        shutil.copy2(film, source / film.relative_to(tmp_path / "full"))
    second = ingest_stage(paths, config)
    third = ingest_stage(paths, config)

    assert first.n_decoded == len(films) - len(new)
    assert second.n_decoded == len(new)
    assert third.n_decoded == 0
    cached = _outputs(paths)
    shutil.rmtree(paths.decode_cache)
    ingest_stage(paths, config)
    assert _outputs(paths) == cached  # served from the cache or decoded afresh: the same bytes


def test_two_workers_give_the_same_outputs_as_one(tmp_path):
    write_demo_data(tmp_path / "data" / "raw" / "demo", n=40, seed=4, size=64)
    paths, config = _project(tmp_path, "data.sources=[data/raw/demo]", "data.num_workers=1")
    ingest_stage(paths, config)
    single = _outputs(paths)
    shutil.rmtree(paths.decode_cache)
    paths, config = _project(tmp_path, "data.sources=[data/raw/demo]", "data.num_workers=2")
    result = ingest_stage(paths, config)
    assert result.n_decoded > 0 and _outputs(paths) == single


def test_dedupe_drop_keeps_one_copy_and_prefers_the_train_copy(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    val = images[:6].copy()
    val[0] = images[6]  # a train film repeated in val (cross-split)
    train = images[6:].copy()
    train[1] = train[2]  # a copy within train
    labels = (np.arange(6) % 2).reshape(-1, 1)
    np.savez(tmp_path / "dups.npz", train_images=np.concatenate([train, images[:2] + 1]), train_labels=np.concatenate([labels, [[0], [1]]]),
             val_images=val, val_labels=labels, test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=np.array([[0], [1], [0], [1]]))

    paths, config = _project(tmp_path, "data.sources=[dups.npz]", "data.dedupe=report")
    kept_all = ingest_stage(paths, config)
    paths, config = _project(tmp_path, "data.sources=[dups.npz]")
    dropped = ingest_stage(paths, config)

    assert kept_all.n_images == 18 and kept_all.n_dropped_duplicates == 0
    assert dropped.n_dropped_duplicates == 2 and dropped.n_images == 16
    removed = pd.read_csv(paths.dropped_duplicates)
    assert sorted(removed["split"]) == ["train", "val"]
    assert removed.loc[removed["split"] == "val", "path"].tolist() == ["val/0"]  # the train copy survived
    manifest = pd.read_parquet(paths.manifest)
    assert not manifest["sha256"].duplicated().any()
    assert np.load(paths.images).shape[0] == len(manifest)


def test_byte_identical_files_are_decoded_once_and_reingest_works(tmp_path):
    write_demo_data(tmp_path / "data" / "raw" / "demo", n=30, seed=6, size=64)
    films = sorted((tmp_path / "data" / "raw" / "demo" / "pneumonia").glob("*.png"))
    shutil.copy2(films[0], films[0].with_name("copy_of_" + films[0].name))
    paths, config = _project(tmp_path, "data.sources=[data/raw/demo]", "data.num_workers=1", "data.dedupe=report")

    first = ingest_stage(paths, config)
    shutil.copy2(films[1], films[1].with_name("copy_of_" + films[1].name))  # a byte copy added after the first ingest
    second = ingest_stage(paths, config)
    third = ingest_stage(paths, config)

    # Into an empty cache each file is read once, hashed as it is decoded, so both copies are decoded (30 films, the
    # copy and 3 broken files), and the cache keeps one.
    assert first.n_decoded == 34 and first.n_images == 31
    # With films in the cache, new files are hashed first: the new byte copy is served from the cache.
    assert second.n_decoded == 0 and second.n_images == 32
    assert third.n_decoded == 0 and third.n_images == 32
    assert len(pd.read_parquet(next(paths.decode_cache.glob("decoded-*")) / "index.parquet")) == 30


def _cold_and_cached(tmp_path):
    """A project ingested cold; its outputs' bytes; and the decode cache folder."""
    write_demo_data(tmp_path / "data" / "raw" / "demo", n=30, seed=8, size=64)
    paths, config = _project(tmp_path, "data.sources=[data/raw/demo]", "data.num_workers=1")
    cold = ingest_stage(paths, config)
    folder = next(paths.decode_cache.glob("decoded-*"))
    return paths, config, cold, _outputs(paths), folder


def _reingest_from_the_cache(paths, config):
    """Re-ingest with the outputs gone, so that every film is served by the decode cache (or decoded again)."""
    for output in (paths.manifest, paths.images, paths.quarantine):
        output.unlink()
    return ingest_stage(paths, config)


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


def test_a_truncated_shard_is_decoded_again_with_a_warning(tmp_path, caplog):
    paths, config, cold, written, folder = _cold_and_cached(tmp_path)
    (shard,) = folder.glob("shard-*.npy")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    again = _reingest_from_the_cache(paths, config)

    assert _outputs(paths) == written
    assert again.n_decoded == cold.n_images  # the shard's films; the quarantined files' failures were still cached
    assert any(f"shard {shard.name} is missing, truncated or unreadable" in message for message in _warnings(caplog))
    caplog.clear()
    healed = _reingest_from_the_cache(paths, config)
    assert healed.n_decoded == 0 and _outputs(paths) == written and not _warnings(caplog)


def test_a_shard_cut_short_while_the_cache_reads_it_is_decoded_again_never_a_crash(tmp_path, caplog):
    """A shard truncated after the cache opened it: the films past the cut are decoded again with a warning, the
    ones before it still served. Read through a memory map, a page past the file's new end raised SIGBUS and killed
    the run."""
    from pipeline.decode_cache import DecodeCache, Decoded

    films = [(f"key-{i}", Decoded(np.full((64, 64), i, dtype=np.uint8), {"format": "png", "sha256": str(i)}))
             for i in range(4)]
    DecodeCache(tmp_path).add(films)
    cache = DecodeCache(tmp_path)
    assert (cache.get("key-0").pixels == 0).all()  # the shard is open
    (shard,) = tmp_path.glob("shard-*.npy")
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size - 64 * 64 - 10)  # the last film, and the end of the one before

    assert (cache.get("key-1").pixels == 1).all()
    assert cache.get("key-2") is None and cache.get("key-3") is None
    assert sum("could not be read from" in message for message in _warnings(caplog)) == 2
    reopened = DecodeCache(tmp_path)  # its header still declares four films: refused whole, as between runs
    assert reopened.get("key-0") is None and reopened.get("key-1") is None


def test_a_garbled_index_is_rebuilt_with_a_warning(tmp_path, caplog):
    paths, config, cold, written, folder = _cold_and_cached(tmp_path)
    index = folder / "index.parquet"
    garbled = bytearray(index.read_bytes())
    garbled[len(garbled) // 3 : len(garbled) // 3 + 64] = b"\xff" * 64
    index.write_bytes(bytes(garbled))

    again = _reingest_from_the_cache(paths, config)

    assert _outputs(paths) == written
    assert again.n_decoded == cold.n_images
    assert any("index.parquet is unreadable" in message for message in _warnings(caplog))
    assert len(list(folder.glob("shard-*.npy"))) == 1  # the old shard went with its index


def test_a_damaged_film_in_a_shard_is_never_served(tmp_path, caplog):
    """Bytes changed inside a shard (same size, loads fine): the film's checksum catches it and it is decoded again."""
    paths, config, cold, written, folder = _cold_and_cached(tmp_path)
    (shard,) = folder.glob("shard-*.npy")
    damaged = bytearray(shard.read_bytes())
    damaged[-100:] = bytes(255 - b for b in damaged[-100:])  # the last film's last pixels
    shard.write_bytes(bytes(damaged))

    again = _reingest_from_the_cache(paths, config)

    assert _outputs(paths) == written
    assert again.n_decoded == 1
    assert any("does not match its checksum" in message for message in _warnings(caplog))


def test_two_writers_never_write_the_same_shard(tmp_path):
    """Two writers that read the cache before either wrote (the project lock bypassed): each keeps its own films."""
    from pipeline.decode_cache import DecodeCache, Decoded

    def film(value: int) -> Decoded:
        return Decoded(np.full((4, 4), value, dtype=np.uint8), {"format": "png", "sha256": str(value)})

    first, second = DecodeCache(tmp_path), DecodeCache(tmp_path)
    first.add([("key-a", film(1))])
    second.add([("key-b", film(2))])

    assert len(list(tmp_path.glob("shard-*.npy"))) == 2
    assert (first.get("key-a").pixels == 1).all()
    assert (second.get("key-b").pixels == 2).all()


def test_a_key_leading_to_another_films_row_is_never_served(tmp_path):
    """The checksum made as a shard is written ties each row to its own key: an index whose keys were swapped
    (each key leading to the other film's row, fields and checksum, all intact) serves neither: decoded again."""
    from pipeline.decode_cache import DecodeCache, Decoded

    def film(value: int) -> Decoded:
        return Decoded(np.full((4, 4), value, dtype=np.uint8), {"format": "png", "sha256": str(value)})

    DecodeCache(tmp_path).add([("key-a", film(1)), ("key-b", film(2)), ("key-c", film(3))])
    index_path = tmp_path / "index.parquet"
    index = pd.read_parquet(index_path)
    assert DecodeCache(tmp_path).get("key-b") is not None  # intact, it is served
    a, b = index.index[index["file_key"] == "key-a"][0], index.index[index["file_key"] == "key-b"][0]
    index.loc[[a, b], "file_key"] = ["key-b", "key-a"]
    index.to_parquet(index_path, index=False)

    swapped = DecodeCache(tmp_path)
    assert swapped.get("key-a") is None and swapped.get("key-b") is None
    assert (swapped.get("key-c").pixels == 3).all()  # the rows around them still serve their own films


def test_a_new_shard_never_takes_the_name_of_an_existing_one(tmp_path):
    """Named after their count, a shard written after another went missing took the name of a live one."""
    from pipeline.decode_cache import DecodeCache, Decoded

    def film(value: int) -> Decoded:
        return Decoded(np.full((4, 4), value, dtype=np.uint8), {"format": "png", "sha256": str(value)})

    cache = DecodeCache(tmp_path)
    cache.add([("key-a", film(1))])
    (first_shard,) = tmp_path.glob("shard-*.npy")
    cache.add([("key-b", film(2))])
    first_shard.unlink()
    cache.add([("key-c", film(3))])

    reopened = DecodeCache(tmp_path)
    assert (reopened.get("key-b").pixels == 2).all()
    assert (reopened.get("key-c").pixels == 3).all()


def test_a_cold_ingest_reads_each_film_once_and_the_next_ingest_reads_none(tmp_path):
    """Hash while reading: into an empty decode cache, each film file is opened once (the decoder hashes the bytes
    it decodes), not once to hash it and again to decode it; the hashes it learned spare the next ingest reading
    any film (outputs deleted, so it really runs, served by the decode cache). Counted with a real audit hook."""
    import sys

    import time

    from pipeline.stat_cache import RACY_NS

    write_demo_data(tmp_path / "data" / "raw" / "demo", n=12, seed=4, size=64)
    time.sleep(RACY_NS / 1e9 + 0.1)  # a hash taken in the same timestamp tick as the file's last change is not kept
    root = tmp_path / "data" / "raw" / "demo"
    films = {str(p) for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".jpeg", ".dcm")}
    paths, config = _project(tmp_path, "data.sources=[data/raw/demo]", "data.num_workers=1")  # decoded in this process
    opened: list[str] = []
    counting = [True]

    def count(event, args):
        if counting[0] and event == "open" and isinstance(args[0], (str, bytes)) and str(args[0]) in films:
            opened.append(str(args[0]))

    sys.addaudithook(count)  # cannot be removed: switched off below
    try:
        cold = ingest_stage(paths, config)
        cold_opens = list(opened)
        written = _outputs(paths)
        opened.clear()
        again = _reingest_from_the_cache(paths, config)
    finally:
        counting[0] = False

    assert cold.n_decoded >= 12
    per_file = pd.Series(cold_opens).value_counts()
    assert len(per_file) >= 12 and per_file.max() == 1, per_file[per_file > 1]
    # Only DICOM headers, and quarantined files' for a header identity, are read again (identities are never cached).
    assert again.n_decoded == 0 and {f for f in opened if not f.endswith(".dcm") and "/broken_" not in f} == set()
    assert _outputs(paths) == written


def test_streamed_npy_rows_are_the_bytes_np_save_writes_and_a_short_stream_is_refused(tmp_path):
    """images.npy and the cache shards are written a film at a time (never stacked): the file must still be the
    exact .npy np.save makes (readers, DVC hashes and byte-for-byte test comparisons depend on it), its digest the
    blake2b of the stacked bytes (a shard's name), and a stream with fewer rows than declared must not pass."""
    import hashlib
    import io

    from pipeline.files import write_npy_rows

    films = [np.random.default_rng(seed).integers(0, 256, (7, 7), dtype=np.uint8) for seed in range(5)]
    expected = io.BytesIO()
    np.save(expected, np.stack(films))
    streamed, digest = io.BytesIO(), hashlib.blake2b(digest_size=16)
    write_npy_rows(streamed, iter(films), (5, 7, 7), digest)
    assert streamed.getvalue() == expected.getvalue()
    assert digest.hexdigest() == hashlib.blake2b(np.stack(films).tobytes(), digest_size=16).hexdigest()
    with pytest.raises(ValueError, match="4 rows written, 5 declared"):
        write_npy_rows(io.BytesIO(), films[:4], (5, 7, 7))
    with pytest.raises(ValueError, match=r"row 1 has shape \(6, 7\)"):
        write_npy_rows(io.BytesIO(), [films[0], films[1][:6]], (2, 7, 7))


def test_the_pixel_spool_gives_back_each_film_by_its_row_and_refuses_a_wrong_shape(tmp_path):
    """Decoded films wait in a spool file from decoding until images.npy is written: each outcome's SpooledFilm must
    read back as its own film (in any order, between writes), travel pickled as the array, and failures and films
    a spool already holds pass through unspooled."""
    import pickle

    from pipeline.decode_cache import Decoded, Failure
    from pipeline.ingest import PixelSpool, SpooledFilm

    films = [np.full((4, 4), value, dtype=np.uint8) for value in (10, 20, 30)]
    with PixelSpool(tmp_path, 4) as spool:
        kept = [spool.keep(Decoded(film, {})) for film in films[:2]]
        assert np.asarray(kept[1].pixels)[0, 0] == 20  # read between writes: the next write still appends
        kept.append(spool.keep(Decoded(films[2], {})))
        failure = Failure("blank_image", "{file}: blank")
        assert spool.keep(failure) is failure and spool.keep(kept[0]) is kept[0]
        assert all(isinstance(outcome.pixels, SpooledFilm) for outcome in kept) and spool.count == 3
        assert [np.asarray(outcome.pixels)[0, 0] for outcome in reversed(kept)] == [30, 20, 10]
        assert np.array_equal(np.stack([outcome.pixels for outcome in kept]), np.stack(films))
        travelled = pickle.loads(pickle.dumps(kept[2]))
        assert type(travelled.pixels) is np.ndarray and np.array_equal(travelled.pixels, films[2])
        with pytest.raises(IndexError, match="row 3 of a spool of 3 films"):
            spool.film(3)
        with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
            spool.keep(Decoded(np.zeros((5, 5), dtype=np.uint8), {}))
    assert not list(tmp_path.iterdir())  # an anonymous file: nothing left beside the outputs


def test_the_spool_reads_back_every_film_across_its_buffer_whatever_the_order_of_reads_and_writes(tmp_path):
    """The spool's file is buffered a MiB at a time (films written and read back in order take a system call per
    MiB): films that straddle a buffer's edge, read back in order, out of order and between writes, must each be
    their own film, and a write after a read must still append."""
    from pipeline.decode_cache import Decoded
    from pipeline.files import FILM_BUFFER_BYTES
    from pipeline.ingest import PixelSpool

    size = 60  # 3,600 bytes a film: no buffer holds a whole number of them
    count = 3 * FILM_BUFFER_BYTES // (size * size) + 7
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(count)]
    with PixelSpool(tmp_path, size) as spool:
        kept = []
        for row, film in enumerate(films):
            kept.append(spool.keep(Decoded(film, {})).pixels)
            if row % 97 == 0:  # a read between writes, of a film already flushed or still in the buffer
                earlier = int(rng.integers(0, row + 1))
                assert np.array_equal(np.asarray(kept[earlier]), films[earlier])
        for row in [*range(count), *rng.permutation(count)]:
            assert np.array_equal(np.asarray(kept[row]), films[row]), f"row {row}"
        more = spool.keep(Decoded(films[0][::-1].copy(), {})).pixels  # after reads: appended, not written over
        assert spool.count == count + 1 and np.array_equal(np.asarray(more), films[0][::-1])
        assert np.array_equal(np.asarray(kept[-1]), films[-1])


def test_perceptual_hashes_of_spooled_films_read_back_in_batches_are_the_one_set_hashes(tmp_path, monkeypatch):
    """Near-duplicate grouping hashes the films of an ingest as one set, read back from the spool PHASH_BATCH at a
    time: batches cut anywhere (here every 3 films, spooled films and plain arrays mixed) must give the hashes of
    the whole set stacked at once, no film lost, repeated or moved at a batch boundary."""
    from pipeline.decode_cache import Decoded
    from pipeline.ingest import PixelSpool, _perceptual_hashes
    from pipeline.phash import phash

    monkeypatch.setattr("pipeline.ingest.PHASH_BATCH", 3)
    rng = np.random.default_rng(7)
    films = [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(11)]
    with PixelSpool(tmp_path, 16) as spool:
        spooled = [spool.keep(Decoded(film, {})).pixels for film in films[:7]]
        hashes = _perceptual_hashes([*spooled, *films[7:]])
    expected = phash(np.stack(films))
    assert len(set(expected.tolist())) == len(films)  # distinct hashes: a film moved or repeated would show
    assert np.array_equal(hashes, expected)


def _ingest_peak_traced_bytes(folder, n: int, size: int) -> int:
    """Peak memory Python and numpy allocated (tracemalloc) during a cold ingest of `n` distinct PNG films stored at
    `size` px, with one decode process (the decoding happens in this one, traced too)."""
    import tracemalloc

    from PIL import Image

    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    rng = np.random.default_rng(n)
    for i in range(n):
        (folder / "films" / ("normal", "pneumonia")[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(
            folder / "films" / ("normal", "pneumonia")[i % 2] / f"film{i:04d}.png")
    (folder / "params.yaml").write_text(f"data:\n  image_size: {size}\n")
    # Near-duplicate grouping reads the films back in batches of a bounded size; off, so only the store's path counts.
    config = load_config(folder / "params.yaml", [f"data.sources=[{folder / 'films'}]", "data.num_workers=1",
                                                  "data.group_near_duplicates=false"])
    tracemalloc.start()
    try:
        result = ingest_stage(ProjectPaths(folder), config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.n_images == n
    return peak


def test_a_cold_ingest_never_holds_the_archives_pixels_in_memory(tmp_path):
    """Memory must stay flat in the number of films as far as pixels go: decoded films wait on disk (a spool) until
    images.npy is written, never in one block of count x size x size nor as one array each. Four times the films
    may cost more for their rows (fields, manifest rows: about 2 KB a film), never their pixels: 120 more films of
    256 px are 7.5 MiB (the block the decoded films were once packed into grew the peak by 7.7 MiB)."""
    from pipeline.paths import ProjectPaths

    size, small, large = 256, 40, 160
    _ingest_peak_traced_bytes(tmp_path / "warm-up", 10, size)  # modules imported and caches filled on the way: not counted
    grown = (_ingest_peak_traced_bytes(tmp_path / "large", large, size)
             - _ingest_peak_traced_bytes(tmp_path / "small", small, size))
    pixels = (large - small) * size * size
    assert grown < pixels / 8, f"peak grew {grown / 2**10:.0f} KiB for {pixels / 2**10:.0f} KiB more pixels"
    assert np.load(ProjectPaths(tmp_path / "large").images, mmap_mode="r").shape == (large, size, size)


def test_an_image_id_that_looks_like_a_number_is_read_back_as_the_id(tmp_path, monkeypatch):
    """image_id is a keyed hash in hex: under about one key in 700 a film's id reads as a number ('123456e789012345'
    is a float to pandas, '0123456789012345' an int). A key that does this to the one dropped copy: the dropped
    list, the data gate that reads it and the predictions reader still give the id as written (CI's random key
    once turned a copy's id into a float, and the film seemed lost)."""
    import re

    from pipeline.deid import load_key
    from pipeline.files import read_text_csv
    from pipeline.ingest import image_id_of
    from pipeline.predictions import load_predictions, write_predictions
    from pipeline.sources import read_source
    from pipeline.validate import validate_stage

    rng = np.random.default_rng(1)
    train = rng.integers(0, 255, (8, 28, 28), dtype=np.uint8)
    val = rng.integers(0, 255, (4, 28, 28), dtype=np.uint8)
    val[0] = train[0]  # one copy: dedupe drops the val one
    np.savez(tmp_path / "one_copy.npz", train_images=train, train_labels=np.arange(8).reshape(-1, 1) % 2, val_images=val,
             val_labels=np.arange(4).reshape(-1, 1) % 2, test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=np.arange(4).reshape(-1, 1) % 2)
    paths, config = _project(tmp_path, "data.sources=[one_copy.npz]")
    copy = next(item for item in read_source(config.data.sources[0], paths.root, config.data)[0] if item.path == "val/0")
    numeric = re.compile(r"\d+(e\d+)?")
    keys = (f"a-key-whose-ids-look-numeric-{n:06d}" for n in range(100_000))
    monkeypatch.setenv("CXR_DEID_KEY", next(key for key in keys if numeric.fullmatch(image_id_of(copy, key.encode()))))
    expected = image_id_of(copy, load_key(paths.root))
    assert numeric.fullmatch(expected)

    assert ingest_stage(paths, config).n_dropped_duplicates == 1
    assert pd.api.types.is_numeric_dtype(pd.read_csv(paths.dropped_duplicates)["image_id"])  # the trap: pandas' guess
    assert read_text_csv(paths.dropped_duplicates)["image_id"].tolist() == [expected]
    assert validate_stage(paths, config).summary["duplicates"]["dropped_by_dedupe"] == 1  # the gate reads the list
    write_predictions(paths.predictions, [pd.DataFrame({"split": ["test"], "image_id": [expected], "store_index": [0],
                                                         "truth": [1], "probability": [0.7], "threshold": [0.5]})])
    assert load_predictions(paths.predictions, "test")["image_id"].tolist() == [expected]
