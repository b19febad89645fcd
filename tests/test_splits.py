"""Splits that never move: the split registry (data/splits.parquet) through real ingests of the demo set."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import SplitFractions, load_config
from pipeline.deid import key_check
from pipeline.demo_data import write_demo_data
from pipeline.errors import CxrError
from pipeline.files import sha256_of
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths
from pipeline.splits import REGISTRY_COLUMNS, UNLABELLED, hash_bucket, moved_patients, patient_labels, read_registry
from tests.conftest import source_files, write_tiny_project

CXR = str(Path(sys.executable).parent / "cxr")


def _demo_project(root: Path, n: int = 600) -> tuple[ProjectPaths, object]:
    """The demo set (600 films of 191 patients by default; small films, stored at 32 px) in a project of its own."""
    (root / "params.yaml").write_text("data:\n  image_size: 32\n")
    write_demo_data(root / "data" / "raw" / "demo", n=n, seed=0, size=64)
    return ProjectPaths(root), load_config(root / "params.yaml")


def add_new_patients(source: Path, scratch: Path, count: int = 15) -> int:
    """Films of `count` more patients (another demo set's first patients) put into `source`'s label folders.

    Their file names get an `N` prefix (P0003_1.png → NP0003_1.png), so the patient ids taken from PNG/JPEG
    names (NP0003) differ from the demo's (P0003); DICOM films carry their own random MRNs. Returns the films added.
    """
    extra = scratch / "extra-demo"
    write_demo_data(extra, n=80, seed=7, size=64)
    films = sorted(p for p in extra.rglob("P*_*") if p.is_file())
    chosen = sorted({film.name.split("_")[0] for film in films})[:count]
    added = 0
    for film in films:
        if film.name.split("_")[0] in chosen:
            target = source / film.parent.name / "new" / f"N{film.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(film, target)
            added += 1
    return added


def patient_splits(paths: ProjectPaths) -> pd.Series:
    """Each patient's split in the manifest (one per patient: the gate checks that)."""
    manifest = pd.read_parquet(paths.manifest)
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1
    return manifest.groupby("patient_hash")["split"].first()


def test_adding_15_patients_to_the_demo_moves_no_recorded_patient(tmp_path):
    paths, config = _demo_project(tmp_path)
    ingest_stage(paths, config)
    before, first = patient_splits(paths), read_registry(paths.split_registry)
    assert len(before) == len(first) == 191
    assert set(first["method"]) == {"stratified"}  # a project's first ingest splits as it always did

    assert add_new_patients(paths.root / "data" / "raw" / "demo", tmp_path) > 15
    result = ingest_stage(paths, config)

    after, registry = patient_splits(paths), read_registry(paths.split_registry)
    new = after.index.difference(before.index)
    assert len(new) == 15 and set(before.index) <= set(after.index)  # new ids: none merged with a demo patient
    assert after[before.index].equals(before)  # nobody moved
    assert len(registry) == result.n_patients_recorded == 206
    assert registry.head(191).equals(first)  # appended: the recorded rows are untouched
    added = registry.tail(15).set_index("patient_hash")
    assert set(added.index) == set(new) and set(added["method"]) == {"hash_bucket"}
    assert (added["split"] == after[added.index]).all()
    assert all(added.loc[p, "split"] == hash_bucket(p, config.data.split, config.data.seed) for p in new)


def test_ingest_twice_without_changes_leaves_the_registry_byte_identical(tmp_path):
    paths, config = _demo_project(tmp_path, n=80)
    ingest_stage(paths, config)
    written, stat = paths.split_registry.read_bytes(), paths.split_registry.stat()
    ingest_stage(paths, config)
    assert paths.split_registry.read_bytes() == written
    assert paths.split_registry.stat().st_mtime_ns == stat.st_mtime_ns  # not even rewritten: `dvc repro` stays a no-op
    assert list(read_registry(paths.split_registry).columns) == REGISTRY_COLUMNS


def _film(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(value).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)


def test_a_recorded_test_patient_that_a_source_puts_in_train_is_refused_naming_them(tmp_path):
    root = tmp_path / "data" / "raw" / "kermany"
    for offset, split in enumerate(("train", "val", "test")):
        for k in range(3):
            _film(root / split / "NORMAL" / f"normal{split}{k}_1.png", 100 * offset + 2 * k)
            _film(root / split / "PNEUMONIA" / f"person{split}{k}_bacteria_1.png", 100 * offset + 2 * k + 1)
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 32\n  sources: [data/raw/kermany]\n")
    paths, config = ProjectPaths(tmp_path), load_config(tmp_path / "params.yaml")
    ingest_stage(paths, config)
    registry = read_registry(paths.split_registry)
    assert set(registry["method"]) == {"source"} and len(registry) == 18  # a source's own split is recorded too
    manifest = pd.read_parquet(paths.manifest)
    files = source_files(paths, config, manifest)
    moved = manifest.loc[[file == root / "test/PNEUMONIA/persontest1_bacteria_1.png" for file in files], "patient_hash"].item()
    outputs = paths.manifest.read_bytes(), paths.split_registry.read_bytes()

    (root / "train" / "PNEUMONIA" / "persontest1_bacteria_1.png").write_bytes(
        (root / "test" / "PNEUMONIA" / "persontest1_bacteria_1.png").read_bytes())
    (root / "test" / "PNEUMONIA" / "persontest1_bacteria_1.png").unlink()
    with pytest.raises(CxrError) as refused:
        ingest_stage(paths, config)

    message = str(refused.value)
    assert "\n" not in message
    assert f"1 recorded patient ({moved} test → train)" in message
    assert "data/splits.parquet fixes a patient's split once" in message and "--reassign-splits" in message
    assert (paths.manifest.read_bytes(), paths.split_registry.read_bytes()) == outputs  # nothing was written


def test_an_unreadable_registry_is_a_one_line_error_not_a_fresh_split(tmp_path):
    for i in range(12):
        _film(tmp_path / "films" / ("normal" if i % 3 else "pneumonia") / f"p{i}_1.png", i)
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 32\n  sources: [films]\n")
    paths, config = ProjectPaths(tmp_path), load_config(tmp_path / "params.yaml")
    ingest_stage(paths, config)
    paths.split_registry.write_bytes(paths.split_registry.read_bytes()[:100])  # truncated

    with pytest.raises(CxrError, match="splits.parquet: not a readable split registry .*`dvc checkout`.*--reassign-splits"):
        ingest_stage(paths, config)


def _cxr(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CXR, *args], cwd=root, capture_output=True, text=True, timeout=600)


