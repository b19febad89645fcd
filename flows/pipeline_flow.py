"""The whole pipeline as one Prefect flow: each stage is a task calling the same function DVC's stage calls.

Tasks pass file paths and small result objects, never the MLflow active run (it is thread-local):
train writes the run id to models/run.json and later stages read it. A user error (CxrError) ends
its task in a Failed state carrying the one-line message, so Prefect logs no traceback for it.
Each flow holds the project lock (pipeline.lock) for its whole run, so no other run writes between two of
its stages; the stages re-enter it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

# A closed network must not cost a telemetry error on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's local mode starts a temporary server; on a busy 2-core machine it can take longer than Prefect waits.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.states import Failed, State  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.files import sha256_of, write_json  # noqa: E402
from pipeline.documents import headline_rows, render  # noqa: E402
from pipeline.errors import CxrError, StoreUnavailable  # noqa: E402
from pipeline.lock import project_lock  # noqa: E402
from pipeline.paths import ProjectPaths  # noqa: E402
from pipeline.privacy import private_umask  # noqa: E402
from pipeline.stages import STAGES, stage  # noqa: E402


log = logging.getLogger(__name__)
USER_ERROR = "UserError"
CHAMPION_CHANGED = "cxr.champion.changed"  # the Prefect event a flow run emits when the champion alias moves
LIBRARY_LOGGER = "pipeline"  # every stage logs under pipeline.<module>


class _RunLogHandler(logging.Handler):
    """Sends a library record to the Prefect run (task or flow) of the thread that logged it, and drops records
    logged outside any run (a record Prefect's own handler cannot place would cost a warning each)."""

    def __init__(self) -> None:
        from prefect.logging.handlers import APILogHandler

        super().__init__(logging.INFO)
        self._api = APILogHandler()

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            self._api.handle(record)


_forwarding = {"flows": 0, "handler": None, "level": logging.NOTSET}
_forwarding_lock = threading.Lock()


@contextmanager
def library_logs_to_prefect() -> Iterator[None]:
    """While a flow runs, the stages' own lines (logging.getLogger("pipeline.*"): "train: kept the last epoch ..., val AUC
    ...", the gate's decision, quarantine counts, progress) reach the task run's logs in the Prefect UI, as they
    reach the shell under `cxr`. Prefect's PREFECT_LOGGING_EXTRA_LOGGERS does this only when set before Prefect
    is first imported, and also copies the lines to Prefect's console, twice beside the CLI's own handler.
    Nested and concurrent flows in one process share one handler."""
    library = logging.getLogger(LIBRARY_LOGGER)
    with _forwarding_lock:
        if _forwarding["flows"] == 0:
            _forwarding["handler"], _forwarding["level"] = _RunLogHandler(), library.level
            library.addHandler(_forwarding["handler"])
            if library.getEffectiveLevel() > logging.INFO:
                library.setLevel(logging.INFO)
        _forwarding["flows"] += 1
    try:
        yield
    finally:
        with _forwarding_lock:
            _forwarding["flows"] -= 1
            if _forwarding["flows"] == 0:
                library.removeHandler(_forwarding["handler"])
                library.setLevel(_forwarding["level"])


def _as_state(body: Callable[[], Any]) -> Any:
    """Run a stage; a user error becomes a Failed state with its message instead of an exception. A store that did
    not answer is no user error: it stays an exception, so the task's retries apply."""
    try:
        return body()
    except StoreUnavailable:
        raise
    except CxrError as exc:
        return Failed(message=str(exc), name=USER_ERROR)


def _holding_the_project_lock(root_of: Callable[[dict], Path]):
    """A flow that holds its project's lock for its whole run (`root_of` its bound arguments → the project root).

    A run that cannot get the lock in time ends Failed with the lock's one-line message.
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            with ExitStack() as held:
                try:
                    held.enter_context(project_lock(root_of(arguments.arguments)))
                except CxrError as exc:
                    return Failed(message=str(exc), name=USER_ERROR)
                return function(*args, **kwargs)

        return run

    return decorate


def _is_transient(task, task_run, state: State) -> bool:
    """Retry real faults (a dropped connection to the tracking server), never a user error: it would fail again."""
    return state.name != USER_ERROR


# Never persisted, whatever PREFECT_RESULTS_PERSIST_BY_DEFAULT says: the plan lists every film's path and a table's
# patient IDs, and a PACS export names its folders after patients (MRN, accession number).
@task(name="ingest-plan", persist_result=False)
def plan_task(paths: ProjectPaths, config: Config):
    from pipeline.ingest import plan_ingest

    return _as_state(lambda: plan_ingest(paths, config))


# No cache key: it would pickle every film's pixels to hash them (and a spool cannot be pickled).
@task(name="ingest-decode", cache_policy=NONE)
def decode_task(files: list, size: int, workers: int, limits, root: Path, key_scope: str, crop: str = "none",
                key_fingerprint: str | None = None, spool=None, checkpoint=None) -> list:
    """Decode a shard of film files where the task runs (a Dask worker, maybe). The key is loaded here, never a
    task parameter or result (Prefect may persist those); the outcomes hold pseudonyms only (pipeline.ingest).
    `spool` (a PixelSpool) and `checkpoint` (a DecodeCheckpoint), only where the task runs in the flow's process
    and decodes every file, take the films as they are decoded.

    `key_fingerprint` (deid.key_check of the flow's key, which reveals nothing a pseudonym does not) must match the
    key found here: a worker on another machine without CXR_DEID_KEY would otherwise make a key of its own and
    return pseudonyms no other film's match, silently splitting one patient's films across splits."""
    from pipeline.deid import key_check, load_key
    from pipeline.ingest import decode_items

    key = load_key(root, key_scope)
    if key_fingerprint is not None and key_check(key) != key_fingerprint:
        import socket

        raise CxrError(f"ingest: the de-identification key on {socket.gethostname()} (check {key_check(key)}) is not the "
                       f"flow's (check {key_fingerprint}): give every Dask worker the same CXR_DEID_KEY or key file")
    return decode_items(files, size, key, workers, limits, crop, spool, checkpoint)


@task(name="ingest-finish", cache_policy=NONE)
def finish_task(paths: ProjectPaths, config: Config, plan, outcomes: list):
    from pipeline.ingest import finish_ingest

    return _as_state(lambda: finish_ingest(paths, config, plan, outcomes))


@flow(name="ingest", validate_parameters=False)  # internal objects, not user input
@_holding_the_project_lock(lambda arguments: arguments["paths"].root)
def ingest_flow(paths: ProjectPaths, config: Config):
    """Ingest fanned out: plan → decode (one task per shard of new files) → finish.

    With the default thread runner one task decodes everything over a local process pool (as `cxr ingest`
    does); with a Dask runner (`orchestration.task_runner: dask`) each shard of files (dask_shard_size, or
    `orchestration.ingest_shard_size` files) is a task the cluster's workers take. Workers need the
    de-identification key (CXR_DEID_KEY or the key file) where they run.
    """
    # its tasks call the ingest steps directly, not through Stage.run
    with private_umask(config.privacy.mask), library_logs_to_prefect():
        return _fan_out_ingest(paths, config)


def _fan_out_ingest(paths: ProjectPaths, config: Config):
    from pipeline.deid import key_check, load_key
    from pipeline.imaging import limits_of
    from pipeline.ingest import DecodeCheckpoint, PixelSpool

    plan = plan_task(paths, config, return_state=True)
    if plan.is_failed():
        return Failed(message=plan.message, name=USER_ERROR)
    plan = plan.result()
    on_cluster = config.orchestration.task_runner == "dask"
    files = [item.file for item in plan.todo]  # a worker needs where each film is, nothing else about it
    size = max(len(files), 1)  # on threads, one task: decode_items spreads it over the process pool
    if on_cluster:
        size = config.orchestration.ingest_shard_size or dask_shard_size(len(files), _dask_threads(),
                                                                          config.data.image_size)
    n_shards = -(-len(files) // size)
    # Shard k takes every n_shards-th film from the k-th: each shard a sample of the whole listing. Cut in runs, a
    # folder of larger films (listed together) would make some shards, and the workers that took them, the last.
    shards = [files[k::n_shards] for k in range(n_shards)]
    workers = 1 if on_cluster else config.data.num_workers
    key = load_key(paths.root, config.deid.key_scope)
    # Decoded films wait on disk, not in memory: threads decode straight into the spool, and each Dask shard's films
    # are spooled as its result arrives (its future then dropped, with the pixels it held). Either way they reach
    # the decode cache every data.checkpoint_every films, so a stopped flow keeps them (pipeline.ingest).
    with PixelSpool(paths.images.parent, config.data.image_size) as spool:
        outcomes: list = [None] * len(files)  # in plan.todo's order, as finish_ingest reads them
        # A failed shard or a cancelled flow ends the `with`: what was decoded stays decoded.
        with DecodeCheckpoint(paths, config, plan, key) as checkpoint:
            futures = [decode_task.submit(shard, config.data.image_size, workers, limits_of(config.data), paths.root,
                                          config.deid.key_scope, config.data.crop, key_check(key),
                                          spool=None if on_cluster else spool,
                                          checkpoint=None if on_cluster else checkpoint) for shard in shards]
            for k in range(n_shards):
                future, futures[k] = futures[k], None  # let go once read: its films are freed when spooled
                for position, outcome in zip(range(k, len(files), n_shards), future.result(), strict=True):
                    outcomes[position] = spool.keep(outcome)
                    if on_cluster:  # on threads, the task showed them to the checkpoint as they came
                        checkpoint.keep(position, outcomes[position])
        finished = finish_task(paths, config, plan, outcomes, return_state=True)
    if finished.is_failed():
        return Failed(message=finished.message, name=USER_ERROR)
    return finished.result()


# A decode task on Dask costs a worker 0.3 to 1 s besides its films (measured on 2 cores): Prefect builds its
# settings and an HTTP client, certificate bundle included, for each task run. Two tasks per worker thread pay it
# twice, and a thread that finishes first waits for at most about half another's share.
SHARDS_PER_THREAD = 2
# A shard's films come back, and wait in the flow's memory, all at once: 16,384 films at 64 px, 256 at 512 px.
MAX_SHARD_BYTES = 64 * 2**20


def dask_shard_size(n_files: int, threads: int, image_size: int) -> int:
    """Files per decode task on Dask when `orchestration.ingest_shard_size` is unset: SHARDS_PER_THREAD tasks per
    worker thread of the cluster, each holding at most MAX_SHARD_BYTES of stored films (uint8, image_size²)."""
    per_thread = -(-n_files // (max(threads, 1) * SHARDS_PER_THREAD))
    return max(1, min(per_thread, MAX_SHARD_BYTES // (image_size * image_size)))


def _dask_threads() -> int:
    """Worker threads the flow's Dask cluster has now (at least 1). A cluster that adds workers later (adaptive)
    counts only those up at the start: set `orchestration.ingest_shard_size` for it."""
    from prefect.context import FlowRunContext

    return max(1, sum(FlowRunContext.get().task_runner.client.nthreads().values()))


# Dask samples each worker's stacks every 10 ms for its dashboard's profile page: 5% of a decoding worker's time
# on this 2-core VM (A/B in one run: 11.1 s against 10.5 s, the process pool 10.3 s). Workers started by hand get it
# from DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False (README "Ingest on several machines").
DASK_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


def task_runner_for(config: Config):
    """The ingest flow's task runner: Prefect's threads, or Dask (an existing scheduler, or a local cluster)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    settings = config.orchestration
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise CxrError("orchestration.task_runner is dask but prefect-dask is not installed: pip install 'cxr-pipeline[dask]'") from None
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, "threads_per_worker": 1, "processes": True,
                                          "config": DASK_WORKER_CONFIG})


