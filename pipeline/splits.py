"""Patient-level train/val/test splits, decided once per patient and kept in a registry.

Images of one patient never straddle splits: that leak is what inflates many published chest
X-ray results. A patient's split is decided the first time ingest sees them and recorded in
data/splits.parquet; later ingests never move a recorded patient (new data must not pull former
test patients into training), they only add the new ones. Sources that bring their own split keep it.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import SplitFractions
from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.labels import UNLABELLED

log = logging.getLogger(__name__)

# One row per patient ever seen (pseudonyms only). method: how the split was decided: `stratified` (a project's
# first ingest, or a reshuffle), `hash_bucket` (a patient new to an existing registry), `source` (the source's own
# split), `carved` (val/test carved from a source's train). split_params: data.seed and data.split then.
# key_check: which de-identification key made the pseudonyms. reassigned_at: set on the rows a deliberate
# reshuffle (`cxr ingest --reassign-splits`) decided, empty otherwise.
REGISTRY_COLUMNS = ["patient_hash", "split", "source", "method", "split_params", "key_check", "assigned_at",
                    "reassigned_at"]
PARAM_METHODS = ("stratified", "hash_bucket", "carved")  # the methods data.seed and data.split decide
HELD_OUT_FIRST = ("test", "val", "train")  # a patient a source puts in several splits is recorded in the first
REASSIGN_FIX = "run `cxr ingest --reassign-splits` to reshuffle every patient deliberately (recorded in MLflow)"


# How each film's patient was known (the manifest's patient_from). `header`: the DICOM PatientID; `source`: a table's
# patient column or data.patient_pattern in the file name; `film`: nothing named one, the film is its own patient;
# `near_duplicates`: nothing named one, and the film was grouped with its near-duplicates into a pseudo-patient
# (data.group_near_duplicates). Only the first two keep other films of one person out of the other splits.
KNOWN_PATIENT = ("header", "source")
UNKNOWN_PATIENT = ("film", "near_duplicates")


def patient_knowledge(manifest_path: Path) -> dict:
    """Whether validation and test can share patients with train, from the manifest's patient_from: a flag and a
    one-line caveat every report repeats (metrics.json, the report, the MLflow run, the model card).

    Patients are known when every labelled film's patient came from a DICOM header, a table column or the file name
    (data.patient_pattern). A film with none is its own patient (grouped with its near-duplicates at best), so
    other films of the same person can sit in other splits, as MedMNIST's validation split (a random 10 % of
    Kermany's training images, not patients) shares patients with train: scores there are optimistic, and a model,
    epoch or threshold chosen on them rewards memorising. `patients_known` is None for a manifest older than
    patient_from (nothing says how its patients were found).
    """
    import pyarrow.parquet as pq

    if "patient_from" not in pq.read_schema(manifest_path).names:
        return {"patients_known": None, "patient_caveat": "whether validation and test share patients with train is "
                "unknown: the manifest predates its patient_from column (run `cxr ingest` again)"}
    manifest = pd.read_parquet(manifest_path, columns=["split", "source", "patient_from"])
    labelled = manifest[manifest["split"].isin(["train", "val", "test"])]
    unknown = labelled[labelled["patient_from"].isin(UNKNOWN_PATIENT)]
    knowledge: dict = {"patients_known": unknown.empty, "films_without_patient": int(len(unknown)),
                       "films_grouped_by_near_duplicates": int((unknown["patient_from"] == "near_duplicates").sum()),
                       "sources_without_patients": sorted(set(unknown["source"]))}
    if unknown.empty:
        return knowledge | {"patient_caveat": None}
    grouped = (" (near-duplicate films grouped into pseudo-patients, data.group_near_duplicates)"
               if knowledge["films_grouped_by_near_duplicates"] else "")
    return knowledge | {"patient_caveat": (
        f"validation and test may share patients with train: {len(unknown):,} of {len(labelled):,} films "
        f"({', '.join(knowledge['sources_without_patients'])}) name no patient, so they were split by film{grouped}; "
        "their validation and test scores are optimistic, and choices made on validation may not hold for new patients")}


def near_duplicate_groups(hashes: np.ndarray, max_distance: int, eligible: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """A group number per film: `eligible` films of one stratum linked by a chain of near-duplicate pairs (perceptual
    hashes within `max_distance` bits, pipeline.phash) share one; every other film is a group of its own. `strata`
    holds a label per film (equal labels, one stratum; films with a missing label form one stratum too).

    The pairs come from phash.close_pairs (a search by hash bands: 60,000 films in a tenth of a second) and the
    chains from scipy's connected components (a union-find in C), so no Python loop runs over films or pairs.
    Films of one stratum with the same hash (copies of a film: byte copies, re-exports) are linked to the first of
    them and only that one is searched: k copies are then k - 1 links, not k(k - 1)/2 pairs (a film copied 100
    times into an archive gave 4,950 pairs), and the groups are the same.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from pipeline.phash import close_pairs

    hashes = np.asarray(hashes, dtype=np.uint64)
    stratum_codes = pd.factorize(strata, use_na_sentinel=False)[0]  # any labels, unsorted; missing ones: one stratum
    candidates = np.flatnonzero(eligible)
    keys = np.stack([hashes[candidates], stratum_codes[candidates].astype(np.uint64)], axis=1)
    _, firsts, copy_of = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    copy_of = copy_of.ravel()  # numpy 2.0.0 gave the inverse of an axis unique an extra dimension
    searched = candidates[firsts]  # one film per (hash, stratum)
    pairs = searched[close_pairs(hashes[searched], max_distance)]
    first, second = pairs[:, 0], pairs[:, 1]
    same = stratum_codes[first] == stratum_codes[second]
    rows = np.concatenate([first[same], candidates])
    columns = np.concatenate([second[same], searched[copy_of]])  # each copy to its first (itself, for that one)
    n = len(hashes)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, columns)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