def test_reassign_splits_through_the_cli_is_recorded_and_tagged_by_training(tmp_path):
    from pipeline.rebalance import rebalance_stage
    from pipeline.tracking import client
    from pipeline.train import train_stage

    params = write_tiny_project(tmp_path, n=64)
    assert _cxr(tmp_path, "ingest").returncode == 0
    paths = ProjectPaths(tmp_path)
    first = read_registry(paths.split_registry)

    refused = _cxr(tmp_path, "ingest", "--set", "data.seed=1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: ingest: data.seed and data.split (seed=1 split=0.7/0.15/0.15) differ from "
                                     "those data/splits.parquet split its patients with (seed=0 split=0.7/0.15/0.15)")
    assert "would move" in refused.stderr and "restore data.seed and data.split, or run `cxr ingest --reassign-splits`" \
        in refused.stderr
    assert read_registry(paths.split_registry).equals(first)

    done = _cxr(tmp_path, "ingest", "--set", "data.seed=1", "--reassign-splits")
    assert done.returncode == 0, done.stderr
    registry = read_registry(paths.split_registry)
    assert set(registry["split_params"]) == {"seed=1 split=0.7/0.15/0.15"} and set(registry["method"]) == {"stratified"}
    assert (registry["reassigned_at"] != "").all() and len(set(registry["reassigned_at"])) == 1
    assert not registry[["patient_hash", "split"]].equals(first[["patient_hash", "split"]])
    assert (patient_splits(paths)[registry["patient_hash"]].to_numpy() == registry["split"].to_numpy()).all()
    assert _cxr(tmp_path, "ingest", "--set", "data.seed=1").returncode == 0  # the new seed now stands

    config = load_config(params, ["data.seed=1"])
    rebalance_stage(paths, config)
    train_stage(paths, config)
    run_id = pd.read_json(paths.run_info, typ="series")["run_id"]
    tags = client(paths).get_run(run_id).data.tags
    assert tags["data.splits_reassigned"] == f"{registry['reassigned_at'].iloc[0]} ({len(registry)} patients)"
    assert tags["data.splits_sha256"] == sha256_of(paths.split_registry)


