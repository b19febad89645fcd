"""Validate: the data-quality gate between ingest and training, run as great-expectations checks.

Each check is one GX expectation suite run on the manifest or on a small table derived from it
(one row per split, per sha256 or per patient). A failed `blocking` check stops the pipeline, a
failed `warning` check is only reported, an `ignore` check is not run (`validation.severity`).
Outputs: results.json (the full GX results) and summary.json (counts a person reads first).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.config import Config, DataConfig, ValidationConfig
from pipeline.errors import CxrError
from pipeline.files import write_json
from pipeline.ingest import MANIFEST_COLUMNS
from pipeline.paths import ProjectPaths

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

REQUIRED_COLUMNS = tuple(MANIFEST_COLUMNS)
KEY_COLUMNS = (
    "store_index", "image_id", "split", "label", "label_index", "patient_hash", "sha256",
    "mean_intensity", "std_intensity",
)


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


@dataclass(frozen=True)
class _CheckPlan:
    """One check before it runs: the table GX validates and the expectations on it."""

    table: pd.DataFrame
    row_id: str  # the column that names a failing row in results.json
    subject: str  # what one row of `table` is, for the success sentence, e.g. "images"
    expectations: list[Expectation]


def validate_stage(paths: ProjectPaths, config: Config) -> GateResult:
    """Validate the ingested manifest; raise CxrError naming the failed blocking checks."""
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run ingest first")
    manifest = pd.read_parquet(paths.manifest)
    gate = run_validation(manifest, config.data, config.validation, paths.validation_dir)
    if not gate.passed:
        failed = [f"{c.name} ({c.details})" for c in gate.checks if c.severity == "blocking" and not c.success]
        raise CxrError(f"data validation failed: {'; '.join(failed)}. Details: {gate.results_path}")
    return gate


def run_validation(manifest: pd.DataFrame, data: DataConfig, validation: ValidationConfig, out_dir: Path) -> GateResult:
    """Run every non-ignored check through GX and write results.json and summary.json to out_dir."""
    missing = [column for column in REQUIRED_COLUMNS if column not in manifest.columns]
    if missing:
        # Nothing else can be computed without these; the ingest stage that wrote the manifest is out of date.
        raise CxrError(f"the manifest lacks column(s) {', '.join(missing)}: rerun ingest")
    severities = validation.severity.model_dump()
    all_plans = _plan_checks(manifest, data, validation)
    plans = {name: plan for name, plan in all_plans.items() if severities[name] != "ignore"}
    gx_results = _run_gx(plans)
    checks = [
        CheckResult(name, severities[name], gx_results[name].success, _describe(plan, gx_results[name]))
        for name, plan in plans.items()
    ]
    passed = not any(check.severity == "blocking" and not check.success for check in checks)
    summary = _build_summary(manifest, data.positive_label, checks, passed)

    results_path, summary_path = out_dir / "results.json", out_dir / "summary.json"
    results = {c.name: {"severity": c.severity, "details": c.details, "result": _stable(gx_results[c.name].to_json_dict())}
               for c in checks}
    write_json(results_path, results)
    write_json(summary_path, summary)
    return GateResult(passed, checks, summary, results_path, summary_path)


VOLATILE_KEYS = {"id", "run_id", "validation_id", "validation_time", "ge_load_time"}


def _stable(tree):
    """GX results without the ids and timestamps that change every run, so identical data gives identical files."""
    if isinstance(tree, dict):
        return {key: _stable(value) for key, value in tree.items() if key not in VOLATILE_KEYS}
    if isinstance(tree, list):
        return [_stable(value) for value in tree]
    return tree


def _plan_checks(manifest: pd.DataFrame, data: DataConfig, validation: ValidationConfig) -> dict[str, _CheckPlan]:
    """Every check, keyed by its name in config.Severities; building them is cheap, GX runs only the kept ones.

    Each expectation's meta["failure"] is the sentence reported when it fails; "{n}" becomes the failing row count.
    """
    gxe = _import_gx().expectations

    mean, min_std, ratio = validation.intensity_mean, validation.min_intensity_std, validation.class_ratio
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
        "labels_in_set": _CheckPlan(manifest, "image_id", "images", [
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=list(data.labels),
                meta={"failure": f"{{n}} image(s) with a label outside {', '.join(data.labels)}"}),
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
        "splits_complete": _CheckPlan(_split_completeness(manifest, data.labels), "split", "splits", [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_labels", min_value=len(data.labels),
                meta={"failure": f"{{n}} of train/val/test lack images of some label ({', '.join(data.labels)}): "
                                 "add data, or check data.split and data.patient_pattern"}),
        ]),
        "class_ratio": _CheckPlan(_split_table(manifest, data.positive_label), "split", "splits", [
            gxe.ExpectColumnValuesToBeBetween(
                column="positive_fraction", min_value=ratio.min, max_value=ratio.max,
                meta={"failure": f"{{n}} split(s) with a '{data.positive_label}' fraction "
                                 f"outside [{ratio.min:g}, {ratio.max:g}]"}),
        ]),
        "intensity": _CheckPlan(manifest, "image_id", "images", [
            gxe.ExpectColumnValuesToBeBetween(
                column="mean_intensity", min_value=mean.min, max_value=mean.max,
                meta={"failure": f"{{n}} image(s) with mean intensity outside [{mean.min:g}, {mean.max:g}]"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="std_intensity", min_value=min_std,
                meta={"failure": f"{{n}} image(s) with intensity std below {min_std:g} (blank)"}),
        ]),
    }


def _run_gx(plans: dict[str, _CheckPlan]) -> dict[str, ExpectationSuiteValidationResult]:
    """One suite, asset and validation definition per check, all in a throwaway in-memory GX context."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # else a tqdm bar per suite run
    source = context.data_sources.add_pandas("cxr")
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
        )
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


def _split_table(manifest: pd.DataFrame, positive_label: str) -> pd.DataFrame:
    """One row per split present: its image count and the fraction labelled `positive_label`."""
    positive = (manifest["label"] == positive_label).groupby(manifest["split"])
    return pd.DataFrame({
        "split": positive.size().index.astype(str),
        "n_images": positive.size().to_numpy(),
        "positive_fraction": positive.mean().to_numpy(),
    })


def _split_completeness(manifest: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """train, val and test, each with how many of the labels it holds (0 for a missing split)."""
    held = manifest[manifest["label"].isin(labels)].groupby("split")["label"].nunique()
    splits = ["train", "val", "test"]
    return pd.DataFrame({"split": splits, "n_labels": [int(held.get(split, 0)) for split in splits]})


def _build_summary(manifest: pd.DataFrame, positive_label: str, checks: list[CheckResult], passed: bool) -> dict:
    """Plain-JSON counts (no numpy types) so that a rerun on the same manifest writes the same bytes."""
    splits = _split_table(manifest, positive_label)
    return {
        "passed": passed,
        "n_images": len(manifest),
        "per_split": {
            row.split: {"n": int(row.n_images), "positive_fraction": float(row.positive_fraction)}
            for row in splits.itertuples()
        },
        "duplicates": {
            "exact_within_split": int(manifest.duplicated(["split", "sha256"]).sum()),
            "exact_cross_split": int((_splits_per_value(manifest, "sha256")["n_splits"] > 1).sum()),
        },
        "patient_leakage": int((_splits_per_value(manifest, "patient_hash")["n_splits"] > 1).sum()),
        "checks": {check.name: {"severity": check.severity, "success": check.success} for check in checks},
    }
