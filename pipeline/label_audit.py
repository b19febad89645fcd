"""Label audit: find training and validation films whose label is probably wrong, for a person to review.

Why: public chest X-ray sets carry label noise (text-mined labels, one grader's slip), and a model trained on
them learns the noise. Confident learning (Northcutt et al. 2021, the `cleanlab` package) finds it from
out-of-fold probabilities: each film is scored by a model that never saw it, and a film whose given label that
model finds much less likely than the noise rates between classes explain is flagged.

The out-of-fold models are `cxr crossval`'s (pipeline.crossval): train+val pooled, folds by patient, one model per
fold under models/crossval/fold-<k>/, kept while its stamp says it learned from today's films, labels and training
params, else trained again. The test split is never read.

Writes reports/label_issues.csv, most suspicious first: every film cleanlab flags (`cleanlab.filter.find_label_issues`,
pruned by noise rate) or that has a near-duplicate (pipeline.phash, validation.near_duplicate_distance bits) carrying
another label, with columns:
- `path`, `source`, `split`: the film as the manifest names it (paths are redacted there already);
- `label`: the given label; `suggested_label`: the out-of-fold model's (binary and multiclass: its most probable
  class; multilabel: the labels it gives at least 0.5, joined by '|');
- `score`: cleanlab's label quality score (`get_label_quality_scores`, self-confidence: the out-of-fold probability
  of the given label, after `adjust_pred_probs` subtracts each class's confident threshold, its average probability
  among the films labelled so, and renormalises; multilabel: cleanlab's per-label scores pooled by its exponential
  moving average), 0..1, lower is more suspicious; the rows are sorted on it. Why adjusted: a fold checkpoint is its
  best-AUC epoch, which on easy data is an early one that ranks films well but leans to one class (every
  probability near 0.55 pneumonia, say); unadjusted, every film of the other class would then look suspicious;
- `duplicate_of`: the path of the nearest near-duplicate carrying another label, or empty.
The counts go to their own MLflow run in the project's experiment, tagged `cxr.audit: labels`.

reports/label_review.html (pipeline/templates/label_review.html.j2) shows the first `top` rows as thumbnails with a
Grad-CAM overlay from the fold model that did not see the film, and the `cxr review` command that records a decision.
"""

from __future__ import annotations

import base64
import io
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.paths import ProjectPaths
from pipeline.tasks import Task

log = logging.getLogger(__name__)

COLUMNS = ["path", "source", "split", "label", "suggested_label", "score", "duplicate_of"]
AUDITED_SPLITS = ("train", "val")
PREDICT_CHUNK = 1024  # films read from the store and scored at a time: memory stays flat however large the set
THUMBNAIL_SIDE = 192  # px: a 28 px film is unreadable at its own size
MULTILABEL_CUT = 0.5  # a multilabel suggestion keeps the labels the out-of-fold model gives at least this


@dataclass(frozen=True)
class AuditResult:
    issues: pd.DataFrame  # label_issues.csv's rows, in its order
    issues_path: Path
    review_path: Path
    n_films: int  # films audited (train + val)
    n_flagged: int  # flagged by confident learning
    n_conflicting_duplicates: int  # with a near-duplicate of another label
    folds_trained: int  # fold models trained by this run (the others were kept)
    run_id: str


def audit_labels_stage(paths: ProjectPaths, config: Config, folds: int = 5, top: int = 60) -> AuditResult:
    """Out-of-fold probabilities, confident learning, label_issues.csv, label_review.html and an MLflow run.

    Holds the project lock throughout, as `cxr crossval` does (its fold projects are the same folders)."""
    from pipeline.lock import project_lock

    if top < 0:
        raise CxrError(f"audit-labels: --top must be 0 or more, not {top}")
    with project_lock(paths.root):
        return _audit(paths, config, folds, top)