def test_a_run_on_a_registry_never_reshuffled_is_not_tagged_reassigned(tiny_project):
    from pipeline.tracking import client

    paths = tiny_project.paths
    tags = client(paths).get_run(pd.read_json(paths.run_info, typ="series")["run_id"]).data.tags
    assert tags["data.splits_sha256"] == sha256_of(paths.split_registry)
    assert "data.splits_reassigned" not in tags


def test_a_patient_removed_then_added_back_keeps_their_split(tmp_path):
    paths, config = _demo_project(tmp_path, n=80)
    source = paths.root / "data" / "raw" / "demo"
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    patient = manifest.loc[manifest["split"] == "test", "patient_hash"].iloc[0]
    films = source_files(paths, config, manifest[manifest["patient_hash"] == patient])
    aside = tmp_path / "aside"
    aside.mkdir()
    for film in films:
        shutil.move(film, aside / film.name)

    add_new_patients(source, tmp_path)
    ingest_stage(paths, config)  # the patient is gone from the data, 15 others are new
    assert patient not in set(pd.read_parquet(paths.manifest)["patient_hash"])
    kept = read_registry(paths.split_registry).set_index("patient_hash")
    assert kept.loc[patient, "split"] == "test"  # never forgotten

    for film in films:
        shutil.move(aside / film.name, film)
    ingest_stage(paths, config)
    assert patient_splits(paths)[patient] == "test"
    assert read_registry(paths.split_registry).set_index("patient_hash").loc[patient].equals(kept.loc[patient])


def test_another_deid_key_is_refused_until_splits_are_reassigned(tmp_path, monkeypatch):
    """The registry holds pseudonyms: under a new key every patient looks new, so ingest refuses rather than
    deal them out again (test patients into train among them)."""
    paths, config = _demo_project(tmp_path, n=80)
    monkeypatch.setenv("CXR_DEID_KEY", "site-key-1-0123456789abcdef0123456789")
    ingest_stage(paths, config)
    written = paths.split_registry.read_bytes()

    monkeypatch.setenv("CXR_DEID_KEY", "site-key-2-0123456789abcdef0123456789")
    with pytest.raises(CxrError, match="data/splits.parquet was written with another de-identification key") as refused:
        ingest_stage(paths, config)
    assert "\n" not in str(refused.value) and "--reassign-splits" in str(refused.value)
    assert paths.split_registry.read_bytes() == written

    ingest_stage(paths, config, reassign_splits=True)
    registry = read_registry(paths.split_registry)
    assert set(registry["key_check"]) == {key_check(b"site-key-2-0123456789abcdef0123456789")}
    assert set(registry["patient_hash"]) == set(pd.read_parquet(paths.manifest)["patient_hash"])  # old pseudonyms gone
    assert (registry["reassigned_at"] != "").all()