@task
def stage_task(name: str, paths: ProjectPaths, config: Config):
    """One stage of pipeline.stages, by name. A retry (after a fault that is not the user's, see _is_transient)
    of a stage that resumes continues where the failed run stopped: train from its last epoch's state."""
    from prefect.runtime import task_run

    each = stage(name)
    retrying = (task_run.run_count or 1) > 1
    options = {"resume": True} if retrying and each.resumes else {}
    return _as_state(lambda: each.run(paths, config, **options))


# Training starts here: a scheduled run whose data and params are those of the last complete run stops before it.
TRAINING_STARTS = "rebalance"


@flow(name="cxr-pipeline")
@_holding_the_project_lock(lambda arguments: Path(arguments["params_path"]).resolve().parent)
def cxr_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, skip_if_unchanged: bool = False) -> dict | State:
    """Every stage of pipeline.stages in order (ingest → validate → rebalance → train → evaluate → register →
    report), reading params.yaml plus overrides; ingest runs as its own fanned-out flow (ingest_flow).

    Stops at the first failed stage; the flow run then ends Failed with that stage's message. With
    `skip_if_unchanged` (scheduled deployments), training is skipped when the ingested data and the params
    are those of the last complete run. Each stage's task waits for the one before it, so the Prefect UI
    draws the stages' real order; the stages' own log lines go to their task runs (library_logs_to_prefect).
    """
    with library_logs_to_prefect():
        return _run_stages(params_path, overrides, skip_if_unchanged)


