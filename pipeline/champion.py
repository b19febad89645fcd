"""Which registered version is `champion`, and why: the gate, promotion, rollback and their history.

Reading the champion fails closed: only a registry that answers "no such model" or an alias map without
`champion` means there is none; any other error is retried briefly and then fails the stage (StoreUnavailable),
leaving the alias where it was.

The gate scores challenger and champion, each through its registered pyfunc, on the raw test films (decoded as
ingest does, at each model's own image size) of patients that neither model trained or was validated on (each
version records its train and val patients in `patients.json`). It promotes only when the challenger is not worse
at the point estimate and the lower bound of the paired, patient-clustered 95 % bootstrap interval of
(challenger - champion) is above -margin; so a run of slightly worse models cannot walk the champion down.

Every move of the alias (automatic, promote, rollback) is one MLflow run in the experiment
`<model name>-champion-history` of the same tracking store as the registry, its params the entry. Why there: the
registry is the shared truth when MLFLOW_TRACKING_URI names a team server, so the log must live beside it (a file
in the project would be one machine's view); params cannot be changed once logged, runs are unlimited in number and
searchable, where a registered-model tag is one size-limited value that every move rewrites. The rollback stack is
that log replayed: promote and automatic moves push, rollback pops.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np

from pipeline.config import Config
from pipeline.errors import CxrError, StoreUnavailable
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
RETRY_DELAYS_S = (0.5, 1.0, 2.0)  # between the tries of a registry read: about 4 s before the stage fails
PATIENTS_TAG, PATIENTS_ARTIFACT_TAG, CONTRACT_TAG = "patients_sha256", "patients_artifact", "contract"
MOVES = ("automatic", "promote", "rollback")
MAX_REASON = 2000  # characters; an MLflow param holds 6000 and the entry's decision needs room too

T = TypeVar("T")


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and everything it decided on; `reason` says it in one sentence."""

    promote: bool
    metric: str  # register.gate_metric
    margin: float
    challenger_value: float | None
    champion_value: float | None
    difference: float | None  # challenger - champion
    difference_ci95: list[float] | None  # paired, patient-clustered bootstrap
    n_films: int | None
    n_patients: int | None
    champion_version: int | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


# --- reading the registry, failing closed ------------------------------------------------------