def _train_only_npz(path: Path, n: int) -> None:
    """n train films of as many patients (a MedMNIST-style archive without val or test); the first films of
    a larger archive are those of a smaller one."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (200, 28, 28), dtype=np.uint8)[:n]
    np.savez(path, train_images=images, train_labels=(np.arange(n) % 3 != 0).astype(np.uint8).reshape(-1, 1))


def test_val_and_test_carved_from_train_are_decided_once(tmp_path):
    _train_only_npz(tmp_path / "train_only.npz", 60)
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 28\n  sources: [train_only.npz]\n")
    paths, config = ProjectPaths(tmp_path), load_config(tmp_path / "params.yaml")
    ingest_stage(paths, config)
    before = patient_splits(paths)
    assert set(read_registry(paths.split_registry)["method"]) == {"source", "carved"}

    _train_only_npz(tmp_path / "train_only.npz", 100)
    ingest_stage(paths, config)

    after, registry = patient_splits(paths), read_registry(paths.split_registry)
    assert after[before.index].equals(before)
    assert len(registry) == 100
    new = registry.tail(40)
    assert set(new["split"]) == {"train", "val", "test"}  # the new patients are carved too, by hash bucket
    assert set(new.loc[new["split"] != "train", "method"]) == {"carved"}


def test_hash_buckets_follow_the_split_fractions_and_the_seed():
    fractions = SplitFractions(train=0.6, val=0.1, test=0.3)
    pseudonyms = [f"{i:020x}" for i in range(20000)]
    buckets = pd.Series([hash_bucket(p, fractions, 0) for p in pseudonyms])
    shares = buckets.value_counts(normalize=True)
    assert abs(shares["train"] - 0.6) < 0.02 and abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.3) < 0.02
    assert [hash_bucket(p, fractions, 0) for p in pseudonyms[:50]] == buckets[:50].tolist()  # a patient alone decides
    assert [hash_bucket(p, fractions, 1) for p in pseudonyms[:200]] != buckets[:200].tolist()



def _random_films(rng: np.random.Generator, column: str, values: list[str]) -> pd.DataFrame:
    """Up to 60 films of up to 12 patients (p0, p1, …), each with a random `column` value, on a shuffled index."""
    n = int(rng.integers(1, 60))
    frame = pd.DataFrame({"patient_hash": [f"p{i}" for i in rng.integers(0, int(rng.integers(1, 13)), n)],
                          column: [values[i] for i in rng.integers(0, len(values), n)]})
    frame.index = rng.permutation(n) + 100  # a manifest's slice: labels are not positions
    return frame


def test_each_patients_stratum_is_their_most_common_label_a_tie_going_to_their_first_films_label():
    """Splits are stratified on it, so the same data and seed must give the same label, ties included, however
    it is computed (all patients at once since the per-patient function cost half a minute at 200,000)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        frame = _random_films(rng, "label", ["normal", "pneumonia", "effusion|nodule", "nodule"][: int(rng.integers(1, 5))])
        expected = {}
        for patient in pd.unique(frame["patient_hash"]):
            labels = frame.loc[frame["patient_hash"] == patient, "label"].tolist()
            expected[patient] = max(labels, key=lambda label: (labels.count(label), -labels.index(label)))
        found = patient_labels(frame)
        assert list(found.index) == list(expected) and found.tolist() == list(expected.values())


def test_a_recorded_patient_moved_is_one_without_a_labelled_film_in_their_recorded_split():
    rng = np.random.default_rng(6)
    for _ in range(300):
        frame = _random_films(rng, "split", ["train", "val", "test", UNLABELLED])
        recorded = {f"p{i}": str(rng.choice(["train", "val", "test"])) for i in rng.permutation(15)[: int(rng.integers(0, 15))]}
        registry = pd.DataFrame({"patient_hash": list(recorded), "split": list(recorded.values())})
        labelled = frame[frame["split"] != UNLABELLED]
        expected = [(patient, recorded[patient], "/".join(sorted(set(labelled.loc[labelled["patient_hash"] == patient, "split"]))))
                    for patient in pd.unique(labelled["patient_hash"])
                    if patient in recorded and recorded[patient] not in set(labelled.loc[labelled["patient_hash"] == patient, "split"])]
        moved = moved_patients(frame, registry)
        assert list(moved.columns) == ["patient_hash", "recorded", "found"]  # also when none is: the gate reads the column
        assert list(moved.itertuples(index=False, name=None)) == expected


def near_copy_films(n: int = 80, copies: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n distinct smooth 128-px films, a near copy of each of the first `copies` (half shifted by 1 px, half 12 grey
    levels brighter: perceptual hashes within 8 bits of their original at 32 px, while the closest two distinct films
    are 17 bits apart), and the films' labels (one in three normal)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    films = np.stack([gaussian_filter(rng.normal(size=(128, 128)), 6) for _ in range(n)])
    films = ((films - films.min(axis=(1, 2), keepdims=True)) / np.ptp(films, axis=(1, 2), keepdims=True) * 180 + 30)
    films = films.astype(np.uint8)
    half = copies // 2
    near = np.concatenate([np.roll(films[:half], 1, axis=1),
                           np.clip(films[half:copies].astype(int) + 12, 0, 255).astype(np.uint8)])
    return films, near, (np.arange(n) % 3 != 0).astype(np.uint8)


def _films_with_near_copies(path: Path, n: int = 80, copies: int = 16) -> None:
    """A MedMNIST-style train-only archive (no patient ids): near_copy_films, the copies after the originals."""
    films, near, labels = near_copy_films(n, copies)
    np.savez(path, train_images=np.concatenate([films, near]),
             train_labels=np.concatenate([labels, labels[:copies]]).reshape(-1, 1))


def _pairs_in_one_split(paths: ProjectPaths, n: int = 80, copies: int = 16) -> tuple[int, pd.DataFrame]:
    """How many (film, near copy) pairs share a split, and the manifest by npz row."""
    manifest = pd.read_parquet(paths.manifest).set_index("path").loc[[f"train/{i}" for i in range(n + copies)]]
    split = manifest["split"].to_numpy()
    return int(sum(split[i] == split[n + i] for i in range(copies))), manifest


def _ingested_without_grouping(root: Path) -> tuple[ProjectPaths, Path]:
    """A project on the near-copy archive, ingested with data.group_near_duplicates off; its paths and params."""
    _films_with_near_copies(root / "near.npz")
    params = root / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [near.npz]\n  group_near_duplicates: false\n"
                      "validation:\n  near_duplicate_distance: 8\n")
    paths = ProjectPaths(root)
    ingest_stage(paths, load_config(params))
    return paths, params


