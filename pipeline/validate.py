"""Validate: the data-quality gate between ingest and training, run as great-expectations checks.

Each check is one GX expectation suite run on the manifest or on a small table derived from it
(one row per split, per sha256, per patient, or per image with its near-duplicates found by
perceptual hashes of the image store). A failed `blocking` check stops the pipeline, a failed
`warning` check is only reported, an `ignore` check is not run (`validation.severity`).
Outputs in reports/validation/: results.json (the full GX results), summary.json (counts a person
reads first) and data_docs/index.html (GX's Data Docs pages of the same results).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from itertools import combinations
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import Config, DataConfig, ValidationConfig
from pipeline.errors import CxrError
from pipeline.files import read_text_csv, write_json
from pipeline.overrides import review_shares
from pipeline.sources import UNLABELLED
from pipeline.ingest import MANIFEST_COLUMNS
from pipeline.manifest import read_manifest
from pipeline.paths import ProjectPaths
from pipeline.phash import close_pairs, phash
from pipeline.splits import moved_patients, read_registry
from pipeline.tasks import LabelBalance, task_for

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

REQUIRED_COLUMNS = tuple(MANIFEST_COLUMNS)
KEY_COLUMNS = (
    "store_index", "image_id", "split", "label", "label_index", "patient_hash", "sha256",
    "mean_intensity", "std_intensity",
)
SPLIT_ORDER = ("train", "val", "test")  # how split pairs are named in summary.json, e.g. "train/val"


@dataclass(frozen=True)
class CheckResult:
    name: str  # a field of config.Severities, e.g. "labels_in_set"
    severity: str  # "blocking" or "warning"
    success: bool
    details: str  # one sentence: what was found


@dataclass(frozen=True)
class GateResult:
    passed: bool  # False when any blocking check failed
    checks: list[CheckResult]
    summary: dict
    results_path: Path
    summary_path: Path
    data_docs_path: Path  # index.html of the GX Data Docs


@dataclass(frozen=True)
class _CheckPlan:
    """One check before it runs: the table GX validates and the expectations on it."""

    table: pd.DataFrame
    row_id: str  # the column that names a failing row in results.json
    subject: str  # what one row of `table` is, for the success sentence, e.g. "images"
    expectations: list[Expectation]


def validate_stage(paths: ProjectPaths, config: Config) -> GateResult:
    """Validate the ingested manifest; raise CxrError naming the failed blocking checks."""
    for path in (paths.manifest, paths.images):
        if not path.exists():
            raise CxrError(f"{path} is missing: run ingest first")
    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels)
    manifest = manifest[manifest["split"] != UNLABELLED]  # films kept for prediction only are not training data
    images = np.load(paths.images, mmap_mode="r")  # hashed a chunk at a time, never read whole
    dropped = read_text_csv(paths.dropped_duplicates) if paths.dropped_duplicates.exists() else None
    registry = read_registry(paths.split_registry)
    if registry is None:
        raise CxrError(f"{paths.split_registry} is missing: run ingest first")
    gate = run_validation(manifest, images, config.data, config.validation, paths.validation_dir, dropped, registry)
    if not gate.passed:
        failed = [f"{c.name} ({c.details})" for c in gate.checks if c.severity == "blocking" and not c.success]
        raise CxrError(f"data validation failed: {'; '.join(failed)}. Details: {gate.results_path}")
    return gate


def run_validation(
    manifest: pd.DataFrame, images: np.ndarray, data: DataConfig, validation: ValidationConfig, out_dir: Path,
    dropped: pd.DataFrame | None = None, registry: pd.DataFrame | None = None,
) -> GateResult:
    """Run every non-ignored check through GX; write results.json, summary.json and data_docs/ to out_dir.

    `images` is the image store (N, S, S) uint8; manifest.store_index says which row is which film.
    `dropped` lists the identical copies ingest removed (data.dedupe=drop): the checks see the data as it
    will be trained on, while summary.json counts the exact duplicates as they were found. `registry` is the
    split registry (pipeline.splits); without one the split_registry check is not run.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in manifest.columns]
    if missing:
        # Nothing else can be computed without these; the ingest stage that wrote the manifest is out of date.
        raise CxrError(f"the manifest lacks column(s) {', '.join(missing)}: rerun ingest")
    if images.ndim != 3 or len(images) <= manifest["store_index"].to_numpy().max(initial=-1):
        raise CxrError(f"the image store {images.shape} does not match the manifest ({len(manifest)} images): "
                       "rerun ingest")
    severities = validation.severity.model_dump()
    near_pairs = _near_duplicate_pairs(manifest, images, validation.near_duplicate_distance)
    all_plans = _plan_checks(manifest, near_pairs, data, validation, registry)
    plans = {name: plan for name, plan in all_plans.items() if severities[name] != "ignore"}
    docs_dir = out_dir / "data_docs"
    gx_results = _run_gx(plans, docs_dir)
    checks = [
        CheckResult(name, severities[name], gx_results[name].success, _describe(plan, gx_results[name]))
        for name, plan in plans.items()
    ]
    passed = not any(check.severity == "blocking" and not check.success for check in checks)
    summary = _build_summary(manifest, near_pairs, data, checks, passed, dropped)

    results_path, summary_path = out_dir / "results.json", out_dir / "summary.json"
    results = {c.name: {"severity": c.severity, "details": c.details, "result": _stable(gx_results[c.name].to_json_dict())}
               for c in checks}
    write_json(results_path, results)
    write_json(summary_path, summary)
    write_json(out_dir / COUNTS_FILE, gate_counts(summary))
    return GateResult(passed, checks, summary, results_path, summary_path, docs_dir / "index.html")