def _audit(paths: ProjectPaths, config: Config, folds: int, top: int) -> AuditResult:
    from pipeline.crossval import assign_folds
    from pipeline.manifest import read_manifest
    from pipeline.tasks import task_for

    if folds < 2:
        raise CxrError(f"audit-labels: --folds must be at least 2, not {folds}")
    if not paths.manifest.exists() or not paths.images.exists():
        raise CxrError(f"{paths.manifest} or {paths.images} is missing: run `cxr ingest` first")
    task = task_for(config.data.task, config.data.labels)
    manifest = read_manifest(paths.manifest, task.name, task.labels)
    pooled = manifest["split"].isin(AUDITED_SPLITS)
    films = manifest[pooled]
    if films.empty:
        raise CxrError(f"audit-labels: {paths.manifest} has no train or val films to audit")
    fold_of = assign_folds(films, folds, config.data.seed)
    images = np.load(paths.images, mmap_mode="r")

    probability, checkpoints, trained = _out_of_fold(paths, config, task, manifest, pooled, fold_of, images, folds)
    films = films.reset_index(drop=True)
    score, flagged, suggested = label_quality(task, films, probability)
    duplicate_of = conflicting_duplicates(films, images, config.validation.near_duplicate_distance)
    table = films[["path", "source", "split", "label"]].assign(
        suggested_label=suggested, score=score, duplicate_of=duplicate_of, fold=fold_of.to_numpy(),
        store_index=films["store_index"].to_numpy())
    # A film a reviewer already decided (cxr review: label_source `override`) is not suggested again.
    undecided = (films["label_source"] != "override").to_numpy()
    issues = table[(flagged | (duplicate_of != "")) & undecided].sort_values(["score", "path"], kind="stable")

    issues_path = paths.reports / "label_issues.csv"
    with atomic_path(issues_path) as tmp:
        issues[COLUMNS].to_csv(tmp, index=False, float_format="%.6g")
    review_path = paths.reports / "label_review.html"
    write_review(review_path, task, issues.head(top), images, checkpoints, len(films))
    result = AuditResult(issues[COLUMNS].reset_index(drop=True), issues_path, review_path, len(films),
                         int(flagged.sum()), int((duplicate_of != "").sum()), trained, "")
    run_id = _log_to_mlflow(paths, config, task, issues, result, folds, top)
    log.info("audit-labels: %d of %d train+val films flagged, %d with a near-duplicate of another label → %s, %s",
             result.n_flagged, result.n_films, result.n_conflicting_duplicates, issues_path, review_path)
    return AuditResult(**{**result.__dict__, "run_id": run_id})


def _out_of_fold(paths: ProjectPaths, config: Config, task: Task, manifest: pd.DataFrame, pooled: pd.Series,
                 fold_of: pd.Series, images: np.ndarray, folds: int) -> tuple[np.ndarray, list[Path], int]:
    """Each pooled film's probabilities from the fold model that held it out (rows in the pooled films' order),
    the fold checkpoints, and how many folds were trained now."""
    from pipeline.crossval import fold_model
    from pipeline.models import load_checkpoint

    store_index = manifest.loc[pooled, "store_index"].to_numpy()
    held_by = fold_of.to_numpy()
    probability = np.zeros((len(store_index), len(task.labels)), dtype=np.float64)
    checkpoints, trained = [], 0
    for fold in range(folds):
        fold_paths, retrained = fold_model(paths, config, manifest, pooled, fold_of, fold, folds, "audit-labels")
        trained += retrained
        checkpoints.append(fold_paths.checkpoint)
        model, state = load_checkpoint(fold_paths.checkpoint)
        if (state["task"], list(state["labels"])) != (task.name, task.labels):
            raise CxrError(f"{fold_paths.checkpoint} was trained for {state['task']} {state['labels']}, not "
                           f"{task.name} {task.labels}: delete {fold_paths.root} and run again")
        rows = np.flatnonzero(held_by == fold)
        probability[rows] = _predict(model, task, images, store_index[rows])
    return probability, checkpoints, trained


def _predict(model, task: Task, images: np.ndarray, store_index: np.ndarray) -> np.ndarray:
    """Probabilities for the films at `store_index`, read from the (memory-mapped) store a chunk at a time."""
    import torch

    from pipeline.models import predict_proba

    parts = [predict_proba(model, np.asarray(images[store_index[start:start + PREDICT_CHUNK]]), torch.device("cpu"),
                           task.activation)
             for start in range(0, len(store_index), PREDICT_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, len(task.labels)))