def test_near_duplicate_films_without_patient_ids_are_one_pseudo_patient_in_one_split(tmp_path):
    paths, params = _ingested_without_grouping(tmp_path)
    together, manifest = _pairs_in_one_split(paths)
    assert together < 16  # each film its own patient: val and test carved from train split some pairs apart
    assert set(manifest["patient_from"]) == {"film"}

    ingest_stage(paths, load_config(params, ["data.group_near_duplicates=true"]), reassign_splits=True)
    together, manifest = _pairs_in_one_split(paths)
    assert together == 16
    pseudo = manifest["patient_hash"].to_numpy()
    assert all(pseudo[i] == pseudo[80 + i] for i in range(16))  # the copy takes its original's pseudonym
    assert len(set(pseudo)) == 80
    assert (manifest["patient_from"] == "near_duplicates").sum() == 32
    assert set(manifest["patient_from"].iloc[16:80]) == {"film"}
    registry = read_registry(paths.split_registry)
    assert len(registry) == 80 and set(registry["patient_hash"]) == set(pseudo)  # one registry row per pseudo-patient


def test_a_recorded_film_keeps_its_split_when_grouping_would_move_it(tmp_path):
    """The registry fixes a patient's split once: a film recorded apart from its near copy stays where it was."""
    paths, params = _ingested_without_grouping(tmp_path)
    _, before = _pairs_in_one_split(paths)
    ingest_stage(paths, load_config(params, ["data.group_near_duplicates=true"]))
    _, after = _pairs_in_one_split(paths)
    assert (after["split"] == before["split"]).all()


def test_grouping_5000_films_into_pseudo_patients_joins_every_copy_and_nothing_else():
    """phash + block pair scan + connected components on 5,000 28-px films (PneumoniaMNIST's train + val size);
    hashed in batches as ingest does (phash_batches), which must give the one-set hashes. Its speed is measured
    where speed belongs, not here (a timed unit test fails on a busy machine)."""
    from pipeline.phash import phash, phash_batches
    from pipeline.splits import pseudo_patients

    images = np.random.default_rng(0).integers(0, 255, (5000, 28, 28), dtype=np.uint8)
    images[4000:] = images[:1000]  # 1,000 exact copies: 1,000 groups of two
    frame = pd.DataFrame({"patient_hash": [f"p{i}" for i in range(5000)], "patient_from": "film"})
    hashes = phash_batches(images[start:start + 1500] for start in range(0, 5000, 1500))
    assert (hashes == phash(images)).all()
    grouped = pseudo_patients(frame, hashes, 4, {}, pd.Series([None] * 5000))
    assert grouped["patient_hash"].nunique() == 4000
    assert (grouped["patient_hash"].iloc[4000:].to_numpy() == frame["patient_hash"].iloc[:1000].to_numpy()).all()


