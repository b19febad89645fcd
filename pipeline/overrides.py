"""data/labels/overrides.csv: a reviewer's decisions about films' labels, kept as versioned data that ingest reads.

One row per film, named as the manifest names it (`source`, `path`): either `new_label` (the label the film is
trained and tested with from now on) or `exclude` (true: the film leaves the data, quarantined as
`excluded_by_review`), with the `reason`, the `reviewer` and the `date` (YYYY-MM-DD). A row whose new_label is
the film's given label records that a reviewer kept it (`cxr review reject`): the manifest then says the label was
reviewed (label_source `override`) and unchanged (label_original equals label), so the audit need not suggest it
again. A multilabel film's new_label is its set of findings joined by '|' in any order, `(none)` for none of them.

Films are never named by SOP Instance UID here: the project treats a UID as an identifier and writes it only
redacted (pipeline.deid), and this file is committed to git. A film of a UID-matched table is named by its manifest
path, which is the UID redacted. A missing file means no decisions; DVC tracks it as a dependency of ingest
(dvc.yaml), and git keeps who decided what and when.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.labels import join_labels, split_labels
from pipeline.tasks import Task

log = logging.getLogger(__name__)

COLUMNS = ("source", "path", "new_label", "exclude", "reason", "reviewer", "date")
REQUIRED = ("source", "path", "reason", "reviewer", "date")
NO_FINDINGS = "(none)"  # a multilabel film with none of data.labels (the manifest writes '')
EXCLUDED = "excluded_by_review"  # the quarantine reason of an excluded film
FROM_SOURCE, FROM_REVIEW = "source", "override"  # the manifest's label_source
TRUE, FALSE = {"true", "yes", "1"}, {"false", "no", "0", ""}


@dataclass(frozen=True)
class Decision:
    """One row of the file: a film's new label (manifest form: '|'-joined for multilabel, '' for none), or its
    exclusion. `line` is the row's line in the file, for messages."""

    source: str
    path: str
    new_label: str | None
    exclude: bool
    reason: str
    reviewer: str
    date: str
    line: int = 0


@dataclass(frozen=True)
class Overrides:
    """Every decision by film, with the file's sha256 (None without a file): the lineage records the hash."""

    shown: str  # how messages name the file (relative to the project)
    sha256: str | None = None
    decisions: dict[tuple[str, str], Decision] = field(default_factory=dict)

    def find(self, source: str, path: str) -> Decision | None:
        return self.decisions.get((source, path))