def read_registry(call: Callable[[], T], what: str) -> T:
    """`call()` against the tracking store or registry, retried with a short backoff. "Does not exist"
    (RESOURCE_DOES_NOT_EXIST) is an answer and goes back to the caller at once; any other failure that outlasts
    the retries is StoreUnavailable, naming `what`."""
    from mlflow.exceptions import MlflowException

    for delay in (*RETRY_DELAYS_S, None):
        try:
            return call()
        except (MlflowException, OSError) as exc:
            if is_missing(exc):
                raise
            if delay is None:
                raise StoreUnavailable(f"{what}: the tracking store did not answer after {len(RETRY_DELAYS_S) + 1} tries "
                                       f"({_first_line(exc)}); nothing was changed, run it again when the store answers") from None
            log.warning("%s: %s; trying again in %g s", what, _first_line(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_missing(exc: BaseException) -> bool:
    """The store's answer "no such model, version, run or file", as opposed to a store that failed to answer."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    if isinstance(exc, FileNotFoundError):  # a local artifact store's answer
        return True
    return isinstance(exc, MlflowException) and exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def current_champion(client, name: str):  # -> ModelVersion | None
    """The version holding `champion`; None only when the registered model does not exist or has no such alias.

    The alias is read from the registered model's alias map rather than by asking for the alias, whose absence
    MLflow reports with the same error code as a malformed request."""
    try:
        model = read_registry(lambda: client.get_registered_model(name), f"reading the champion of {name}")
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    version = model.aliases.get(CHAMPION)
    if version is None:
        return None
    try:
        return read_registry(lambda: client.get_model_version(name, str(version)), f"reading {name} version {version}")
    except Exception as exc:
        if is_missing(exc):
            raise CxrError(f"{name}'s champion alias names version {version}, which does not exist; "
                           "`cxr promote VERSION` sets it") from None
        raise


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


# --- the gate ----------------------------------------------------------------------------------


def patient_record(paths: ProjectPaths, manifest_sha256: str, key_scope: str) -> dict:
    """The patients (keyed pseudonyms) a model trained and was validated on, from the manifest, with a check value
    of the de-identification key (deid.key_scope's): pseudonyms made with another key cannot be compared."""
    import pandas as pd

    from pipeline.deid import load_key, patient_hash

    manifest = pd.read_parquet(paths.manifest, columns=["split", "patient_hash"])
    return {
        "train": sorted(set(manifest.loc[manifest["split"] == "train", "patient_hash"])),
        "val": sorted(set(manifest.loc[manifest["split"] == "val", "patient_hash"])),
        "manifest_sha256": manifest_sha256,
        "key_check": patient_hash("cxr champion gate key check", load_key(paths.root, key_scope)),
    }


def recorded_patients(client, version) -> dict | str:  # version: ModelVersion
    """The patient record a version carries (its run's artifact, checked against the version's sha256 tag), or
    why there is none."""
    import hashlib
    import tempfile
    from pathlib import Path

    where, expected = version.tags.get(PATIENTS_ARTIFACT_TAG), version.tags.get(PATIENTS_TAG)
    if not where or not expected:
        return (f"champion v{version.version} records no patient set (registered before versions did), so the gate "
                "cannot tell which test films it has not seen")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = read_registry(lambda: client.download_artifacts(version.run_id, where, scratch),
                                  f"reading the patient set of {version.name} version {version.version}")
        except StoreUnavailable:
            raise
        except Exception as exc:
            return f"champion v{version.version}'s patient set {where} cannot be read ({_first_line(exc)})"
        content = Path(local).read_bytes()
    if hashlib.sha256(content).hexdigest() != expected:
        return f"champion v{version.version}'s patient set {where} does not match its recorded sha256 (changed after registering)"
    return json.loads(content)


def gate(paths: ProjectPaths, config: Config, client, champion, challenger_version: int, patients: dict) -> GateDecision:
    """The challenger (this project's `challenger_version`, trained on `patients`) against `champion`, on the test
    films of patients neither trained or was validated on, each model fed the raw films at its own image size and
    judged at its own operating point."""
    import pandas as pd

    from pipeline.files import read_json
    from pipeline.predictions import load_predictions, read_predictions
    from pipeline.tasks import task_for

    settings = config.registry
    metric = settings.gate_metric.split("_", 1)[1]
    rule = f"{config.setting('register.gate_metric')}, {config.setting('register.margin')}"
    name, theirs_version = settings.model_name, int(champion.version)

    def decided(promote: bool, reason: str, **values: Any) -> GateDecision:
        fields = {"challenger_value": None, "champion_value": None, "difference": None, "difference_ci95": None,
                  "n_films": None, "n_patients": None} | values
        return GateDecision(promote, settings.gate_metric, settings.margin, champion_version=theirs_version, reason=reason, **fields)

    def refused(why: str, **values: Any) -> GateDecision:
        return decided(False, f"not compared with champion v{theirs_version}: {why}; the champion stays ({rule}); "
                              "`cxr promote` decides by hand", **values)

    theirs_patients = recorded_patients(client, champion)
    if isinstance(theirs_patients, str):
        return refused(theirs_patients)
    if theirs_patients.get("key_check") != patients["key_check"]:
        return refused(f"champion v{theirs_version}'s patient pseudonyms were made with another de-identification key, "
                       "so its training patients cannot be recognised here")

    metrics = read_json(paths.metrics, "`cxr evaluate`")
    task = task_for(metrics["task"], metrics["labels"])
    test = load_predictions(paths.predictions, "test")
    scored, _ = read_predictions(test, task, paths.predictions)
    manifest = pd.read_parquet(paths.manifest, columns=["image_id", "patient_hash", "source", "path"])
    rows = test[["image_id"]].merge(manifest, on="image_id", how="left")
    if rows["patient_hash"].isna().any():
        raise CxrError(f"{paths.predictions} names test films that {paths.manifest} does not hold: run `cxr evaluate` again")
    seen = {*patients["train"], *patients["val"], *theirs_patients["train"], *theirs_patients["val"]}
    unseen = ~rows["patient_hash"].isin(seen).to_numpy()
    rows, truth = rows[unseen].reset_index(drop=True), scored.subset(unseen).truth
    n_films, n_patients = len(rows), int(rows["patient_hash"].nunique())
    counts = {"n_films": n_films, "n_patients": n_patients}
    if n_films < settings.min_gate_films:
        return refused(f"only {n_films} of the {len(test)} test films are of patients neither model trained or was "
                       f"validated on, fewer than register.min_gate_films ({settings.min_gate_films})", **counts)

    ours_model = _load(paths, name, challenger_version)
    try:
        theirs_model = _load(paths, name, theirs_version)
    except StoreUnavailable:
        raise
    except Exception as exc:  # its files are gone, or it needs code this project no longer has
        return refused(f"it no longer loads ({_first_line(exc)})", **counts)
    contract = _contract(theirs_model.metadata.metadata)
    if (contract["task"], contract["labels"]) != (task.name, task.labels):
        return refused(f"it is a {contract['task']} model of {contract['labels']}, this one a {task.name} model of "
                       f"{task.labels}", **counts)
    sizes = {(int(model.metadata.metadata["image_size"]), model.metadata.metadata.get("crop", "none"))
             for model in (ours_model, theirs_model)}
    films = raw_films(paths, config, rows, sizes)
    if isinstance(films, str):
        return refused(films, **counts)
    ours, our_threshold = _served(ours_model, films, task)
    theirs, their_threshold = _served(theirs_model, films, task)

    def values(pick: np.ndarray) -> tuple[float | None, float | None]:
        return (task.quick_metrics(truth[pick], ours[pick], our_threshold)[metric],
                task.quick_metrics(truth[pick], theirs[pick], their_threshold)[metric])

    everything = np.arange(n_films)
    ours_value, theirs_value = values(everything)
    if ours_value is None or theirs_value is None:
        return refused(f"{settings.gate_metric} is undefined on these {n_films} films (one class only)", **counts)

    def difference(pick: np.ndarray) -> dict[str, float | None]:
        a, b = values(pick)
        return {"difference": None if a is None or b is None else a - b}

    from pipeline.metrics import bootstrap

    interval = bootstrap(difference, n_films, config.evaluate.bootstrap_rounds, config.evaluate.seed,
                         clusters=rows["patient_hash"].to_numpy())["difference"]
    measured = {"challenger_value": ours_value, "champion_value": theirs_value, "difference": ours_value - theirs_value,
                "difference_ci95": interval, **counts}
    if interval is None:
        return refused(f"the interval of the {settings.gate_metric} difference is undefined on these films "
                       "(one class in most resamples)", **measured)
    delta, (low, high) = ours_value - theirs_value, interval
    promote = delta >= 0 and low > -settings.margin
    if promote:
        verdict = "promoted: not worse at the point estimate, and non-inferior at the margin"
    elif delta < 0:
        verdict = "the champion stays: the challenger is worse at the point estimate"
    else:
        verdict = f"the champion stays: the interval's lower bound {low:+.4f} is not above -margin ({-settings.margin:+g})"
    reason = (f"{settings.gate_metric} {ours_value:.4f} vs champion v{theirs_version} {theirs_value:.4f}, difference "
              f"{delta:+.4f} (95% CI {low:+.4f} to {high:+.4f}, paired bootstrap over patients) on {n_films} test films of "
              f"{n_patients} patients neither model trained or was validated on; rule: promote when the difference is "
              f">= 0 and its lower bound is above -margin ({rule}): {verdict}")
    return decided(promote, reason, **measured)


def first_decision(config: Config, value: float | None, n_films: int | None) -> GateDecision:
    """The decision for a model registered where there is no champion yet."""
    settings = config.registry
    rule = f"{config.setting('register.gate_metric')}, {config.setting('register.margin')}"
    return GateDecision(True, settings.gate_metric, settings.margin, value, None, None, None, n_films, None, None,
                        f"no champion yet: promoted ({settings.gate_metric} {format_metric(value)}; {rule})")


def _load(paths: ProjectPaths, name: str, version: int):  # -> pipeline.predict.ServedModel
    import mlflow

    from pipeline import tracking
    from pipeline.serving import ServedModel

    def load():
        with tracking.fluent_store(paths):
            return ServedModel(mlflow.pyfunc.load_model(f"models:/{name}/{version}"))  # takes the films as arrays

    return read_registry(load, f"loading {name} version {version}")


def _contract(metadata: dict) -> dict:
    """What a served model promises its callers: the task, the labels in order and the image size it takes."""
    return {"task": metadata["task"], "labels": list(metadata["labels"]), "image_size": int(metadata["image_size"])}


def _served(model, films: dict[tuple[int, str], np.ndarray], task, batch: int = 256):  # -> tuple[np.ndarray, Threshold]
    """The model's probabilities (as served) for the films at its own size, and its operating point. Every film is
    scored, also one the model would refuse as out of distribution: both models are compared on the same films."""
    metadata = model.metadata.metadata
    images = films[(int(metadata["image_size"]), metadata.get("crop", "none"))]
    tables = [model.classify_all(images[start:start + batch]) for start in range(0, len(images), batch)]
    return np.concatenate([task.served_probability(table) for table in tables]), metadata["threshold"]


def raw_films(paths: ProjectPaths, config: Config, rows, sizes: set[tuple[int, str]]) -> dict[tuple[int, str], np.ndarray] | str:
    """The manifest `rows`' films decoded from their source files as ingest decodes them, once per (size, crop)
    a model takes (a model registered before data.crop was recorded: none); or why
    they cannot be (a source or file gone, a file that no longer decodes). Names only the manifest's (redacted) paths."""
    from pipeline.decode_cache import Failure
    from pipeline.imaging import limits_of
    from pipeline.deid import load_key
    from pipeline.ingest import decode_at_size, image_id_of
    from pipeline.sources import read_source

    wanted, sources = set(rows["image_id"]), set(rows["source"])
    key = load_key(paths.root, config.deid.key_scope)
    found = {}
    for spec in config.data.sources:
        if spec.path not in sources:
            continue
        try:
            items, _ = read_source(spec, paths.root, config.data)
        except CxrError as exc:
            return f"data.sources '{spec.path}' cannot be read ({exc})"
        found.update({image_id: item for item in items if (image_id := image_id_of(item, key)) in wanted})
    gone = rows[~rows["image_id"].isin(found)]
    if len(gone):
        return (f"{len(gone)} of the {len(rows)} comparison films are no longer in data.sources (e.g. "
                f"{gone['source'].iloc[0]}/{gone['path'].iloc[0]}), so the champion cannot be scored on the raw films")
    films = {}
    for size, crop in sorted(sizes):
        stack = []
        for row in rows.itertuples():
            outcome = decode_at_size(found[row.image_id], size, key, limits_of(config.data), crop)
            if isinstance(outcome, Failure):
                return f"{row.source}/{row.path} no longer decodes ({outcome.reason})"
            stack.append(outcome.pixels)
        films[(size, crop)] = np.stack(stack)
    return films


# --- moving the alias, and its history ---------------------------------------------------------


def history_experiment(name: str) -> str:
    return f"{name}-champion-history"


def move_champion(paths: ProjectPaths, client, name: str, version: int, action: str, reason: str,
                  decision: dict | None = None, previous: int | None = None) -> None:
    """Give `version` the champion alias and append the move to the history (the challenger alias leaves it).

    The entry's run is opened before the alias moves and closed FINISHED after; a move that failed halfway leaves
    a FAILED run, which the history does not count."""
    import getpass
    import socket

    from mlflow.entities import Param

    from pipeline import tracking

    if action not in MOVES:
        raise ValueError(f"unknown move {action!r}")
    if len(reason) > MAX_REASON:
        raise CxrError(f"the reason is {len(reason)} characters long; the history keeps up to {MAX_REASON}: shorten it")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    entry = {
        "version": str(version), "previous": "" if previous is None else str(previous), "action": action,
        "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "user": user, "host": socket.gethostname(),
        "reason": reason, "decision": json.dumps(decision, sort_keys=True) if decision is not None else "",
    }
    from mlflow.exceptions import MlflowException

    where = f"moving the champion of {name} to version {version}"
    try:
        experiment = tracking.experiment_id(client, history_experiment(name), paths)
        run = client.create_run(experiment, run_name=f"{action} v{version}", tags={"mlflow.user": user, "move": action})
    except (MlflowException, OSError) as exc:
        raise StoreUnavailable(f"{where}: the champion history could not be written ({_first_line(exc)}); the alias "
                               "was left where it was") from None
    try:
        client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in entry.items()])
        client.set_registered_model_alias(name, CHAMPION, str(version))
        if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
        client.set_terminated(run.info.run_id, "FINISHED")
    except (MlflowException, OSError) as exc:
        _mark_failed(client, run.info.run_id)
        raise StoreUnavailable(f"{where}: the store failed halfway ({_first_line(exc)}); check the alias, `cxr promote` "
                               "records a move") from None
    except BaseException:
        _mark_failed(client, run.info.run_id)
        raise
    log.info("registry: %s version %s is @champion (%s: %s)", name, version, action, reason)


def _mark_failed(client, run_id: str) -> None:
    """A history entry whose move did not complete (best effort: the store may be what failed)."""
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the entry stays RUNNING, which the history does not count either
        log.warning("could not mark the champion history run %s as failed: %s", run_id, _first_line(exc))


def champion_history(client, name: str) -> list[dict]:
    """Every completed move of `champion`, oldest first: version, previous, action, at (UTC), user, host, reason,
    decision (the gate's, as a dict, or None) and the run that records it."""
    from mlflow.entities import ViewType

    experiment = read_registry(lambda: client.get_experiment_by_name(history_experiment(name)),
                               f"reading the champion history of {name}")
    if experiment is None:
        return []
    runs, token = [], None
    while True:
        page = read_registry(lambda after=token: client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'", run_view_type=ViewType.ALL,
            max_results=1000, order_by=["attributes.start_time ASC"], page_token=after), f"reading the champion history of {name}")
        runs += list(page)
        token = page.token
        if not token:
            break
    entries = []
    for run in runs:
        params = run.data.params
        entries.append({
            "version": int(params["version"]), "previous": int(params["previous"]) if params.get("previous") else None,
            "action": params["action"], "at": params["at"], "user": params["user"], "host": params.get("host", ""),
            "reason": params["reason"], "decision": json.loads(params["decision"]) if params.get("decision") else None,
            "run_id": run.info.run_id,
        })
    return sorted(entries, key=lambda entry: entry["at"])