BRIDGING = "near_duplicates_in_two_splits"  # the quarantine reason of a newcomer that links groups of two splits


def pseudo_patients(frame: pd.DataFrame, perceptual: np.ndarray, max_distance: int, recorded: dict[str, str],
                    strata: pd.Series, erased: set[str] = frozenset(),
                    previous: dict[str, str] | None = None) -> pd.DataFrame:
    """`frame` (patient_hash, patient_from per film, in data order) with near-duplicate films that no patient ID
    links merged into pseudo-patients, so that a film and its re-saved, re-windowed or slightly shifted copy can
    never be split apart (or fall into two cross-validation folds); column `bridges` names, for each film to leave
    out, the splits it would link (e.g. 'test/train'), and is '' for the others.

    Only films without a patient (patient_from `film` or `near_duplicates`) of one stratum (the split their source
    gave them: a source's own train/val/test is kept) are grouped. A film's earlier pseudo-patient is the one
    `previous` (image_id -> patient_hash: the last manifest) gave it, else its own pseudonym; its earlier split is
    what the split registry (`recorded`: patient_hash -> split) holds for that pseudo-patient. A group whose earlier
    films all sat in one split takes the pseudonym of its first film that has one (else of its first film), so
    newcomers join that split, test included. A group whose earlier films sat in two or more splits (new films
    bridge them) is not merged: each earlier film keeps its pseudo-patient and split, and the films new to it are
    marked in `bridges` (in either split they would be near-duplicates of a film in the other). A group holding an
    `erased` pseudonym (`cxr forget`) takes it, so the caller drops the whole group. `perceptual`: the films'
    perceptual hashes (pipeline.phash), computed as one set.
    """
    eligible = frame["patient_from"].isin(UNKNOWN_PATIENT).to_numpy()
    if eligible.sum() < 2:
        return frame.assign(bridges="")
    groups = near_duplicate_groups(perceptual, max_distance, eligible, strata.fillna("").astype(str).to_numpy())
    hashes = frame["patient_hash"].to_numpy(dtype=object)
    earlier = frame["image_id"].map(previous) if previous and "image_id" in frame else pd.Series(np.nan, index=frame.index)
    earlier = earlier.where(earlier.notna(), frame["patient_hash"]).to_numpy(dtype=object)
    known = pd.Series(earlier).map(recorded).to_numpy(dtype=object)
    seen = ~pd.isna(known)
    earlier = np.where(seen, earlier, hashes)  # a film no split was recorded for is new: its own pseudonym
    order = np.arange(len(frame)) + np.where(seen, 0, len(frame))  # films seen before first, then data order
    representative = pd.Series(order).groupby(groups).transform("idxmin").to_numpy()
    size = np.bincount(groups)[groups]
    divided = (pd.Series(known).groupby(groups).transform("nunique") > 1).to_numpy()
    joined = (size > 1) & ~divided
    hashes_out = np.where(joined, earlier[representative], np.where(divided, earlier, hashes))
    bridging = divided & ~seen
    if erased:
        gone = frame["patient_hash"].isin(list(erased)).to_numpy()
        first_gone = pd.Series(np.where(gone, np.arange(len(frame)), len(frame))).groupby(groups).transform("min").to_numpy()
        hit = first_gone < len(frame)
        hashes_out = np.where(hit, hashes[np.minimum(first_gone, len(frame) - 1)], hashes_out)
        bridging &= ~hit
    if divided.any():
        log.warning("ingest: %d group(s) of near-duplicate films sit in two or more splits; their %d earlier film(s) "
                    "stay where the split registry recorded them, and %d new film(s) linking them are quarantined as "
                    "%s; `cxr ingest --reassign-splits` regroups them", len(set(groups[divided])),
                    int((divided & seen).sum()), int(bridging.sum()), BRIDGING)
    bridges = np.full(len(frame), "", dtype=object)
    if bridging.any():
        named = pd.Series(known[divided]).groupby(groups[divided]).agg(lambda splits: "/".join(sorted(set(splits.dropna()))))
        bridges[bridging] = named.reindex(groups[bridging]).to_numpy()
    return frame.assign(patient_hash=hashes_out, bridges=bridges,
                        patient_from=np.where(size > 1, "near_duplicates", frame["patient_from"].to_numpy(dtype=object)))