def _run_stages(params_path: str, overrides: list[str] | None, skip_if_unchanged: bool) -> dict | State:
    params = Path(params_path).resolve()
    config = load_config(params, overrides or [])
    paths = ProjectPaths(params.parent)
    logger = get_run_logger()
    results: dict[str, Any] = {}
    previous: list[State] = []  # the stage before: an edge of the task graph, as the stages depend on each other
    for each in STAGES:
        if each.name == TRAINING_STARTS and skip_if_unchanged and _unchanged_since_last_success(paths, config):
            logger.info("data version and params unchanged since the last complete run: training skipped")
            return {"skipped": True, "data_version": _fingerprint(paths, config)["data_version"]}
        if each.name == "ingest":
            state = ingest_flow.with_options(task_runner=task_runner_for(config))(paths, config, return_state=True)
        else:
            run = stage_task.with_options(name=each.name, retries=each.retries, retry_delay_seconds=5,
                                          retry_condition_fn=_is_transient)
            state = run(each.name, paths, config, return_state=True, wait_for=previous)
        if state.is_failed():
            logger.error("%s failed: %s", each.name, state.message)
            return Failed(message=f"{each.name}: {state.message}")
        results[each.name] = state.result()
        previous = [state]
    registered = results["register"]
    write_json(paths.last_success, _fingerprint(paths, config))
    _announce_champion_change(registered)
    _publish_artifacts(paths, results)
    logger.info("done: test AUC %s; %s version %d%s", results["evaluate"].metrics["test"]["auc"],
                registered.model_name, registered.version, " is @champion" if registered.is_champion else "")
    return {
        "skipped": False,
        "run_id": results["train"].run_id,
        "test": results["evaluate"].metrics["test"],
        "model_version": registered.version,
        "champion": registered.is_champion,
    }


