"""`cxr review accept|reject|exclude`: a reviewer's decisions about suspect labels, written to
data/labels/overrides.csv (pipeline.overrides) so that the next `dvc repro` trains on them.

- accept: the film takes the label `cxr audit-labels` suggested (reports/label_issues.csv's suggested_label).
- reject: the reviewer kept the given label; recorded as a row whose new_label is that label, so the manifest marks
  the film reviewed (label_source `override`, label_original equal to label) and the audit need not ask again.
- exclude: the film leaves the data (quarantined as excluded_by_review).

Each run edits the file under the project lock and replaces it atomically, one row per film: a new decision about
a film replaces its row, and a decision the file already holds (same outcome, reason and reviewer) leaves the
row and its date as they are, so repeating a command changes nothing. Only films the last ingest listed can be
decided about (the manifest's, or films an earlier decision excluded).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

import pandas as pd

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import read_text_csv
from pipeline.lock import project_lock
from pipeline.manifest import read_manifest
from pipeline.overrides import (
    EXCLUDED,
    Decision,
    label_cell,
    parse_label,
    read_overrides,
    write_overrides,
)
from pipeline.paths import ProjectPaths
from pipeline.tasks import task_for

Verdict = Literal["accept", "reject", "exclude"]
ISSUES_COLUMNS = ["path", "source", "label", "suggested_label"]


@dataclass(frozen=True)
class ReviewResult:
    n_written: int  # decisions added or changed
    n_unchanged: int  # decisions the file already held
    path: str  # the overrides file, relative to the project


def review(paths: ProjectPaths, config: Config, verdict: Verdict, films: list[str], reason: str,
           reviewer: str | None = None) -> ReviewResult:
    """Record `verdict` for each film (a manifest path, or SOURCE/PATH where two sources hold the same path) in the
    overrides file; nothing is written when any film or label is refused."""
    if not reason.strip():
        raise CxrError("review: --reason is empty; say why (it is kept with the decision)")
    if not films:
        raise CxrError("review: name at least one film (its path as reports/label_issues.csv shows it)")
    reviewer = (reviewer or _os_user()).strip()
    task = task_for(config.data.task, config.data.labels)
    shown = paths.label_overrides.relative_to(paths.root).as_posix()
    today = datetime.now(UTC).date().isoformat()
    with project_lock(paths.root):  # no ingest reads the file half-decided, and no two reviews lose a decision
        known = _known_films(paths, config)
        issues = _label_issues(paths) if verdict != "exclude" else None
        decisions = dict(read_overrides(paths.label_overrides, task, shown).decisions)
        written = unchanged = 0
        for film in films:
            source, path = _resolve(film, known)
            where = f"review {verdict} {film}"
            if verdict == "exclude":
                new_label, exclude = None, True
            else:
                given, suggested = _labels_of(source, path, verdict, issues, known, where)
                which = "suggested" if verdict == "accept" else "given"
                cell = label_cell(suggested if verdict == "accept" else given, task)
                new_label, exclude = parse_label(cell, task, f"{where}: the {which} label"), False
            before = decisions.get((source, path))
            decision = Decision(source, path, new_label, exclude, reason.strip(), reviewer, today)
            if before is not None and replace(before, date=today, line=0) == decision:
                unchanged += 1
                continue
            decisions[(source, path)] = decision  # replaces the film's row in place, or adds one at the end
            written += 1
        if written:
            write_overrides(paths.label_overrides, decisions.values(), task)
    return ReviewResult(written, unchanged, shown)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        raise CxrError("review: cannot tell who you are from the system; give --reviewer NAME") from None


def _known_films(paths: ProjectPaths, config: Config) -> pd.DataFrame:
    """(source, path, label, label_original) of every film a decision may name: the manifest's, and films an
    earlier decision excluded (their labels unknown here)."""
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run `cxr ingest` first (decisions name the films it lists)")
    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels,
                             ["source", "path", "label", "label_original"])
    if paths.quarantine.exists():
        quarantine = read_text_csv(paths.quarantine)
        excluded = quarantine.loc[quarantine["reason"] == EXCLUDED, ["source", "path"]]
        manifest = pd.concat([manifest, excluded], ignore_index=True)
    return manifest


def _resolve(film: str, known: pd.DataFrame) -> tuple[str, str]:
    """The (source, path) a film argument names: a manifest path, or SOURCE/PATH."""
    exact = known[known["path"] == film]
    if len(exact) == 1:
        return exact["source"].iloc[0], film
    if len(exact) > 1:
        raise CxrError(f"review: '{film}' is in several sources ({', '.join(sorted(exact['source']))}); write it as "
                       "SOURCE/PATH")
    whole = known[(known["source"] + "/" + known["path"]) == film]
    if len(whole):
        return whole["source"].iloc[0], whole["path"].iloc[0]
    raise CxrError(f"review: no film '{film}' in the manifest; give the path as reports/label_issues.csv or the manifest "
                   "shows it (run `cxr ingest` first if the film is new)")


def _label_issues(paths: ProjectPaths) -> pd.DataFrame | None:
    """reports/label_issues.csv (`cxr audit-labels`), or None when there is none."""
    issues = paths.reports / "label_issues.csv"
    if not issues.exists():
        return None
    try:
        table = read_text_csv(issues)
    except (OSError, ValueError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise CxrError(f"{issues}: could not read the table ({exc})") from None
    missing = [column for column in ISSUES_COLUMNS if column not in table.columns]
    if missing:
        raise CxrError(f"{issues}: missing column(s) {missing}; run `cxr audit-labels` again")
    return table


def _labels_of(source: str, path: str, verdict: Verdict, issues: pd.DataFrame | None, known: pd.DataFrame,
               where: str) -> tuple[str, str]:
    """A film's given label and the audit's suggestion, as manifest labels: the audit's row (reports/label_issues.csv)
    first; `reject` also takes the manifest's label for a film the audit did not list."""
    if issues is not None:
        row = issues[(issues["source"] == source) & (issues["path"] == path)]
        if len(row):
            return row["label"].iloc[0], row["suggested_label"].iloc[0]
    if verdict == "accept":
        why = "there is no reports/label_issues.csv" if issues is None else "reports/label_issues.csv does not list it"
        raise CxrError(f"{where}: no suggested label ({why}); run `cxr audit-labels`, or edit overrides.csv by hand")
    film = known[(known["source"] == source) & (known["path"] == path)]
    if film["label"].isna().all():
        raise CxrError(f"{where}: the film was excluded by review and its given label is unknown here; delete its row "
                       "from overrides.csv to take it back")
    return film["label"].iloc[0], ""