@pytest.mark.parametrize("max_distance", [0, 4, 8])
def test_near_duplicate_groups_with_many_copies_are_the_groups_every_pair_comparison_gives(max_distance: int):
    """near_duplicate_groups searches one film per (hash, stratum) and links its copies to it: the groups must be
    those of comparing every pair of eligible films of one stratum. The films attack the shortcut: a film copied
    30 times, copies spread over two strata, ineligible copies (never grouped, even with their own copies), near
    variants of copies, and two copied films 3 bits apart (chained, except at distance 0)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from pipeline.phash import hamming
    from pipeline.splits import near_duplicate_groups

    rng = np.random.default_rng(max_distance)
    originals = rng.integers(0, 2**63, 12, dtype=np.int64).astype(np.uint64)
    originals[1] = originals[0] ^ np.uint64(0b111)
    hashes = np.repeat(originals, 30)  # 360 films, 12 hashes
    bits_flipped = rng.integers(0, 63, (2, 40)).astype(np.uint64)
    flips = (np.uint64(1) << bits_flipped[0]) | (np.uint64(1) << bits_flipped[1])
    variants = hashes[rng.integers(0, len(hashes), 40)] ^ flips  # within 2 bits of a copy
    hashes = np.concatenate([hashes, variants, rng.integers(0, 2**63, 30, dtype=np.int64).astype(np.uint64)])
    order = rng.permutation(len(hashes))
    hashes = hashes[order]
    eligible = rng.random(len(hashes)) < 0.8
    strata = np.where(rng.random(len(hashes)) < 0.5, "train", "test").astype(object)

    linked = ((hamming(hashes[:, None], hashes[None, :]) <= max_distance) & eligible[:, None] & eligible[None, :]
              & (strata[:, None] == strata[None, :]))
    first, second = np.nonzero(np.triu(linked, 1))
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(len(hashes),) * 2)
    expected = connected_components(graph, directed=False)[1]

    groups = near_duplicate_groups(hashes, max_distance, eligible, strata)
    assert (groups == expected).all()  # the same labels: scipy numbers components by their first film
    sizes = pd.Series(groups[eligible]).value_counts()
    assert sizes.max() >= 15 and (~eligible).sum() >= 40  # the data exercises the shortcut: many copies, many left out


def test_forgetting_a_pseudo_patient_keeps_every_film_of_the_group_out_of_later_ingests(tmp_path):
    """`cxr forget` takes a manifest patient_hash; for a near-duplicate group that is the group's, and the copies
    (whose own pseudonyms differ) must not come back as a new group at the next ingest."""
    from pipeline.forget import forget_patient

    _films_with_near_copies(tmp_path / "near.npz")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [near.npz]\nvalidation:\n  near_duplicate_distance: 8\n")
    paths, config = ProjectPaths(tmp_path), load_config(params)
    ingest_stage(paths, config)
    _, manifest = _pairs_in_one_split(paths)
    pseudonym = manifest["patient_hash"].iloc[0]
    assert manifest["patient_hash"].iloc[80] == pseudonym
    forget_patient(paths, config, pseudonym)
    ingest_stage(paths, config)
    after = pd.read_parquet(paths.manifest)
    assert "train/0" not in set(after["path"]) and "train/80" not in set(after["path"])
    assert len(after) == 94
    quarantine = pd.read_csv(paths.quarantine)
    assert set(quarantine.loc[quarantine["reason"] == "erased", "path"]) == {"train/0", "train/80"}


CHAINS, STEPS, FILLERS = 8, 16, 40


def _week_of_films(root: Path, week: int) -> None:
    """PNG films without a patient id in normal/ and pneumonia/ (64 px smooth fields; stored at 32 px). Each of
    CHAINS chains morphs one film into another in STEPS steps: neighbours are near-duplicates (within 8 bits),
    the two ends are not. Week 1 brings FILLERS distinct films and each chain's two films at either end (two
    pseudo-patients per chain); week 2 adds the chain's middle films, which join its two ends into one chain of
    near-duplicates, and a 10-grey-levels-brighter copy of every filler."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)

    def field() -> np.ndarray:
        film = gaussian_filter(rng.normal(size=(64, 64)), 5)
        return (film - film.min()) / np.ptp(film)

    def save(name: str, label: str, film: np.ndarray) -> None:
        (root / "films" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(film * 180 + 30, 0, 255).astype(np.uint8)).save(root / "films" / label / f"{name}.png")

    fillers = [field() for _ in range(FILLERS)]
    for i, film in enumerate(fillers):
        label = "normal" if i % 2 else "pneumonia"
        save(f"f{i:02d}", label, film)
        if week == 2:
            save(f"f{i:02d}-copy", label, film + 10 / 180)
    for k in range(CHAINS):
        x, y = field(), field()
        for step, t in enumerate(np.linspace(0, 1, STEPS + 1)):
            if week == 2 or step in (0, 1, STEPS - 1, STEPS):
                save(f"c{k}-{step:02d}", "normal" if k % 2 else "pneumonia", (1 - t) * x + t * y)


