"""Monitoring: one JSON line per answered film, appended by `cxr predict` and by the served model, and the summary
`cxr monitor` prints from them (volume, what was refused and why, labels, and score drift against validation).

A record holds no identifier: no path, no UID, no header value, no reason text (a reason can quote a header value),
only its code (`modality`, `ood`, `decode_failed`, ...). Its fields: `time` (UTC, ISO 8601), `source` (`predict`
or `serve`), `model` and `run_id` (the registered name and the training run, from the model's `model_config`),
`answer` (`classified`, `out_of_scope` or `error`), `reason`, `label`, `probability` and `ood_score` (null where
the answer has none).

Where: `$CXR_MONITOR_LOG` when set (`off` turns logging off); otherwise `cxr predict` appends to the project's
reports/monitoring/predictions.jsonl and the served model logs nothing (it warns once when loaded). Writers append
whole lines in one write() under an exclusive lock, so several server workers and a `cxr predict` can share a file.
A log that cannot be written is a warning, never a failed prediction.

This module ships inside the registered model (pipeline.register.SERVING_MODULES): the summary's heavier imports
(scipy, MLflow's registry) are made inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOG_ENV = "CXR_MONITOR_LOG"
ANSWERS = ("classified", "out_of_scope", "error")
MIN_FILMS = 30  # fewer logged scores than this and a drift test says too little to flag anything
DRIFT_P = 0.01


@dataclass(frozen=True)
class ModelIdentity:
    """What a record says about the model: its registered name and training run (never a file path)."""

    model: str | None = None
    run_id: str | None = None

    @classmethod
    def from_config(cls, model_config: dict | None) -> ModelIdentity:
        identity = (model_config or {}).get("identity") or {}
        return cls(identity.get("model"), identity.get("run_id"))


def log_path(default: Path | None) -> Path | None:
    """$CXR_MONITOR_LOG when set ('off' or empty: no log), else `default` (None: no log)."""
    from pipeline.config import monitor_log_setting

    value = monitor_log_setting()
    if value is None:
        return default
    return None if value.strip() in ("", "off") else Path(value)


def project_log(root: Path) -> Path:
    """Where `cxr predict` and `cxr monitor` look when $CXR_MONITOR_LOG is not set."""
    return root / "reports" / "monitoring" / "predictions.jsonl"


def reason_code(reason: str | None) -> str | None:
    """`modality: CT is not one of CR, DX` → `modality`: the code, never the text (it may quote a header)."""
    return reason.split(":", 1)[0].strip() or None if reason else None


def film_record(identity: ModelIdentity, source: str, *, error: str | None = None, out_of_scope: str | None = None,
                label: str | None = None, probability: float | None = None, ood_score: float | None = None,
                now: datetime | None = None) -> dict:
    """One film's record. An error wins over out_of_scope, which wins over a label, as in the answer itself."""
    answer = "error" if error else "out_of_scope" if out_of_scope else "classified"
    classified = answer == "classified"
    return {"time": (now or datetime.now(UTC)).isoformat(), "source": source, "model": identity.model,
            "run_id": identity.run_id, "answer": answer, "reason": reason_code(error or out_of_scope),
            "label": (None if label is None else str(label)) if classified else None,
            "probability": _number(probability) if classified else None, "ood_score": _number(ood_score)}


def table_records(table, identity: ModelIdentity, source: str = "serve") -> list[dict]:
    """The served answer table (pipeline.serving) → one record per row; `ood_score` when the table has it."""
    records = []
    for row in table.to_dict("records"):
        records.append(film_record(identity, source, error=row.get("error") or None, out_of_scope=row.get("out_of_scope") or None,
                                   label=row.get("label"), probability=row.get("probability"), ood_score=row.get("ood_score")))
    return records


def prediction_records(predictions: list, identity: ModelIdentity) -> list[dict]:
    """`cxr predict`'s answers (pipeline.predict.Prediction) → one record each; their paths stay out."""
    return [film_record(identity, "predict", error=p.error, out_of_scope=p.out_of_scope, label=p.label,
                        probability=p.probability, ood_score=getattr(p, "ood_score", None)) for p in predictions]


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines: one write() of all of them, on a file opened O_APPEND, under an exclusive flock, so that
    concurrent writers (server workers, a `cxr predict`) never interleave inside a line. Raises OSError."""
    import fcntl

    if not records:
        return
    data = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:  # a regular file takes it in one write; the loop only guards a short write
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # releases the lock


def try_append(path: Path | None, records: list[dict]) -> bool:
    """append_records, with a failure logged as a warning: monitoring never fails the answer it records."""
    if path is None:
        return False
    try:
        append_records(path, records)
        return True
    except (OSError, ValueError) as exc:
        log.warning("could not append %d monitoring record(s) to %s: %s", len(records), path, exc)
        return False


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --- the summary (`cxr monitor`) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What a model's answers are compared with: its validation films' OOD scores and probabilities (or None)."""

    version: str | None = None
    ood_scores: list[float] | None = None
    probabilities: list[float] | None = None


def read_records(path: Path, since: datetime | None = None, until: datetime | None = None) -> tuple[list[dict], int]:
    """The records with since <= time < until, and how many lines could not be read."""
    from pipeline.errors import CxrError

    if not path.is_file():
        raise CxrError(f"no monitoring log at {path}: `cxr predict` writes one there (or set ${LOG_ENV})")
    records, unreadable = [], 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
                when = datetime.fromisoformat(record["time"])
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            if (since is None or when >= since) and (until is None or when < until):
                records.append(record)
    return records, unreadable