def _fingerprint(paths: ProjectPaths, config: Config) -> dict:
    return {"data_version": sha256_of(paths.manifest), "params_hash": config.params_hash()}


def _unchanged_since_last_success(paths: ProjectPaths, config: Config) -> bool:
    if not paths.last_success.exists():
        return False
    return json.loads(paths.last_success.read_text()) == _fingerprint(paths, config)


def _announce_champion_change(registered) -> None:
    """Emit CHAMPION_CHANGED when this run's version became @champion, for an automation to notify on (cxr deploy
    --notify-block). A rerun whose version already was the champion moves nothing and emits nothing."""
    from prefect.events import emit_event

    if not registered.is_champion or registered.previous_champion == registered.version:
        return
    emit_event(
        event=CHAMPION_CHANGED,
        resource={"prefect.resource.id": f"cxr.model.{registered.model_name}", "prefect.resource.name": registered.model_name},
        payload={"version": registered.version, "previous_champion": registered.previous_champion,
                 "gate_metric": registered.gate_metric, "value": registered.value,
                 "previous_value": registered.previous_value, "reason": registered.reason},
    )


def _publish_artifacts(paths: ProjectPaths, results: dict[str, Any]) -> None:
    """What a person sees on the flow run's page in the Prefect UI: the metrics table with its intervals, the
    champion gate's decision, the data gate's checks, the films quarantined per reason, and a link to the report."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    metrics = results["evaluate"].metrics
    test = metrics["test"]
    registered = results["register"]
    markdown = "\n".join([
        f"## Test metrics (n = {test.get('n')})", "",
        *([f"**Caveat: {metrics['patient_caveat']}.**", ""] if metrics.get("patient_caveat") else []),
        render("metrics_table.md.j2", headline=headline_rows(metrics)),
        f"**{registered.model_name} version {registered.version}**: "
        f"{'@champion' if registered.is_champion else '@challenger'} ({registered.reason})",
    ])
    create_markdown_artifact(key="cxr-metrics", markdown=markdown, description="Test metrics of this run")
    create_markdown_artifact(key="cxr-gate", markdown=_gate_markdown(registered),
                             description="The champion gate's decision")
    create_markdown_artifact(key="cxr-data-gate", markdown=_data_gate_markdown(results["validate"], results["ingest"]),
                             description="reports/validation/summary.json and data/interim/quarantine.csv in short")
    create_link_artifact(key="cxr-report", link=results["report"].resolve().as_uri(), link_text="reports/report.html",
                         description="The run's report")


def _gate_markdown(registered) -> str:
    """The champion gate: the decision, and the numbers it was taken on."""
    rows = [("decision", "@champion" if registered.is_champion else "@challenger"), ("version", registered.version),
            ("previous champion", registered.previous_champion), (f"{registered.gate_metric} (new)", registered.value),
            (f"{registered.gate_metric} (champion)", registered.previous_value),
            ("difference, 95% CI", registered.difference_ci95), ("margin", registered.margin),
            ("films compared", registered.n_films), ("patients compared", registered.n_patients)]
    table = "\n".join(f"| {name} | {'–' if value is None else value} |" for name, value in rows)
    return f"## Champion gate: {registered.model_name}\n\n{registered.reason}\n\n| | |\n|---|---|\n{table}\n"


def _data_gate_markdown(gate, ingested) -> str:
    """The data gate's checks (summary.json) and the films ingest quarantined, counted per reason."""
    checks = "\n".join(f"| {check.name} | {check.severity} | {'passed' if check.success else 'FAILED'} | {check.details} |"
                        for check in gate.checks)
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(ingested.quarantine_reasons.items())) or "| none | 0 |"
    return (f"## Data gate: {'passed' if gate.passed else 'failed'} ({gate.summary.get('n_images')} images)\n\n"
            f"| check | severity | result | details |\n|---|---|---|---|\n{checks}\n\n"
            f"## Quarantined films: {sum(ingested.quarantine_reasons.values())}\n\n| reason | films |\n|---|---|\n{reasons}\n")