def split_patients(frame: pd.DataFrame, fractions: SplitFractions, seed: int) -> pd.Series:
    """Assign train/val/test to every row by patient, stratified on each patient's most common label.

    `frame` needs columns patient_hash and label; returns one split name per row. The label is the class, or for
    a multilabel task the film's label set (pipeline.labels), so multilabel splits are stratified on the label
    powerset; a combination held by fewer than three patients stays in train.
    """
    patient_label = patient_labels(frame)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(patient_label.unique()):
        patients = np.array(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        for patient, split in zip(patients, _split_names(len(patients), fractions)):
            assignment[patient] = split
    return frame["patient_hash"].map(assignment)


def carve_from_train(frame: pd.DataFrame, target: str, fraction: float, seed: int) -> pd.Series:
    """For a source that brings no `target` split (e.g. MedMNIST without test): move `fraction` of train patients to it."""
    splits = frame["split"].copy()
    patient_label = patient_labels(frame[frame["split"] == "train"])
    rng = np.random.default_rng(seed)
    moved: set[str] = set()
    for label in sorted(patient_label.unique()):
        patients = np.array(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        moved.update(patients[: int(round(len(patients) * fraction))])
    splits[frame["patient_hash"].isin(moved) & (frame["split"] == "train")] = target
    return splits


def hash_bucket(patient_hash: str, fractions: SplitFractions, seed: int) -> str:
    """The split of a patient new to an existing registry: sha256 of the seeded pseudonym as a number in [0, 1).

    Each patient is decided alone, so adding patients never changes another's split; the label is not
    looked at, so the split fractions hold per label only on average (stratification is approximate).
    """
    digest = hashlib.sha256(f"{seed}:{patient_hash}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < fractions.train:
        return "train"
    return "val" if position < fractions.train + fractions.val else "test"


def patient_labels(frame: pd.DataFrame) -> pd.Series:
    """Each patient's most common label, patients in order of first appearance.

    That order comes from the sorted source files, not from the keyed hashes, so the same data and
    seed give the same split whatever de-identification key a site uses. A tie goes to the label the patient's
    first films have (as Series.value_counts orders ties). Counted for all patients at once: a Python function
    per patient took about 150 µs each, half a minute on a first ingest of 200,000 films of one patient each.
    """
    counts = frame.groupby(["patient_hash", "label"], sort=False).size()  # pairs in order of first appearance
    counts = counts.reset_index(name="films")
    most = counts.loc[counts.groupby("patient_hash", sort=False)["films"].idxmax()]  # idxmax: the first of a tie
    return most.set_index("patient_hash")["label"].reindex(pd.unique(frame["patient_hash"]))


def _split_names(n: int, fractions: SplitFractions) -> list[str]:
    """n split names in train, val, test order; val and test get at least one patient when n >= 3."""
    n_val = int(round(n * fractions.val))
    n_test = int(round(n * fractions.test))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = max(n - n_val - n_test, 0)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


# --- the split registry ------------------------------------------------------------------------


def empty_registry() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series([], dtype=object) for column in REGISTRY_COLUMNS})


def read_registry(path: Path) -> pd.DataFrame | None:
    """The split registry ingest wrote, or None when there is none yet."""
    if not path.exists():
        return None
    try:
        registry = pd.read_parquet(path)
    except Exception as exc:  # a truncated or foreign file: say which, never a traceback
        raise CxrError(f"{path}: not a readable split registry ({type(exc).__name__}); restore it with "
                       f"`dvc checkout`, or {REASSIGN_FIX}") from None
    missing = [column for column in REGISTRY_COLUMNS if column not in registry.columns]
    if missing:
        raise CxrError(f"{path}: the split registry lacks column(s) {', '.join(missing)}; restore it with "
                       f"`dvc checkout`, or {REASSIGN_FIX}")
    twice = registry["patient_hash"][registry["patient_hash"].duplicated()]
    if len(twice):
        raise CxrError(f"{path}: {len(twice)} patient(s) recorded twice (e.g. {twice.iloc[0]}); restore it with "
                       f"`dvc checkout`, or {REASSIGN_FIX}")
    return registry[REGISTRY_COLUMNS].astype(object)


def write_registry(path: Path, registry: pd.DataFrame) -> bool:
    """Write the registry atomically, only when its bytes change (an unchanged ingest leaves the file alone,
    so `dvc repro` stays a no-op); True when it wrote."""
    import io

    buffer = io.BytesIO()
    registry[REGISTRY_COLUMNS].astype(object).reset_index(drop=True).to_parquet(buffer, index=False)
    if path.exists() and path.read_bytes() == buffer.getvalue():
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return True


def split_params(fractions: SplitFractions, seed: int) -> str:
    """data.seed and data.split as the registry records them, e.g. 'seed=0 split=0.7/0.15/0.15'."""
    return f"seed={seed} split={fractions.train:g}/{fractions.val:g}/{fractions.test:g}"


def assign_splits(
    frame: pd.DataFrame, registry: pd.DataFrame | None, fractions: SplitFractions, seed: int, key_check: str,
    *, reassign: bool = False, now: str | None = None, where: str = "data/splits.parquet",
) -> tuple[pd.Series, pd.DataFrame]:
    """Every row's split, and the registry with the patients seen for the first time appended.

    `frame` has one row per film: patient_hash, label, source and split (the source's own: train, val, test,
    unlabelled, or None where the source has none). Recorded patients keep their split. With no registry
    (or an empty one, or `reassign`) new patients are split as a project's first ingest always was (stratified,
    seeded: small val and test splits still hold every label), else each by `hash_bucket`. A change that would
    move a recorded patient raises CxrError naming them; `reassign` rebuilds the registry from `frame` instead
    (patients no longer in the data leave it) and stamps the rows it decided with `now`.
    """
    now = now or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    registry = empty_registry() if registry is None or reassign else registry
    _refuse_another_key(registry, key_check, where)
    params = split_params(fractions, seed)
    if not registry.empty:
        _refuse_changed_params(frame, registry, fractions, seed, params, where)
    recorded = dict(zip(registry["patient_hash"], registry["split"]))
    splits, methods = _decide(frame, recorded, fractions, seed)
    moved = moved_patients(frame.assign(split=splits), registry)
    if len(moved):
        raise CxrError(f"ingest: {_name_patients(moved)} would move to another split, but {where} fixes a patient's "
                       f"split once; put their films back in the recorded split, or {REASSIGN_FIX}")
    new = _new_rows(frame.assign(split=splits, method=methods), recorded)
    new = new.assign(split_params=params, key_check=key_check, assigned_at=now, reassigned_at=now if reassign else "")
    appended = pd.concat([registry, new[REGISTRY_COLUMNS]], ignore_index=True) if len(new) else registry
    return splits, appended.astype(object)


def moved_patients(frame: pd.DataFrame, registry: pd.DataFrame) -> pd.DataFrame:
    """Recorded patients none of whose labelled films in `frame` is in their recorded split, in data order.

    Columns patient_hash, recorded, found (the splits their films are in now). A patient a source puts in
    several splits is the patient_leakage check's business; here they count as moved only when none of
    those splits is the recorded one.

    Every ingest checks every recorded patient, so the test runs for all films at once; only the moved patients
    (none, normally) have their splits spelled out.
    """
    labelled = frame[frame["split"] != UNLABELLED]
    recorded = registry.set_index("patient_hash")["split"]
    patients = labelled["patient_hash"]
    theirs = patients.map(recorded)  # each film's patient's recorded split, NaN for a new patient
    films = pd.DataFrame({"recorded": theirs.notna(), "kept": labelled["split"].eq(theirs)})
    patient = films.groupby(patients, sort=False).any()  # kept: one of their films is in their recorded split
    moved = patient.index[patient["recorded"].to_numpy() & ~patient["kept"].to_numpy()]
    found = labelled[patients.isin(moved)].groupby("patient_hash", sort=False)["split"].agg(
        lambda splits: "/".join(sorted(set(splits))))
    return pd.DataFrame({"patient_hash": moved, "recorded": recorded.reindex(moved).to_numpy(),
                         "found": found.reindex(moved).to_numpy()})


def reassignment(registry: pd.DataFrame) -> tuple[str, int] | None:
    """When the last deliberate reshuffle happened and how many patients it decided; None if never."""
    stamps = registry["reassigned_at"][registry["reassigned_at"].astype(str) != ""]
    if stamps.empty:
        return None
    last = max(stamps)
    return last, int((stamps == last).sum())


def _decide(frame: pd.DataFrame, recorded: dict[str, str], fractions: SplitFractions, seed: int,
            announce: bool = True) -> tuple[pd.Series, pd.Series]:
    """Each row's split and how it was decided, before any check. No recorded patients: stratified as always."""
    splits = frame["split"].copy()
    methods = pd.Series("source", index=frame.index, dtype=object)
    known = frame["patient_hash"].map(recorded)
    unsplit = splits.isna()
    take = unsplit & known.notna()
    splits[take], methods[take] = known[take], "recorded"
    new = unsplit & known.isna()
    if new.any() and not recorded:
        splits[new], methods[new] = split_patients(frame[new], fractions, seed), "stratified"
    elif new.any():
        splits[new] = [hash_bucket(patient, fractions, seed) for patient in frame.loc[new, "patient_hash"]]
        methods[new] = "hash_bucket"
    for source, rows in frame.groupby("source", sort=False):
        given = set(frame.loc[rows.index, "split"].dropna())
        if unsplit[rows.index].any() or "train" not in given:
            continue
        targets = [target for target in ("test", "val") if target not in given]
        train = rows.index[frame.loc[rows.index, "split"] == "train"]
        carved_before = known[train].isin(targets)  # decided once: a recorded carve holds
        splits[carved_before.index[carved_before]] = known[train][carved_before]
        methods[carved_before.index[carved_before]] = "recorded"
        fresh = known[train].isna()
        fresh = fresh.index[fresh]
        if not targets or fresh.empty:
            continue
        if not recorded:
            carved = _carve(frame.loc[rows.index].assign(split=splits[rows.index]), targets, fractions, seed,
                            source if announce else None)
        else:
            buckets = pd.Series([hash_bucket(patient, fractions, seed) for patient in frame.loc[fresh, "patient_hash"]],
                                index=fresh)
            carved = buckets.where(buckets.isin(targets), "train").reindex(rows.index).fillna(splits[rows.index])
        changed = carved != splits[rows.index]
        splits[changed.index[changed]], methods[changed.index[changed]] = carved[changed], "carved"
    return splits, methods


def _carve(rows: pd.DataFrame, targets: list[str], fractions: SplitFractions, seed: int, source: str | None) -> pd.Series:
    """A source's val and/or test carved from its train patients (stratified, seeded), as a first ingest does;
    logged under the source's name unless that is None."""
    for target in targets:
        rows = rows.assign(split=carve_from_train(rows, target, getattr(fractions, target), seed))
        if source is not None:
            log.info("ingest: %s has no %s split; carved %d images from its train split (stratified, seed %d)",
                     source, target, int((rows["split"] == target).sum()), seed)
    return rows["split"]


def _new_rows(frame: pd.DataFrame, recorded: dict[str, str]) -> pd.DataFrame:
    """One row per labelled patient not recorded yet, in pseudonym order: the split of their most held-out film."""
    # As objects: isin on pandas 3's Arrow strings costs 8 µs per recorded patient (decode_cache.drop_unreadable).
    labelled = frame[(frame["split"] != UNLABELLED) & ~frame["patient_hash"].astype(object).isin(list(recorded))]
    rank = labelled["split"].map({split: i for i, split in enumerate(HELD_OUT_FIRST)})
    first = labelled.assign(_rank=rank).sort_values(["patient_hash", "_rank"], kind="stable")
    return first.drop_duplicates("patient_hash")[["patient_hash", "split", "source", "method"]].reset_index(drop=True)


def _refuse_another_key(registry: pd.DataFrame, key_check: str, where: str) -> None:
    """Pseudonyms made with another de-identification key match no recorded patient: every patient would look
    new and be decided again, test patients into train among them. Refuse rather than guess."""
    if (registry["key_check"] != key_check).any():
        raise CxrError(f"ingest: {where} was written with another de-identification key (CXR_DEID_KEY, or the key "
                       f"file of deid.key_scope: ~/.config/cxr/deid.key or <project>/.cxr/deid.key), so none of its "
                       f"{len(registry)} patients can be recognised; use that key again (to change keys, `cxr key "
                       f"rotate --new-key-file NEW` under the old one), or {REASSIGN_FIX}")


def _refuse_changed_params(frame: pd.DataFrame, registry: pd.DataFrame, fractions: SplitFractions, seed: int,
                           params: str, where: str) -> None:
    """data.seed or data.split changed since the patients in the data were split: recorded patients would keep
    their split, so the change would quietly do nothing for them. Refuse when a reshuffle would move any."""
    present = registry["patient_hash"].isin(set(frame["patient_hash"]))
    decided = registry[present & registry["method"].isin(PARAM_METHODS)]
    older = sorted(set(decided["split_params"]) - {params})
    if not older:
        return
    reshuffled, _ = _decide(frame, {}, fractions, seed, announce=False)
    moved = moved_patients(frame.assign(split=reshuffled), registry)
    if len(moved):
        raise CxrError(f"ingest: data.seed and data.split ({params}) differ from those {where} split its patients "
                       f"with ({', '.join(older)}); splitting again would move {_name_patients(moved)}; restore "
                       f"data.seed and data.split, or {REASSIGN_FIX}")


def _name_patients(moved: pd.DataFrame, first: int = 3) -> str:
    """'2 recorded patients (3f9a… test → train, …)': the first few pseudonyms and where they would go."""
    named = ", ".join(f"{p} {r} → {f}" for p, r, f in moved.head(first).itertuples(index=False))
    more = f" and {len(moved) - first} more" if len(moved) > first else ""
    noun = "patient" if len(moved) == 1 else "patients"
    return f"{len(moved)} recorded {noun} ({named}{more})"