def summarise(records: list[dict], references: dict[tuple, Reference]) -> dict:
    """Volume, shares of answers, reasons and labels, and per model the drift of OOD scores and probabilities
    against its validation films (two-sample Kolmogorov-Smirnov). `references` is keyed by (model, run_id)."""
    n = len(records)
    answers = Counter(record.get("answer") for record in records)
    summary: dict = {"films": n, "answers": {kind: answers.get(kind, 0) for kind in ANSWERS},
                     "share_out_of_scope": _share(answers.get("out_of_scope", 0), n),
                     "share_error": _share(answers.get("error", 0), n)}
    for kind in ("out_of_scope", "error"):
        reasons = Counter(r.get("reason") or "unknown" for r in records if r.get("answer") == kind)
        summary[f"{kind}_reasons"] = {reason: _share(count, n) for reason, count in reasons.most_common()}
    classified = [r for r in records if r.get("answer") == "classified"]
    labels = Counter(str(r.get("label")) for r in classified)
    summary["label_shares"] = {label: _share(count, len(classified)) for label, count in labels.most_common()}
    models = []
    for key in sorted({(r.get("model"), r.get("run_id")) for r in records}, key=str):
        mine = [r for r in records if (r.get("model"), r.get("run_id")) == key]
        reference = references.get(key, Reference())
        scores = [r["ood_score"] for r in mine if _number(r.get("ood_score")) is not None]
        probabilities = [r["probability"] for r in mine if r.get("answer") == "classified" and _number(r.get("probability")) is not None]
        models.append({"model": key[0], "run_id": key[1], "version": reference.version, "films": len(mine),
                       "ood_score_drift": drift(scores, reference.ood_scores),
                       "probability_drift": drift(probabilities, reference.probabilities)})
    summary["models"] = models
    summary["drift"] = any(m[test]["drift"] for m in models for test in ("ood_score_drift", "probability_drift"))
    return summary


def drift(logged: list[float], reference: list[float] | None) -> dict:
    """A two-sample KS test of the logged values against the reference; drift when p < DRIFT_P on enough films."""
    if not reference:
        return {"drift": False, "n": len(logged), "note": "no reference (the model records no validation values)"}
    if len(logged) < MIN_FILMS:
        return {"drift": False, "n": len(logged), "n_reference": len(reference),
                "note": f"too few films to test (fewer than {MIN_FILMS})"}
    from scipy.stats import ks_2samp

    test = ks_2samp(logged, reference)
    p = float(test.pvalue)
    return {"drift": p < DRIFT_P, "n": len(logged), "n_reference": len(reference), "ks_statistic": round(float(test.statistic), 4),
            "p_value": p, "note": f"drift (KS p < {DRIFT_P})" if p < DRIFT_P else "no drift detected"}


def model_references(paths, keys: set[tuple]) -> dict[tuple, Reference]:  # paths: pipeline.paths.ProjectPaths
    """For each (model, run_id) logged: its registered version, the validation OOD scores its metadata holds
    (`metadata["ood"]["validation_scores"]`) and, when it is the project's current model, the validation
    probabilities of reports/predictions.csv (binary tasks)."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    named = [(name, run_id) for name, run_id in keys if name and run_id]
    client = tracking.client(paths) if named else None
    references = {}
    for name, run_id in named:
        try:
            versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        except MlflowException:
            versions = []
        version = str(versions[0].version) if versions else None
        scores = _validation_scores(paths, name, version) if version else None
        references[(name, run_id)] = Reference(version, scores, _validation_probabilities(paths, run_id))
    return references


def _validation_scores(paths, name: str, version: str) -> list[float] | None:
    import mlflow.models

    from pipeline import tracking

    try:
        with tracking.fluent_store(paths):
            metadata = mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {}
    except Exception as exc:  # noqa: BLE001 - a model that cannot be read only loses its reference
        log.warning("could not read the metadata of %s version %s: %s", name, version, exc)
        return None
    scores = (metadata.get("ood") or {}).get("validation_scores")
    return [float(s) for s in scores] if scores else None


def _validation_probabilities(paths, run_id: str) -> list[float] | None:
    """reports/predictions.csv's validation probabilities, only if it is this run's (models/run.json says)."""
    import pandas as pd

    from pipeline import tracking

    try:
        if tracking.read_run_id(paths) != run_id or not paths.predictions.is_file():
            return None
        table = pd.read_csv(paths.predictions)
    except Exception:  # noqa: BLE001 - no current run, or no predictions: no reference
        return None
    if "probability" not in table.columns:
        return None
    return table.loc[table["split"] == "val", "probability"].dropna().astype(float).tolist() or None


def parse_day(text: str | None, name: str, end: bool = False) -> datetime | None:
    """`2026-12-01` or an ISO timestamp → an aware datetime (UTC unless it says otherwise). A bare date is its
    midnight, or with `end` the next midnight, so that `--until 2026-12-01` includes that day."""
    from datetime import timedelta

    from pipeline.errors import CxrError

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CxrError(f"{name}: '{text}' is not a date (YYYY-MM-DD) or an ISO timestamp") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when + timedelta(days=1) if end and len(text.strip()) == 10 else when


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0