def deploy(params_path: Path, notify_block: str | None = None) -> None:
    """Serve the flow as a scheduled deployment (needs a Prefect server: PREFECT_API_URL); blocks until stopped.
    With `notify_block`, first (re)creates the failure and champion-change alerts (create_alerts)."""
    config = load_config(params_path)
    settings = config.orchestration
    if notify_block:
        for name in create_alerts(notify_block, cxr_pipeline.name):
            log.info("automation '%s' notifies %s", name, notify_block)
    cxr_pipeline.serve(
        name=settings.deployment_name,
        cron=settings.cron,
        parameters={"params_path": str(params_path.resolve()), "overrides": [], "skip_if_unchanged": True},
        description="Scheduled retraining: skips training when data and params are unchanged since the last complete run.",
    )


ALERT_PREFIX = "cxr: "  # the automations `cxr deploy --notify-block` owns, by name (replaced on every deploy)


def create_alerts(notify_block: str, flow_name: str = "cxr-pipeline") -> list[str]:
    """Prefect automations that send the notification block `notify_block` ("BLOCK_TYPE/NAME", e.g.
    slack-webhook/ops, made in the Prefect UI or with `prefect block create`) a message when a run of the flow
    fails (with the failing stage's one-line reason) and when a run moves the champion alias (CHAMPION_CHANGED).

    Alerts go through the Prefect server the operator already runs, to the channel they chose: no new system.
    Replaces the automations an earlier deploy made (same names), so redeploying never doubles a message.
    Returns their names.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger
    from prefect.exceptions import ObjectNotFound

    block_type, _, name = notify_block.partition("/")
    if not block_type or not name:
        raise CxrError(f"--notify-block '{notify_block}': give BLOCK_TYPE/NAME, e.g. slack-webhook/ops (`prefect block ls` lists them)")
    alerts = {
        f"{ALERT_PREFIX}{flow_name} run failed": (
            EventTrigger(expect={"prefect.flow-run.Failed"}, posture="Reactive", threshold=1, within=0,
                         match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow_name}),
            f"{flow_name} run failed",
            "Flow run {{ flow_run.name }} of " + flow_name + " failed: {{ flow_run.state.message }}"),
        f"{ALERT_PREFIX}champion changed": (
            EventTrigger(expect={CHAMPION_CHANGED}, posture="Reactive", threshold=1, within=0),
            "new champion model",
            ("{{ event.resource['prefect.resource.name'] }} version {{ event.payload.version }} is @champion "
             "(was {{ event.payload.previous_champion or 'none' }}): {{ event.payload.reason }}")),
    }
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(name=name, block_type_slug=block_type, include_secrets=False)
        except ObjectNotFound:
            raise CxrError(f"--notify-block '{notify_block}': no such block on the Prefect server (`prefect block ls` lists them)") from None
        except httpx.HTTPError as exc:
            raise CxrError(f"no Prefect server answered at {client.api_url} ({type(exc).__name__}: {exc})") from None
        for title, (trigger, subject, body) in alerts.items():
            for old in client.read_automations_by_name(title):
                client.delete_automation(old.id)
            client.create_automation(AutomationCore(
                name=title, description=f"Made by `cxr deploy --notify-block {notify_block}`", trigger=trigger,
                actions=[SendNotification(block_document_id=block.id, subject=subject, body=body)]))
    return list(alerts)


def run_pipeline(params_path: Path, overrides: list[str]) -> dict:
    """Run the flow and turn a failed run into a CxrError with the failing stage's message."""
    state = cxr_pipeline(params_path=str(params_path), overrides=overrides, return_state=True)
    if state.is_failed():
        raise CxrError(state.message or "the pipeline flow failed")
    return state.result()