def label_quality(task: Task, films: pd.DataFrame, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """cleanlab's label quality score (lower: more suspicious), whether confident learning flags the label, and the
    suggested label, per film. Binary and multiclass read `label_index`; multilabel reads the label sets."""
    from pipeline.labels import join_labels, multi_hot

    labels = task.labels
    if task.one_label_per_film:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        given = films["label_index"].to_numpy().astype(int)
        rows = probability / probability.sum(axis=1, keepdims=True)  # float32 softmax rows, summed again exactly
        _check_every_class_given(given, labels)
        flagged = find_label_issues(given, rows, filter_by="prune_by_noise_rate", n_jobs=1)
        score = get_label_quality_scores(given, rows, method="self_confidence", adjust_pred_probs=True)
        suggested = [labels[k] for k in rows.argmax(axis=1)]
    else:
        from cleanlab.multilabel_classification.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores

        hot = multi_hot(films["label"], labels)
        given_sets = [list(np.flatnonzero(row)) for row in hot]
        flagged = find_label_issues(given_sets, probability, filter_by="prune_by_noise_rate", n_jobs=1)
        score = get_label_quality_scores(given_sets, probability, method="self_confidence", adjust_pred_probs=True)
        suggested = [join_labels([labels[k] for k in np.flatnonzero(row >= MULTILABEL_CUT)], labels) for row in probability]
    return np.asarray(score, dtype=float), np.asarray(flagged, dtype=bool), suggested


def _check_every_class_given(given: np.ndarray, labels: list[str]) -> None:
    """cleanlab estimates noise rates per given class: a class no film carries has none to estimate."""
    missing = [label for k, label in enumerate(labels) if not (given == k).any()]
    if missing:
        raise CxrError(f"audit-labels: no train or val film carries the label {missing[0]!r}, so its noise rate "
                       "cannot be estimated")


def conflicting_duplicates(films: pd.DataFrame, images: np.ndarray, max_distance: int) -> np.ndarray:
    """Per film, the path of its nearest near-duplicate (perceptual hash within `max_distance` bits, identical
    copies included) that carries another label, or ''. Hashes are taken over the whole store, as the data gate
    takes them (pipeline.validate), so the two agree on which films are near-duplicates."""
    from pipeline.phash import close_pairs, hamming, phash

    hashes = phash(images)[films["store_index"].to_numpy()]
    pairs = close_pairs(hashes, max_distance)
    labels = films["label"].astype(str).to_numpy()
    pairs = pairs[labels[pairs[:, 0]] != labels[pairs[:, 1]]]
    nearest = np.full(len(films), -1)
    best = np.full(len(films), np.iinfo(np.int64).max)
    distance = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]]).astype(np.int64)
    for (a, b), bits in zip(pairs, distance, strict=True):
        for film, other in ((a, b), (b, a)):
            if bits < best[film]:
                best[film], nearest[film] = bits, other
    paths = films["path"].astype(str).to_numpy()
    return np.where(nearest >= 0, paths[np.maximum(nearest, 0)], "")


# --- the review page ------------------------------------------------------------------------------


def write_review(path: Path, task: Task, suspects: pd.DataFrame, images: np.ndarray, checkpoints: list[Path],
                 n_films: int) -> None:
    """reports/label_review.html: each suspect's film and its Grad-CAM overlay (from the fold model that held it
    out, for the suggested label), inline as data URIs, with the commands that record a decision."""
    from pipeline.documents import render

    cards, error = _cards(task, suspects, images, checkpoints)
    page = render("label_review.html.j2", title="Label review: the most suspicious training and validation films",
                  cards=cards, n_films=n_films, explain_error=error, task=task.name)
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def _cards(task: Task, suspects: pd.DataFrame, images: np.ndarray, checkpoints: list[Path]) -> tuple[list[dict], str | None]:
    """One dict per suspect, in order; Grad-CAM overlays are None (and the error says why) for a model family
    Grad-CAM cannot explain."""
    from pipeline.explain import grad_cam, overlay_png
    from pipeline.models import load_checkpoint

    films = np.asarray(images[suspects["store_index"].to_numpy()]) if len(suspects) else np.zeros((0, 1, 1), np.uint8)
    overlays: list[str | None] = [None] * len(suspects)
    error = None
    try:
        for fold in sorted(set(suspects["fold"])):
            network, _ = load_checkpoint(checkpoints[fold])
            for position in np.flatnonzero(suspects["fold"].to_numpy() == fold):
                row = suspects.iloc[position]
                heat = grad_cam(network, films[position:position + 1], class_index=_explained_class(task, row))[0]
                overlays[position] = _data_uri(overlay_png(films[position], heat,
                                                           f"evidence for {row['suggested_label'] or '(none)'}"))
    except CxrError as exc:  # e.g. a vit model: no feature map to weigh
        error = str(exc)
    cards = []
    for position, (_, row) in enumerate(suspects.iterrows()):
        cards.append({
            "rank": position + 1, "path": row["path"], "source": row["source"], "split": row["split"],
            "label": row["label"] or "(none)", "suggested": row["suggested_label"] or "(none)",
            "score": f"{row['score']:.3f}", "duplicate_of": row["duplicate_of"], "fold": int(row["fold"]) + 1,
            "film": _data_uri(_png(films[position])), "overlay": overlays[position],
            "commands": review_commands(row["path"]),
        })
    return cards, error