@pytest.mark.parametrize("manifest_kept", [True, False])
def test_a_newcomer_never_joins_near_duplicates_across_two_splits_and_no_old_film_moves(tmp_path, caplog,
                                                                                        manifest_kept):
    """Week 1: each chain's ends are two pseudo-patients, dealt out separately. Week 2: the middle films bridge
    them. A chain whose ends sat in one split takes its newcomers there (test included); a chain whose ends sat in
    two splits keeps both ends where they were and quarantines its newcomers (a newcomer in either split would be
    a near-duplicate of a film in the other). No old film moves, and no near-duplicate group spans two splits.
    Without the last manifest (deleted), an end film the registry knows only through its group is quarantined
    with the newcomers rather than moved."""
    import logging

    from pipeline.phash import close_pairs
    from pipeline.splits import near_duplicate_groups

    _week_of_films(tmp_path, 1)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [films]\nvalidation:\n  near_duplicate_distance: 8\n")
    paths, config = ProjectPaths(tmp_path), load_config(params)
    ingest_stage(paths, config)
    before = pd.read_parquet(paths.manifest).set_index("path")
    ends = before[before.index.str.contains("/c")]
    assert (ends["patient_from"] == "near_duplicates").all() and ends["patient_hash"].nunique() == 2 * CHAINS
    split_of_end = {(path.split("/c")[1][0], int(path[-6:-4]) <= 1): split for path, split in ends["split"].items()}
    divided = sorted({k for (k, _), _ in split_of_end.items() if split_of_end[(k, True)] != split_of_end[(k, False)]})
    whole = sorted({k for (k, _) in split_of_end} - set(divided))
    assert divided and whole, split_of_end  # the data and seed give both kinds of chain: the test can fail
    assert (before["split"] == "test").any()

    _week_of_films(tmp_path, 2)
    if not manifest_kept:
        paths.manifest.unlink()
    with caplog.at_level(logging.WARNING):
        ingest_stage(paths, config)

    after = pd.read_parquet(paths.manifest).set_index("path")
    kept = before.index[before.index.isin(after.index)]
    assert (after.loc[kept, "split"] == before.loc[kept, "split"]).all()  # no old film moved
    quarantine = pd.read_csv(paths.quarantine)
    bridging = quarantine[quarantine["reason"] == "near_duplicates_in_two_splits"]
    expected = {f"{'normal' if int(k) % 2 else 'pneumonia'}/c{k}-{step:02d}.png" for k in divided
                for step in range(2, STEPS - 1)}
    ends_of_divided = {path for path in ends.index if path.split("/c")[1][0] in divided}
    if manifest_kept:
        assert set(bridging["path"]) == expected and len(kept) == len(before)
    else:
        assert expected <= set(bridging["path"]) <= expected | ends_of_divided
        assert set(before.index) - set(kept) == set(bridging["path"]) - expected
    for path, message in zip(bridging["path"], bridging["message"], strict=True):
        k = path.split("/c")[1][0]
        first, second = sorted({split_of_end[(k, True)], split_of_end[(k, False)]})
        assert message.startswith(f"films/{path}: ") and f"keeps in {first} and {second}" in message, message
    assert f"{len(divided)} group(s) of near-duplicate films sit in two or more splits" in caplog.text
    for k in whole:  # the newcomers joined their chain's split and pseudo-patient
        chain = after[after.index.str.contains(f"/c{k}-")]
        assert len(chain) == STEPS + 1 and chain["split"].nunique() == 1 and chain["patient_hash"].nunique() == 1
    copies = after[after.index.str.endswith("-copy.png")]
    originals = after.loc[copies.index.str.replace("-copy", ""), "split"].to_numpy()
    assert (copies["split"].to_numpy() == originals).all() and "test" in set(originals)  # a test film's copy: test

    # no near-duplicate group of the stored films spans two splits (hashes over the whole store, as ingest groups)
    from pipeline.phash import phash

    stored = np.load(paths.images)[after["store_index"].to_numpy()]
    hashes = phash(stored)
    groups = near_duplicate_groups(hashes, 8, np.ones(len(after), bool), np.zeros(len(after), int))
    spans = pd.Series(after["split"].to_numpy()).groupby(groups).nunique()
    assert (spans == 1).all(), after.assign(group=groups)[lambda f: f["group"].isin(spans.index[spans > 1])]
    assert len(close_pairs(hashes, 8)) > 0
    registry = read_registry(paths.split_registry)
    assert set(after["patient_hash"]) <= set(registry["patient_hash"])