def champion_stack(history: list[dict]) -> list[int]:
    """The versions rollback can go back through, the current champion last: automatic and promote moves push,
    rollback pops."""
    stack: list[int] = []
    for entry in history:
        if entry["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])  # a log that does not replay cleanly still ends at the version moved to
        else:
            stack.append(entry["version"])
    return stack


def promote(paths: ProjectPaths, client, name: str, version: int, reason: str) -> bool:
    """A person's decision to make `version` the champion (`cxr promote`); False when it already is."""
    try:
        target = read_registry(lambda: client.get_model_version(name, str(version)), f"reading {name} version {version}")
    except StoreUnavailable:
        raise
    except Exception as exc:
        if is_missing(exc):
            raise CxrError(f"{name} has no version {version}; `mlflow ui` or the registry lists the versions") from None
        raise
    champion = current_champion(client, name)
    if champion is not None and int(champion.version) == version:
        return False
    move_champion(paths, client, name, version, "promote", f"promoted by hand: {reason}", _decision_of(target),
                  int(champion.version) if champion else None)
    return True


def rollback(paths: ProjectPaths, client, name: str, reason: str) -> int:
    """Move the champion back to the version it replaced (`cxr rollback`): pop the history's stack.

    Refuses a target that no longer loads, or whose task, labels or image size differ from the current champion's:
    what calls the champion would break."""
    champion = current_champion(client, name)
    if champion is None:
        raise CxrError(f"{name} has no champion to roll back")
    current = int(champion.version)
    stack = champion_stack(champion_history(client, name))
    if not stack or stack[-1] != current:
        last = f"v{stack[-1]}" if stack else "nothing"
        raise CxrError(f"{name}'s champion is v{current} but its champion history last made {last} champion (the alias "
                       f"was moved outside cxr): `cxr promote {current} --reason ...` records it, then roll back")
    if len(stack) < 2:
        raise CxrError(f"{name} had no champion before version {current}; nothing to roll back to")
    target = stack[-2]
    try:
        loaded = _load(paths, name, target)
    except StoreUnavailable:
        raise
    except Exception as exc:
        raise CxrError(f"cannot roll back to {name} version {target}: it no longer loads ({_first_line(exc)}); "
                       "`cxr promote VERSION` another one") from None
    theirs, ours = _contract(loaded.metadata.metadata), _contract_of(paths, champion)
    differing = [key for key in ("task", "labels", "image_size") if theirs[key] != ours[key]]
    if differing:
        shown = "; ".join(f"{key} {theirs[key]} instead of {ours[key]}" for key in differing)
        raise CxrError(f"cannot roll back to {name} version {target}: it takes another input or answers another "
                       f"question than champion v{current} ({shown}); `cxr promote {target}` if that is meant")
    target_version = read_registry(lambda: client.get_model_version(name, str(target)), f"reading {name} version {target}")
    move_champion(paths, client, name, target, "rollback", f"rollback from v{current}: {reason}",
                  _decision_of(target_version), current)
    return target


def _contract_of(paths: ProjectPaths, version) -> dict:
    """A version's contract: its tag (recorded at registration), else its MLmodel's metadata."""
    if version.tags.get(CONTRACT_TAG):
        return json.loads(version.tags[CONTRACT_TAG])
    import mlflow

    from pipeline import tracking

    def info():
        with tracking.fluent_store(paths):
            return mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")

    return _contract(read_registry(info, f"reading {version.name} version {version.version}").metadata)


def _decision_of(version) -> dict | None:
    """The gate's decision recorded on a version when it was registered."""
    recorded = version.tags.get("gate")
    return json.loads(recorded) if recorded else None