def _explained_class(task: Task, row: pd.Series) -> int | None:
    """The output Grad-CAM explains: the suggested class for one label per film; each film's top label otherwise."""
    if task.one_label_per_film and row["suggested_label"] in task.labels:
        return task.labels.index(row["suggested_label"])
    return None


def review_commands(path: str) -> list[str]:
    """The `cxr review` commands a reviewer runs for one film (quoted for a POSIX shell)."""
    quoted = shlex.quote(str(path))
    return [f"cxr review {decision} {quoted} --reason '...'" for decision in ("accept", "reject", "exclude")]


def _png(film: np.ndarray) -> bytes:
    """The grey film as a PNG enlarged (nearest neighbour, so its pixels stay honest) to about THUMBNAIL_SIDE."""
    from PIL import Image

    scale = max(1, THUMBNAIL_SIDE // max(film.shape))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(film, dtype=np.uint8)).resize((film.shape[1] * scale, film.shape[0] * scale),
                                                              Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


# --- MLflow ---------------------------------------------------------------------------------------


def _log_to_mlflow(paths: ProjectPaths, config: Config, task: Task, issues: pd.DataFrame, result: AuditResult,
                   folds: int, top: int) -> str:
    """A run of its own in the project's experiment, tagged cxr.audit=labels: the counts (overall, per split and per
    given label) and label_issues.csv. Returns its id."""
    import cleanlab
    from mlflow.entities import Metric, Param
    from mlflow.tracking.context.registry import resolve_tags

    from pipeline import tracking
    from pipeline.labels import split_labels

    client = tracking.client(paths)
    experiment = tracking.experiment_id(client, config.tracking.experiment, paths)
    run = client.create_run(experiment, run_name="audit-labels", tags=resolve_tags() | {"cxr.audit": "labels"})
    run_id = run.info.run_id
    counts = {"films_audited": result.n_films, "label_issues": len(issues), "flagged_by_confident_learning": result.n_flagged,
              "near_duplicates_with_another_label": result.n_conflicting_duplicates, "folds_trained": result.folds_trained}
    for split in AUDITED_SPLITS:
        counts[f"label_issues.{split}"] = int((issues["split"] == split).sum())
    given = issues["label"].astype(str)
    for label in task.labels:
        counts[f"label_issues.given.{_metric_name(label)}"] = int(given.apply(lambda text, label=label: label in split_labels(text)).sum())
    now = _now_ms()
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in counts.items()],
                     params=[Param("folds", str(folds)), Param("top", str(top)), Param("task", task.name),
                             Param("cleanlab", cleanlab.__version__), Param("filter_by", "prune_by_noise_rate"),
                             Param("near_duplicate_distance", str(config.validation.near_duplicate_distance))])
    client.log_artifact(run_id, str(result.issues_path))
    client.set_terminated(run_id)
    return run_id


def _metric_name(label: str) -> str:
    """A label as part of an MLflow metric key, which allows letters, digits and `_-. /` only."""
    import re

    return re.sub(r"[^\w\-. /]", "_", label)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