def read_overrides(path: Path, task: Task, shown: str) -> Overrides:
    """The decisions in `path` (none when it does not exist), each checked: a bad row is a one-line CxrError that
    names the file, the line and the problem."""
    if not path.exists():
        return Overrides(shown)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column's name
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrError(f"{shown}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    _check_columns(columns, shown)
    decisions: dict[tuple[str, str], Decision] = {}
    for row in reader:
        cells = {name.strip(): (value or "").strip() for name, value in row.items() if name is not None}
        if not any(cells.values()):
            continue
        if None in row:
            raise CxrError(f"{shown} line {reader.line_num}: more cells than the header's {len(columns)} columns")
        decision = _decision(cells, task, f"{shown} line {reader.line_num}", reader.line_num)
        film = (decision.source, decision.path)
        if film in decisions:
            raise CxrError(f"{shown} line {reader.line_num}: {decision.source}/{decision.path} is decided again (first on "
                           f"line {decisions[film].line}); keep one row per film")
        decisions[film] = decision
    return Overrides(shown, hashlib.sha256(raw).hexdigest(), decisions)


def _check_columns(columns: list[str], shown: str) -> None:
    if "sop_instance_uid" in columns:
        raise CxrError(f"{shown}: column sop_instance_uid names films by SOP Instance UID, an identifier the project never "
                       "stores unhashed; name each film by `path` as the manifest shows it (a UID-matched table's films "
                       "show their UID redacted)")
    if not columns:
        return  # an empty file: no decisions
    missing = [name for name in REQUIRED if name not in columns]
    if missing or ("new_label" not in columns and "exclude" not in columns):
        raise CxrError(f"{shown}: missing column(s) {missing or ['new_label or exclude']}; the columns are {', '.join(COLUMNS)}")
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        raise CxrError(f"{shown}: unknown column(s) {unknown}; the columns are {', '.join(COLUMNS)}")


def _decision(cells: dict[str, str], task: Task, where: str, line: int) -> Decision:
    for name in REQUIRED:
        if not cells.get(name):
            raise CxrError(f"{where}: {name} is empty")
    exclude_text = cells.get("exclude", "").lower()
    if exclude_text not in TRUE | FALSE:
        raise CxrError(f"{where}: exclude '{cells['exclude']}' is neither true nor false")
    exclude = exclude_text in TRUE
    label_text = cells.get("new_label", "")
    if exclude and label_text:
        raise CxrError(f"{where}: both new_label and exclude; a film is either relabelled or excluded")
    if not exclude and not label_text:
        raise CxrError(f"{where}: neither new_label nor exclude: true")
    try:
        date.fromisoformat(cells["date"])
    except ValueError:
        raise CxrError(f"{where}: date '{cells['date']}' is not a date written YYYY-MM-DD") from None
    new_label = None if exclude else parse_label(label_text, task, where)
    return Decision(cells["source"], cells["path"], new_label, exclude, cells["reason"], cells["reviewer"], cells["date"], line)


def parse_label(text: str, task: Task, where: str) -> str:
    """A new_label cell as the manifest writes labels: one of data.labels, or for a multilabel task a '|'-joined set
    in data.labels order ('' for `(none)`). Anything else is a CxrError naming `where`."""
    labels = ", ".join(task.labels)
    if task.one_label_per_film:
        label = text.strip().lower()
        if label not in task.labels:
            raise CxrError(f"{where}: new_label '{text}' is not one of data.labels [{labels}]"
                           + (" (a film of this task has one label)" if "|" in text else ""))
        return label
    if text.strip().lower() == NO_FINDINGS:
        return ""
    parts = [part.strip().lower() for part in text.split("|")]
    unknown = [part for part in parts if part not in task.labels]
    if unknown:
        raise CxrError(f"{where}: new_label '{text}' names {unknown}, not in data.labels [{labels}]; write the findings "
                       f"joined by '|', or {NO_FINDINGS} for none")
    return join_labels(parts, task.labels)


def label_cell(label: str, task: Task) -> str:
    """A manifest label as a new_label cell: parse_label's inverse (a multilabel film's empty set is `(none)`)."""
    return label if task.one_label_per_film or split_labels(label) else NO_FINDINGS


def labelled(decision: Decision | None, given: str | None, where: str) -> dict[str, str | None]:
    """A listed film's manifest label columns: its label, the label its source gave (label_original) and where its
    label comes from (label_source). An unlabelled source's film cannot be given a label here."""
    if decision is None:
        return {"label": given, "label_original": given, "label_source": FROM_SOURCE}
    if given is None:
        raise CxrError(f"{where}: the film is from an unlabelled source (labelled: false); give it a label in its source")
    return {"label": decision.new_label, "label_original": given, "label_source": FROM_REVIEW}


def exclusion_message(decision: Decision, film: str, shown: str) -> str:
    """quarantine.csv's message for an excluded film."""
    return f"{film}: excluded by {decision.reviewer} on {decision.date} ({shown} line {decision.line}): {decision.reason}"


def check_all_found(overrides: Overrides, listed: Iterable[tuple[str, str]], sources: list[str],
                    redact: Callable[[str], str]) -> None:
    """Refuse a decision naming a film that its source does not list (a typo would leave a wrong label in training
    unseen); only warn when its source is not in data.sources (an experiment on other sources keeps the file).
    `listed` is every (source, manifest path) the sources list, quarantined ones included; `redact` scrubs the
    run's identifiers from the path a message repeats."""
    found = set(listed)
    elsewhere: list[Decision] = []
    for decision in overrides.decisions.values():
        if (decision.source, decision.path) in found:
            continue
        if decision.source not in sources:
            elsewhere.append(decision)
            continue
        raise CxrError(f"{overrides.shown} line {decision.line}: source '{decision.source}' lists no film "
                       f"'{redact(decision.path)}'; write the path as the manifest (or reports/label_issues.csv) shows "
                       "it, or delete the row")
    if elsewhere:
        log.warning("ingest: %d decision(s) in %s name sources that data.sources does not list (%s); they wait for them",
                    len(elsewhere), overrides.shown, ", ".join(sorted({d.source for d in elsewhere})))


def review_record(overrides: Overrides, label: Iterable, original: Iterable, source: Iterable, n_excluded: int) -> dict:
    """What the manifest records about the decisions it was built with (pipeline.manifest): the file's sha256 (None
    without a file), and how many of its films' labels were changed, kept after review, and excluded."""
    reviewed = [(new, old) for new, old, where in zip(label, original, source) if where == FROM_REVIEW]
    changed = sum(new != old for new, old in reviewed)
    return {"file": overrides.shown, "sha256": overrides.sha256, "labels_changed": changed,
            "labels_kept": len(reviewed) - changed, "films_excluded": n_excluded}


def write_overrides(path: Path, decisions: Iterable[Decision], task: Task) -> None:
    """The file with `decisions` in order, written atomically (a reader never sees half of it)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for d in decisions:
        writer.writerow([d.source, d.path, "" if d.exclude else label_cell(d.new_label or "", task), "true" if d.exclude else "",
                         d.reason, d.reviewer, d.date])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def review_shares(manifest, task: Task) -> dict:
    """The data gate's account of review (summary.json `label_review`): films reviewed and changed, the changed
    test films (allowed, but the report flags them: test scores then measure against reviewed labels), and per
    split and label (the film's label now; a multilabel film counts under each finding, `(none)` for none) the
    share of films whose label a decision changed."""
    reviewed = manifest["label_source"] == FROM_REVIEW
    changed = reviewed & (manifest["label"] != manifest["label_original"])
    every = task.label_counts(manifest)
    moved = task.label_counts(manifest[changed]).reindex(index=every.index, columns=every.columns, fill_value=0)
    per_split = {str(split): {str(label): {"n": int(every.loc[split, label]), "changed": int(moved.loc[split, label]),
                                           "share": round(float(moved.loc[split, label] / every.loc[split, label]), 4)
                                           if every.loc[split, label] else 0.0}
                              for label in every.columns}
                 for split in every.index}
    return {"reviewed": int(reviewed.sum()), "changed": int(changed.sum()),
            "test_changed": int((changed & (manifest["split"] == "test")).sum()), "per_split": per_split}
