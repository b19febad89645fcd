"""Documents people read (the HTML report, the model card, the flow's summary) rendered from Jinja2 templates.

Layout lives in pipeline/templates/, numbers in the plain dict each stage gathers. This module owns the one
template environment and the helpers that turn metrics.json into the words and rows those documents show.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pipeline.metrics import SUBGROUP_METRICS, TOO_SMALL, format_metric

TEMPLATES = Path(__file__).parent / "templates"

def render(template_name: str, **context) -> str:
    """`template_name` from pipeline/templates/ filled with `context`; a key the template needs but lacks raises."""
    return _environment().get_template(template_name).render(**context)


@cache
def _environment():
    """HTML templates (*.html.j2) autoescape; markdown ones do not (a label is text there, not markup)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def describe_threshold(metrics: dict) -> str:
    """How the operating point in metrics.json was chosen, in words for the run, the model card and the report."""
    method = metrics["threshold_method"]
    per_label = " for each label" if _task(metrics).thresholds_per_label else ""
    if method == "argmax":
        return "argmax, no threshold to choose"
    if method == "youden":
        return f"chosen on validation by Youden's J{per_label}"
    if method == "youden_mid":
        return f"chosen on validation{per_label} in the middle of the thresholds of maximal Youden's J"
    if method == "sensitivity":
        return f"chosen on validation{per_label} for sensitivity >= {metrics['target_sensitivity']}"
    return "fixed by evaluate.threshold"


def describe_operating_point(metrics: dict) -> str:
    """The operating point itself, in words: '0.4231', 'effusion 0.31, pneumonia 0.42' or 'most probable class'."""
    return _task(metrics).describe_point(metrics["threshold"])


def headline_rows(metrics: dict) -> list[list[str]]:
    """[metric, value, 95 % CI] rows of the test split, for the model card, the report and the flow's summary:
    the task's table (binary: AUC to F1; multiclass and multilabel: macro AUC and accuracy)."""
    task = _task(metrics)
    test, intervals = metrics["test"], metrics["test"].get("ci95", {})
    rows = []
    for name in task.table_metrics:
        rows.append([task.metric_title(name), format_metric(test.get(name), 3), _interval(intervals.get(name))])
    return rows


def describe_intervals(metrics: dict) -> str:
    """What the test metrics rest on and how their intervals were made, in a sentence."""
    test = metrics["test"]
    return f"{test['n']} test films of {test['n_patients']} patients; 95 % intervals: {test['ci_method']}"


def describe_threshold_spread(metrics: dict) -> str | None:
    """How far the threshold moved over validation's patient resamples, in words: 'threshold 95 % bootstrap range
    0.41 to 0.58 (sd 0.04, 1000 resamples of validation patients)'; per label for multilabel; None when nothing
    was chosen (or metrics.json predates the spread)."""
    spread = metrics.get("threshold_spread")
    if not spread:
        return None

    def one(entry: dict | None) -> str:
        return "undefined" if entry is None else (f"{_interval(entry['ci95'])} (sd {format_metric(entry['sd'], 3)})")

    if "ci95" in spread:
        text = one(spread)
        rounds = spread["rounds"]
    else:
        text = ", ".join(f"{label} {one(entry)}" for label, entry in spread.items())
        rounds = next(entry["rounds"] for entry in spread.values() if entry)
    return (f"the threshold chosen again on {rounds} resamples of validation patients: 95 % range {text}; a wide "
            "range means validation cannot pin the operating point down")


def describe_tta(metrics: dict) -> str | None:
    """The test-time views evaluate averaged over (pipeline.tta), in words; None when off."""
    views = metrics.get("tta") or []
    if not views:
        return None
    shown = "; ".join(", ".join(f"{key} {value:g}" for key, value in view.items() if value != (1.0 if key == "scale" else 0.0))
                      or "itself" for view in views)
    return (f"each film's probability is the mean over the film and {len(views)} moved copies ({shown}), at "
            "evaluation and wherever the registered model serves")


def describe_ece(metrics: dict) -> str:
    """The expected calibration error with its patient-clustered interval: '0.052 (95 % CI 0.031 to 0.080)'."""
    test = metrics["test"]
    return f"{format_metric(test['ece'], 3)} (95 % CI {_interval(test['ci95'].get('ece'))})"


def subgroup_tables(metrics: dict) -> list[dict]:
    """Per subgroup column (source, view, sex, age_band, ...): a header and a row per value with its films,
    patients and each metric with its patient-clustered 95 % interval, or "n too small" and blanks."""
    task = _task(metrics)
    shown = [name for name in SUBGROUP_METRICS if name in task.table_metrics]
    tables = []
    for column, groups in metrics["test"].get("subgroups", {}).items():
        rows = []
        for value, group in groups.items():
            counts = [value, str(group["n"]), str(group["n_patients"])]
            if group.get("note") == TOO_SMALL:
                rows.append([*counts, TOO_SMALL, *[""] * (len(shown) - 1)])
            else:
                rows.append([*counts, *(_with_interval(group.get(name), group["ci95"].get(name)) for name in shown)])
        tables.append({"column": column, "header": [column, "films", "patients", *map(task.metric_title, shown)],
                       "rows": rows})
    return tables


def _with_interval(value: float | None, bounds: list[float] | None) -> str:
    """'0.812 (0.701 to 0.903)', or 'n/a' where the metric is undefined (e.g. AUC of one class)."""
    return "n/a" if value is None else f"{format_metric(value, 3)} ({_interval(bounds)})"


def _interval(bounds: list[float] | None) -> str:
    low, high = bounds or [None, None]
    return f"{format_metric(low, 3)} to {format_metric(high, 3)}"


def count_rows(counts) -> tuple[list[str], list[list]]:
    """Task.label_counts' frame as (its label columns, [split, films, ...] rows) for a films-per-split table."""
    return [str(column) for column in counts.columns], [[split, *map(int, counts.loc[split])] for split in counts.index]


def per_label_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the per-label test table (multiclass: one-vs-rest at the most probable class;
    multilabel: at each label's threshold); no rows for a binary task."""
    test = metrics["test"]
    intervals = test.get("ci95", {}).get("per_label_auc", {})
    with_thresholds = _task(metrics).thresholds_per_label
    header = ["label", "films with it", "AUC", "AUC 95 % CI", "sensitivity", "specificity", *(["threshold"] if with_thresholds else [])]
    rows = []
    for label in metrics.get("labels", []) if "per_label" in test else []:
        scores = test["per_label"][label]
        rows.append([label, str(scores["tp"] + scores["fn"]), format_metric(scores["auc"], 3),
                     _interval(intervals.get(label)), format_metric(scores["sensitivity"], 3),
                     format_metric(scores["specificity"], 3), *([f"{scores['threshold']:.4f}"] if with_thresholds else [])])
    return header, rows


def _task(metrics: dict):  # -> pipeline.tasks.Task
    """The task metrics.json was written for."""
    from pipeline.tasks import task_for

    return task_for(metrics["task"], metrics["labels"])