VOLATILE_KEYS = {"id", "run_id", "validation_id", "validation_time", "ge_load_time"}


def _stable(tree):
    """GX results without the ids and timestamps that change every run, so identical data gives identical files."""
    if isinstance(tree, dict):
        return {key: _stable(value) for key, value in tree.items() if key not in VOLATILE_KEYS}
    if isinstance(tree, list):
        return [_stable(value) for value in tree]
    return tree


def _plan_checks(
    manifest: pd.DataFrame, near_pairs: pd.DataFrame, data: DataConfig, validation: ValidationConfig,
    registry: pd.DataFrame | None = None,
) -> dict[str, _CheckPlan]:
    """Every check, keyed by its name in config.Severities; building them is cheap, GX runs only the kept ones.

    Each expectation's meta["failure"] is the sentence reported when it fails; "{n}" becomes the failing row count.
    """
    gxe = _import_gx().expectations
    task = task_for(data.task, data.labels)

    mean, min_std = validation.intensity_mean, validation.min_intensity_std
    distance, min_side, size = validation.near_duplicate_distance, validation.min_original_side, data.image_size
    modalities, views = ", ".join(validation.allowed_modalities), ", ".join(validation.allowed_views)
    registry_check = {} if registry is None else {
        "split_registry": _CheckPlan(_registry_agreement(manifest, registry), "patient_hash", "patients", [
            gxe.ExpectColumnValuesToBeBetween(
                column="recorded", min_value=1,
                meta={"failure": "{n} patient(s) missing from data/splits.parquet: rerun ingest"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="moved", max_value=0,
                meta={"failure": "{n} patient(s) in a split other than data/splits.parquet records: the manifest "
                                 "and the registry disagree; rerun ingest (README: Splits that never move)"}),
        ]),
    }
    return {
        "required_columns_present": _CheckPlan(manifest, "image_id", "images", [
            # Missing columns already raised in run_validation; this keeps the schema in results.json.
            gxe.ExpectTableColumnsToMatchSet(
                column_set=list(REQUIRED_COLUMNS), exact_match=False,
                meta={"failure": "the manifest lacks required columns"}),
            gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"failure": "the manifest has no images"}),
            *[gxe.ExpectColumnValuesToNotBeNull(column=column, meta={"failure": f"{{n}} image(s) with no {column}"})
              for column in KEY_COLUMNS],
        ]),
        "labels_in_set": _CheckPlan(task.label_rows(manifest), "image_id", "image labels", [
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=list(data.labels),
                meta={"failure": f"{{n}} {task.label_rows_noun} outside {', '.join(data.labels)}"}),
        ]),
        "cross_split_duplicates": _CheckPlan(_splits_per_value(manifest, "sha256"), "sha256", "sha256 values", [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_splits", max_value=1,
                meta={"failure": "{n} sha256 value(s) occur in more than one split"}),
        ]),
        "patient_leakage": _CheckPlan(_splits_per_value(manifest, "patient_hash"), "patient_hash", "patients", [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_splits", max_value=1,
                meta={"failure": "{n} patient(s) have images in more than one split"}),
        ]),
        **registry_check,
        "splits_complete": _CheckPlan(_split_completeness(task.label_rows(manifest), data.labels), "split", "splits", [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_labels", min_value=len(data.labels),
                meta={"failure": f"{{n}} of train/val/test lack images of some label ({', '.join(data.labels)}): "
                                 "add data, or check data.split and data.patient_pattern"}),
        ]),
        "class_ratio": _class_ratio_check(task.label_balance(manifest), validation, gxe),
        "intensity": _CheckPlan(manifest, "image_id", "images", [
            gxe.ExpectColumnValuesToBeBetween(
                column="mean_intensity", min_value=mean.min, max_value=mean.max,
                meta={"failure": f"{{n}} image(s) with mean intensity outside [{mean.min:g}, {mean.max:g}]"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="std_intensity", min_value=min_std,
                meta={"failure": f"{{n}} image(s) with intensity std below {min_std:g} (blank)"}),
        ]),
        "near_duplicates": _CheckPlan(_near_duplicate_table(manifest, near_pairs), "image_id", "images", [
            gxe.ExpectColumnValuesToBeBetween(
                column="near_same_split", max_value=0,
                meta={"failure": f"{{n}} image(s) with a near-duplicate (perceptual hash within {distance} bits) "
                                 "in their own split"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="near_other_split", max_value=0,
                meta={"failure": f"{{n}} image(s) with a near-duplicate (perceptual hash within {distance} bits) "
                                 "in another split"}),
        ]),
        "image_size": _CheckPlan(_original_sides(manifest), "image_id", "images", [
            gxe.ExpectColumnValuesToBeBetween(
                column="original_side", min_value=min_side,
                meta={"failure": f"{{n}} image(s) with an original side below {min_side} px "
                                 "(a thumbnail, not a film)"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="original_side", min_value=size,
                meta={"failure": f"{{n}} image(s) smaller than data.image_size ({size} px) before resizing: "
                                 "stored upsampled, so blurrier than the stored size suggests"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="bits_stored", min_value=8, max_value=16,
                meta={"failure": "{n} image(s) with a bit depth outside 8 to 16 bits"}),
        ]),
        "modality_and_view": _CheckPlan(_modality_and_view(manifest), "image_id", "images", [
            # An unknown modality or view (PNG, JPEG, a header without it) is null here, and GX skips nulls.
            gxe.ExpectColumnValuesToBeInSet(
                column="modality", value_set=[m.upper() for m in validation.allowed_modalities],
                meta={"failure": f"{{n}} image(s) with a DICOM modality outside {modalities}"}),
            gxe.ExpectColumnValuesToBeInSet(
                column="view", value_set=[v.upper() for v in validation.allowed_views],
                meta={"failure": f"{{n}} image(s) with a DICOM view position outside {views}"}),
        ]),
    }


def _class_ratio_check(balance: LabelBalance, validation: ValidationConfig, gxe) -> _CheckPlan:
    """Each fraction the task balances (binary: the positive label's per split; else each label's per split)
    within validation.class_ratio."""
    ratio = validation.class_ratio
    return _CheckPlan(balance.table, balance.key, balance.noun, [
        gxe.ExpectColumnValuesToBeBetween(
            column=balance.column, min_value=ratio.min, max_value=ratio.max,
            meta={"failure": f"{{n}} {balance.failure} outside [{ratio.min:g}, {ratio.max:g}]"}),
    ])


def _run_gx(plans: dict[str, _CheckPlan], docs_dir: Path) -> dict[str, ExpectationSuiteValidationResult]:
    """One suite, asset and validation definition per check, all in a throwaway in-memory GX context.

    Its one Data Docs site is moved from a temporary folder to `docs_dir` and rebuilt from these results.
    """
    gx = _import_gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # else a tqdm bar per suite run
    context.update_data_docs_site("local_site", {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("cxr")
    run_id = RunIdentifier(run_name="validate")  # one run in Data Docs, not one per check
    results = {}
    for name, plan in plans.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in plan.expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        results[name] = definition.run(
            batch_parameters={"dataframe": plan.table},
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [plan.row_id]},
            run_id=run_id,
        )
    shutil.rmtree(docs_dir, ignore_errors=True)  # page paths hold the run time: drop the last run's pages
    context.build_data_docs(site_names=["local_site"])
    return results


def _import_gx():
    """Import great_expectations (slow, so only when validating) with its usage analytics and INFO logs off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: importing logs too
    import great_expectations as gx

    # This one module sets its own logger to INFO when imported, then announces every new context.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx


def _describe(plan: _CheckPlan, result: ExpectationSuiteValidationResult) -> str:
    """One sentence from the GX result: what failed and how often, or how many rows passed."""
    if result.success:
        return f"all {len(plan.table)} {plan.subject} pass"
    problems = []
    for outcome in result.results:  # GX does not keep the suite's order
        if outcome.success:
            continue
        error = _exception_message(outcome.exception_info)
        if error:
            problems.append(f"{outcome.expectation_config.type} could not run ({error.splitlines()[0]})")
        else:
            count = outcome.result.get("unexpected_count")
            problems.append(outcome.expectation_config.meta["failure"].replace("{n}", str(count)))
    return "; ".join(sorted(problems))


def _exception_message(exception_info: dict) -> str | None:
    """GX reports an expectation's own error flat, but a metric's error keyed by that metric's id."""
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    messages = [info["exception_message"] for info in infos if info.get("raised_exception")]
    return messages[0] if messages else None


def _splits_per_value(manifest: pd.DataFrame, column: str) -> pd.DataFrame:
    """How many distinct splits each value of `column` (sha256, patient_hash) appears in."""
    counts = manifest.groupby(column)["split"].nunique()
    return pd.DataFrame({column: counts.index.astype(str), "n_splits": counts.to_numpy()})


def _registry_agreement(manifest: pd.DataFrame, registry: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: recorded (1 when the split registry knows them) and moved (1 when none of their films
    is in the split it records; films straddling splits are patient_leakage's to report)."""
    patients = pd.unique(manifest["patient_hash"])
    moved = set(moved_patients(manifest, registry)["patient_hash"])
    known = set(registry["patient_hash"])
    return pd.DataFrame({"patient_hash": patients.astype(str),
                         "recorded": [int(p in known) for p in patients],
                         "moved": [int(p in moved) for p in patients]})


def _split_completeness(label_rows: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """train, val and test, each with how many of the labels its films carry (0 for a missing split)."""
    held = label_rows[label_rows["label"].isin(labels)].groupby("split")["label"].nunique()
    splits = ["train", "val", "test"]
    return pd.DataFrame({"split": splits, "n_labels": [int(held.get(split, 0)) for split in splits]})


def _near_duplicate_pairs(manifest: pd.DataFrame, images: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Pairs of different films (sha256) whose perceptual hashes differ in at most `max_distance` bits.

    One row per (split, sha256) takes part, so identical copies, counted as exact duplicates, do not multiply pairs.
    """
    hashes = phash(images)[manifest["store_index"].to_numpy()]
    films = manifest.assign(phash=hashes).drop_duplicates(["split", "sha256"]).reset_index(drop=True)
    pairs = close_pairs(films["phash"].to_numpy(), max_distance)
    a, b = films.iloc[pairs[:, 0]], films.iloc[pairs[:, 1]]
    table = pd.DataFrame({
        "split_a": a["split"].to_numpy(), "sha256_a": a["sha256"].to_numpy(),
        "split_b": b["split"].to_numpy(), "sha256_b": b["sha256"].to_numpy(),
    })
    return table[table["sha256_a"] != table["sha256_b"]].reset_index(drop=True)


def _near_duplicate_table(manifest: pd.DataFrame, near_pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per image: how many near-duplicates its film has in its own split and in other splits."""
    same = (near_pairs["split_a"] == near_pairs["split_b"]).to_numpy()
    ends = pd.concat([
        pd.DataFrame({"split": near_pairs[f"split_{end}"], "sha256": near_pairs[f"sha256_{end}"],
                      "near_same_split": same, "near_other_split": ~same})
        for end in ("a", "b")
    ])
    counts = ends.groupby(["split", "sha256"], as_index=False)[["near_same_split", "near_other_split"]].sum()
    table = manifest[["image_id", "split", "sha256"]].merge(counts, on=["split", "sha256"], how="left")
    return table.fillna({"near_same_split": 0, "near_other_split": 0}).astype(
        {"near_same_split": int, "near_other_split": int})


def _original_sides(manifest: pd.DataFrame) -> pd.DataFrame:
    """Each image's shorter side as decoded, before resizing to data.image_size, and its bit depth."""
    return pd.DataFrame({"image_id": manifest["image_id"], "original_side": manifest[["width", "height"]].min(axis=1),
                         "bits_stored": manifest["bits_stored"]})


def _modality_and_view(manifest: pd.DataFrame) -> pd.DataFrame:
    """DICOM modality and view position in capitals; unknown (empty) becomes null so that it is not checked."""
    def known(column: str) -> pd.Series:
        values = manifest[column].fillna("").astype(str).str.strip().str.upper()
        return values.where(values != "", None)

    return pd.DataFrame({"image_id": manifest["image_id"], "modality": known("modality"), "view": known("view")})


def _split_rank(split: str) -> tuple[int, str]:
    """train, val, test first, in that order; any other split (e.g. unlabelled) after them by name."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _pair_name(first: str, second: str) -> str:
    """"train/val", never "val/train": pairs read in pipeline order."""
    return "/".join(sorted((first, second), key=_split_rank))


def _duplicate_counts(manifest: pd.DataFrame, near_pairs: pd.DataFrame) -> dict:
    """Exact (sha256) and near (perceptual hash) duplicates, in total and per split or pair of splits.

    exact_within: copies beyond the first in a split; exact_cross: sha256 values found in more than one
    split (per pair: values shared by the two); near: pairs of different films.
    """
    splits = sorted(set(manifest["split"].astype(str)), key=_split_rank)
    pairs = [_pair_name(a, b) for a, b in combinations(splits, 2)]
    copies = manifest[manifest.duplicated(["split", "sha256"])]["split"].astype(str)
    films = manifest.drop_duplicates(["split", "sha256"])
    shared = films[films.duplicated("sha256", keep=False)].groupby("sha256")["split"].agg(list)
    shared_pairs = Counter(_pair_name(a, b) for held in shared for a, b in combinations(held, 2))
    near_same = near_pairs[near_pairs["split_a"] == near_pairs["split_b"]]["split_a"].astype(str)
    near_cross = near_pairs[near_pairs["split_a"] != near_pairs["split_b"]]
    near_cross_pairs = Counter(_pair_name(a, b) for a, b in zip(near_cross["split_a"], near_cross["split_b"]))
    return {
        "exact_within_split": len(copies),
        "exact_cross_split": int((_splits_per_value(manifest, "sha256")["n_splits"] > 1).sum()),
        "near_within_split": len(near_same),
        "near_cross_split": len(near_cross),
        "exact_within_by_split": {split: int((copies == split).sum()) for split in splits},
        "exact_cross_by_pair": {pair: shared_pairs[pair] for pair in pairs},
        "near_within_by_split": {split: int((near_same == split).sum()) for split in splits},
        "near_cross_by_pair": {pair: near_cross_pairs[pair] for pair in pairs},
    }


# The gate's DVC metrics file, next to summary.json: a few numbers, so `dvc exp show` stays readable.
COUNTS_FILE = "counts.json"
COUNTED_DUPLICATES = ("exact_cross_split", "near_cross_split", "exact_within_split", "near_within_split", "dropped_by_dedupe")


def gate_counts(summary: dict) -> dict[str, int]:
    """The summary's headline counts, numbers only (DVC shows every leaf of a metrics file as a column of
    `dvc exp show`; the severities, per-split and per-pair details stay in summary.json)."""
    failed = [check["severity"] for check in summary["checks"].values() if not check["success"]]
    return {"passed": int(summary["passed"]), "n_images": summary["n_images"],
            "failed_blocking": failed.count("blocking"), "failed_warning": failed.count("warning"),
            "patient_leakage": summary["patient_leakage"],
            **{name: summary["duplicates"][name] for name in COUNTED_DUPLICATES}}


def _build_summary(
    manifest: pd.DataFrame, near_pairs: pd.DataFrame, data: DataConfig, checks: list[CheckResult], passed: bool,
    dropped: pd.DataFrame | None = None,
) -> dict:
    """Plain-JSON counts (no numpy types) so that a rerun on the same manifest writes the same bytes.

    Per split, how its labels are spread is the task's (binary: the positive label's fraction; else every label's).
    `label_review`: how many films a reviewer's decision relabelled, per split and label (pipeline.overrides).
    """
    task = task_for(data.task, data.labels)
    dropped = dropped if dropped is not None else pd.DataFrame(columns=["split", "sha256"])
    as_found = pd.concat([manifest[["split", "sha256"]], dropped[["split", "sha256"]]], ignore_index=True)
    duplicates = _duplicate_counts(as_found, near_pairs)
    duplicates["dropped_by_dedupe"] = len(dropped)
    return {
        "passed": passed,
        "n_images": len(manifest),
        "per_split": task.split_summaries(manifest),
        "duplicates": duplicates,
        "patient_leakage": int((_splits_per_value(manifest, "patient_hash")["n_splits"] > 1).sum()),
        "checks": {check.name: {"severity": check.severity, "success": check.success} for check in checks},
        "label_review": review_shares(manifest, task),
    }
