"""The `cxr` command: one subcommand per pipeline stage, plus the whole flow, prediction and demo data.

The CLI only parses and calls `pipeline` functions. Errors a user can cause are printed as one
line and exit with status 2; heavy libraries are imported only by the command that runs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.errors import CxrError

app = typer.Typer(
    name="cxr",
    help=(
        "Chest X-ray classifier pipeline: ingest → validate → rebalance → train (with augmentation) → "
        "evaluate → register. Each stage reads params.yaml; `cxr pipeline` runs them all as one Prefect flow, "
        "`dvc repro` runs them as DVC stages. Start with `cxr demo-data` then `cxr pipeline`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file; its folder is the project root where data/, models/ and reports/ live.")]
SetOption = Annotated[
    list[str],
    typer.Option(
        "--set",
        help="Override one param, e.g. --set train.epochs=2 or --set 'data.sources=[data/raw/a, data/raw/b]'. "
        "The value is parsed as YAML. Repeatable.",
    ),
]

T = TypeVar("T")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("pipeline", "flows"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False


def _run(action: Callable[[], T]) -> T:
    """Run a command body; a CxrError becomes one line on stderr and exit status 2."""
    _setup_logging()
    try:
        return action()
    except CxrError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _stage(params: Path, overrides: list[str], name: str, **options: Any) -> Any:
    """Load config and project paths, then run the stage `name` of pipeline.stages; its result."""

    def action() -> Any:
        from pipeline.config import load_config
        from pipeline.paths import ProjectPaths
        from pipeline.stages import stage

        config = load_config(params, overrides)
        return stage(name).run(ProjectPaths(params.resolve().parent), config, **options)

    return _run(action)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write (replaced if it exists).")] = Path("data/raw/demo"),
    n: Annotated[int, typer.Option(min=20, help="Number of usable images.")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical files.")] = 0,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 256,
) -> None:
    """Write a synthetic chest-X-ray-like demo set (DICOM, PNG, JPEG; normal:pneumonia about 1:3).

    DICOM files are CR and DX, some MONOCHROME1, 12-bit with a window, and carry fake patient names,
    IDs, birth dates and institutions so de-identification can be checked. A few files are broken on
    purpose (truncated DICOM, empty PNG, a text file named .dcm) to show the quarantine.
    """

    def action() -> None:
        from pipeline.demo_data import write_demo_data

        summary = write_demo_data(out, n=n, seed=seed, size=size)
        typer.echo(
            f"demo data: {summary.n_images} images of {summary.n_patients} patients {summary.counts}, "
            f"formats {summary.formats}, {len(summary.broken)} broken on purpose → {summary.out_dir}"
        )

    _run(action)


@app.command()
def ingest(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    reassign_splits: Annotated[bool, typer.Option(
        "--reassign-splits",
        help="Decide every patient's split again (as a first ingest does) and rewrite data/splits.parquet; "
        "training runs on it are tagged data.splits_reassigned: their test scores do not compare with those of "
        "models trained before.")] = False,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Print where the time went: listing the sources, hashing files (and the cache checks), "
        "decoding, finishing (cache, splits, writing).")] = False,
) -> None:
    """Read data.sources (class folders, CSV tables, MedMNIST .npz), decode DICOM/PNG/JPEG, de-identify,
    split by patient and write data/interim/manifest.parquet, images.npy and quarantine.csv.

    A patient's split is decided once and recorded in data/splits.parquet: re-ingesting never moves a
    recorded patient, and a change that would is refused. Files that cannot be used go to quarantine.csv
    with a reason; the run goes on.

    Decoded films are kept in data/cache/ (every data.checkpoint_every films, and at Ctrl-C), so running it
    again decodes only new files, and an interrupted run continues where it stopped.
    """
    result = _stage(params, set_, "ingest", reassign_splits=reassign_splits)
    if profile:
        typer.echo(profile_table(result.seconds, result.n_decoded))


def profile_table(seconds: dict[str, float], n_decoded: int) -> str:
    """`cxr ingest --profile`: each step's wall time and share, and the decoding rate."""
    total = sum(seconds.values()) or 1e-9
    lines = [f"{'step':<10} {'seconds':>8} {'share':>6}"]
    lines += [f"{step:<10} {value:>8.2f} {value / total:>6.0%}" for step, value in seconds.items()]
    lines.append(f"{'total':<10} {total:>8.2f}")
    if n_decoded and seconds.get("decoding"):
        lines.append(f"decoded {n_decoded} films at {n_decoded / seconds['decoding']:.0f} films/s")
    return "\n".join(lines)


@app.command()
def validate(params: ParamsOption = Path("params.yaml"), set_: SetOption = []) -> None:  # noqa: B006
    """Run the great-expectations data-quality gate over the manifest and image store: labels, every split
    holding every label, exact and near duplicates across splits, patient leakage, class ratio, intensity,
    original size, modality and view. Each check is blocking, warning or ignore (validation.severity).
    Writes reports/validation/ (results.json, summary.json, Data Docs HTML); exits 2 if a blocking check fails.
    """

    result = _stage(params, set_, "validate")
    for check in result.checks:
        mark = "ok  " if check.success else ("FAIL" if check.severity == "blocking" else "warn")
        typer.echo(f"  {mark} {check.name}: {check.details}", err=True)
    typer.echo(f"  summary {result.summary_path}; Data Docs {result.data_docs_path}", err=True)


@app.command()
def rebalance(params: ParamsOption = Path("params.yaml"), set_: SetOption = []) -> None:  # noqa: B006
    """Resample the training split with imbalanced-learn (rebalance.method: none, random_over, random_under, combined)
    and write the chosen image indices to data/processed/train_index.npy.
    """
    _stage(params, set_, "rebalance")


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from models/train_state.pt, or an ensemble's from models/ensemble/ (same result as an uninterrupted run).")] = False,
) -> None:
    """Train train.model with batch augmentation (GPU when present, else CPU), log params and per-epoch
    metrics to MLflow, and keep the last epoch's model (train.keep best: the best on validation AUC) in
    models/checkpoint.pt.
    Under torchrun (`torchrun --nproc-per-node 4 -m cxr train`) the processes train together with
    DistributedDataParallel; see README "Training on several GPUs or machines".
    """
    _stage(params, set_, "train", resume=resume)


@app.command()
def crossval(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of folds.")] = 5,
) -> None:
    """Cross-validate the training settings: pool train+val, split it into --folds folds by patient (stratified on
    the label, seeded by data.seed), and train once per fold with that fold as validation. Prints the mean and
    standard deviation of validation AUC and accuracy (at 0.5) of each fold's model after its last epoch and writes
    reports/crossval.json (with the best epoch's AUC, optimistic: picked on the same fold); each fold is an MLflow
    run tagged crossval.fold. Needs `cxr ingest` first; the test split is not used. Takes `folds` trainings.
    """

    def action() -> None:
        from pipeline.config import load_config
        from pipeline.crossval import crossval_stage
        from pipeline.paths import ProjectPaths

        crossval_stage(ProjectPaths(params.resolve().parent), load_config(params, set_), folds)  # it logs the mean ± sd

    _run(action)


@app.command("audit-labels")
def audit_labels(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of cross-validation folds (by patient).")] = 5,
    top: Annotated[int, typer.Option("--top", min=0, help="Suspects shown on the review page.")] = 60,
) -> None:
    """Find training and validation films whose label is probably wrong. Each film is scored by a model that never
    saw it (the `cxr crossval` fold models under models/crossval/, kept while they match today's films, labels and
    training params, else trained: up to --folds trainings), then confident learning (cleanlab) flags the labels those
    scores contradict. Writes reports/label_issues.csv (path, source, split, label, suggested_label, score,
    duplicate_of; lower score = more suspicious, most suspicious first; duplicate_of names a near-duplicate film
    carrying another label) and reports/label_review.html (the first --top films with Grad-CAM and the `cxr review`
    command that records a decision), and logs the counts to an MLflow run tagged cxr.audit=labels. Changes no
    label. Needs `cxr ingest` first; the test split is not read.
    """

    def action() -> None:
        from pipeline.config import load_config
        from pipeline.label_audit import audit_labels_stage
        from pipeline.paths import ProjectPaths

        result = audit_labels_stage(ProjectPaths(params.resolve().parent), load_config(params, set_), folds, top)
        typer.echo(f"{len(result.issues)} label issue(s) among {result.n_films} train+val films "
                   f"({result.n_flagged} flagged by confident learning, {result.n_conflicting_duplicates} with a "
                   f"near-duplicate of another label): {result.issues_path}; review the first "
                   f"{min(top, len(result.issues))} in {result.review_path}")

    _run(action)


@app.command()
def evaluate(params: ParamsOption = Path("params.yaml"), set_: SetOption = []) -> None:  # noqa: B006
    """Choose the operating threshold on the validation split (evaluate.threshold_method: youden, sensitivity or
    fixed), then score the checkpoint on the test split at it: AUC, accuracy, sensitivity, specificity,
    confusion matrix. Writes reports/metrics.json and reports/plots/, and logs them to the training's MLflow run.
    """
    _stage(params, set_, "evaluate")


@app.command()
def register(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    from_run: Annotated[bool, typer.Option(
        "--from-run",
        help="Register the model although params.yaml's training params (data.task, data.labels, data.image_size, "
        "augment, train) differ from those its training run logged; the documents describe the run either way, and "
        "the version is tagged registered_with: from-run.")] = False,
    allow_dirty: Annotated[bool, typer.Option(
        "--allow-dirty",
        help="Register a model trained from a work tree with uncommitted changes to tracked files (its run's git.dirty "
        "tag); the version is tagged registered_with: allow-dirty and its model card says so.")] = False,
) -> None:
    """Log the model to MLflow (pyfunc with signature, input example, tags, patient set and a model card), register a
    new version of register.model_name, and run the champion gate: both models scored on the raw test films of
    patients neither trained or was validated on, each at its own image size. The new version takes `champion` only
    when it is not worse on register.gate_metric and the lower bound of the patient-clustered 95 % interval of the
    difference is above -register.margin; else it gets `challenger`. Prints the decision. The tags and the model card
    describe the checkpoint and its training run, never today's params.yaml.
    """
    result = _stage(params, set_, "register", from_run=from_run, allow_dirty=allow_dirty)
    state = "is @champion" if result.is_champion else "is @challenger (champion unchanged)"
    typer.echo(f"{result.model_name} version {result.version} {state}: {result.reason}")


@app.command()
def report(params: ParamsOption = Path("params.yaml"), set_: SetOption = []) -> None:  # noqa: B006
    """Write reports/report.html: one self-contained page (no server, no network) with the data summary and gate
    results, test metrics with 95 % intervals, subgroups and external sites, the plots, Grad-CAM overlays of true and
    false positives and negatives, and the registry decision.
    """

    typer.echo(f"report: {_stage(params, set_, 'report')}", err=True)


@app.command()
def pipeline(params: ParamsOption = Path("params.yaml"), set_: SetOption = []) -> None:  # noqa: B006
    """Run every stage, ingest to register, as one Prefect flow run (local mode: no server needed;
    set PREFECT_API_URL to use a Prefect server). Prints where the results are.
    """

    def action() -> None:
        from flows.pipeline_flow import run_pipeline
        from pipeline.config import load_config

        load_config(params, set_)  # fail fast on bad params, before Prefect starts
        run_pipeline(params.resolve(), list(set_))
        _print_summary(params.resolve().parent)

    _run(action)


@app.command()
def forget(
    pseudonym: Annotated[str, typer.Argument(help="The patient's pseudonym: the manifest's patient_hash (20 hex characters).")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Erase one patient's films from the project: the manifest and image store (rows renumbered), every copy in the
    decode cache, dropped_duplicates.csv and the split registry; the training index and reports/predictions.csv,
    which number the old store's rows, are removed. The erasure (time, pseudonym, counts; no identifier) is appended
    to data/erasures.jsonl, and later ingests skip the patient's source files (quarantine reason `erased`): delete
    those files to remove the films for good. Prints what may still hold the films (models, report, DVC's cache).
    """

    def action() -> None:
        from pipeline.config import load_config
        from pipeline.forget import forget_patient
        from pipeline.paths import ProjectPaths

        erased = forget_patient(ProjectPaths(params.resolve().parent), load_config(params), pseudonym)
        typer.echo(f"patient {erased.patient_hash} erased: {erased.n_films} films from the manifest and image store, "
                   f"{erased.n_cached} from the decode cache")

    _run(action)


key_app = typer.Typer(help="The de-identification key (README \"What is sensitive\").", no_args_is_help=True)
app.add_typer(key_app, name="key")


@key_app.command("rotate")
def key_rotate(
    new_key_file: Annotated[Path, typer.Option("--new-key-file", help="A file (mode 600, not a symlink) holding the new key: "
                                               "32 or more random characters, e.g. from `python -c 'import secrets; "
                                               "print(secrets.token_hex(32))'`.")],
    drop_absent: Annotated[bool, typer.Option("--drop-absent", help="Drop split registry patients none of whose films "
                                              "data.sources lists any more (their pseudonyms cannot be carried over); "
                                              "without it, such patients stop the rotation.")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Move the project to a new de-identification key: the manifest, dropped_duplicates.csv, the split registry (every
    split kept) and the erasure record are re-pseudonymised from the current key (CXR_DEID_KEY, or the key file of
    deid.key_scope) to the key in --new-key-file, reading patient IDs from the sources again (DICOM headers only:
    nothing is decoded). Then the new key replaces the key file atomically; with CXR_DEID_KEY, set it to the new key.
    """

    def action() -> None:
        from pipeline.config import load_config
        from pipeline.key_rotation import rotate_key
        from pipeline.paths import ProjectPaths

        done = rotate_key(ProjectPaths(params.resolve().parent), load_config(params), new_key_file, drop_absent)
        where = f"the key file {done.key_file}" if done.key_file else "CXR_DEID_KEY (set it to the new key now)"
        typer.echo(f"rotated: {done.n_films} films and {done.n_patients} recorded patients under the new key, in {where}")

    _run(action)


review_app = typer.Typer(help="Record a reviewer's label decisions in data/labels/overrides.csv (README \"Correcting labels\").",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")

FilmsArgument = Annotated[list[str], typer.Argument(help="Films, by path as reports/label_issues.csv and the manifest "
                                                     "show them (SOURCE/PATH where two sources hold the path).")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why: kept with the decision in overrides.csv.")]
ReviewerOption = Annotated[str | None, typer.Option("--reviewer", help="Who decided; default: your user name.")]


def _review(params: Path, verdict: str, films: list[str], reason: str, reviewer: str | None) -> None:
    def action() -> None:
        from pipeline.config import load_config
        from pipeline.paths import ProjectPaths
        from pipeline.review import review

        done = review(ProjectPaths(params.resolve().parent), load_config(params), verdict, films, reason, reviewer)
        kept = f" ({done.n_unchanged} already recorded)" if done.n_unchanged else ""
        typer.echo(f"review {verdict}: {done.n_written} decision(s) written to {done.path}{kept}; "
                   "`dvc repro` (or `cxr pipeline`) retrains on them")

    _run(action)


@review_app.command("accept")
def review_accept(films: FilmsArgument, reason: ReasonOption, reviewer: ReviewerOption = None,
                  params: ParamsOption = Path("params.yaml")) -> None:
    """The films take the label `cxr audit-labels` suggested for them (reports/label_issues.csv)."""
    _review(params, "accept", films, reason, reviewer)


@review_app.command("reject")
def review_reject(films: FilmsArgument, reason: ReasonOption, reviewer: ReviewerOption = None,
                  params: ParamsOption = Path("params.yaml")) -> None:
    """The films keep their given label; recorded as reviewed, so the audit need not suggest them again."""
    _review(params, "reject", films, reason, reviewer)


@review_app.command("exclude")
def review_exclude(films: FilmsArgument, reason: ReasonOption, reviewer: ReviewerOption = None,
                   params: ParamsOption = Path("params.yaml")) -> None:
    """The films leave the data: ingest quarantines them as excluded_by_review."""
    _review(params, "exclude", films, reason, reviewer)


def _registry(params: Path):  # -> tuple[ProjectPaths, MlflowClient, str]
    """The project's paths, MLflow client and registered model name, for commands that move aliases by hand."""
    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.paths import ProjectPaths

    config = load_config(params)
    paths = ProjectPaths(params.resolve().parent)
    return paths, tracking.client(paths), config.registry.model_name


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The registered version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why; recorded in the registry's champion history.")] = "no reason given",
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Give VERSION of register.model_name the `champion` alias by hand (a person's decision), appended to the champion
    history with the time, the OS user, the reason and the gate's decision on that version."""

    def action() -> None:
        from pipeline.champion import promote as promote_version

        paths, client, name = _registry(params)
        moved = promote_version(paths, client, name, version, reason)
        typer.echo(f"{name} version {version} is @champion" + ("" if moved else " already; nothing moved"))

    _run(action)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded in the registry's champion history.")] = "no reason given",
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Move `champion` back to the version the current one replaced: the champion history is a stack (v1, v2, v3
    promoted, then rollback gives v2, and again v1). Refuses a version that no longer loads or whose task, labels or
    image size differ from the current champion's. Logged like every move."""

    def action() -> None:
        from pipeline.champion import rollback as roll_back

        paths, client, name = _registry(params)
        typer.echo(f"{name} version {roll_back(paths, client, name, reason)} is @champion again")

    _run(action)


@app.command()
def history(
    params: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as a JSON list.")] = False,
) -> None:
    """Print every move of register.model_name's `champion` alias, oldest first: when (UTC), the version, the move
    (automatic by the gate, promote or rollback by a person), who (OS user and host), why, and the gate's decision.
    The log is kept as one MLflow run per move in the experiment <model name>-champion-history of the tracking store.
    """

    def action() -> None:
        from pipeline.champion import champion_history

        _, client, name = _registry(params)
        entries = champion_history(client, name)
        if as_json:
            typer.echo(json.dumps(entries, indent=2))
            return
        if not entries:
            typer.echo(f"{name}: no champion moves recorded")
        for entry in entries:
            typer.echo(f"{entry['at']}  v{entry['version']}  {entry['action']:<9}  {entry['user']}@{entry['host']}  {entry['reason']}")

    _run(action)


@app.command()
def deploy(params: ParamsOption = Path("params.yaml"),
           notify_block: Annotated[str | None, typer.Option(
               "--notify-block", metavar="BLOCK_TYPE/NAME",
               help="A Prefect notification block (e.g. slack-webhook/ops; `prefect block ls`) to alert when a run "
                    "fails (with the stage's reason) or moves the champion: made as two Prefect automations "
                    "named 'cxr: ...', replaced on every deploy.")] = None) -> None:
    """Serve the pipeline as a scheduled Prefect deployment (cxr-pipeline/<orchestration.deployment_name>,
    cron orchestration.cron) until stopped. A scheduled run skips training when the data version and params are
    unchanged since its last complete run. Needs a Prefect server: `prefect server start`, then
    PREFECT_API_URL=http://127.0.0.1:4200/api cxr deploy. Alerts: --notify-block; a flow run emits the Prefect
    event cxr.champion.changed when it moves the champion, for automations of your own.
    """

    def action() -> None:
        from flows.pipeline_flow import deploy as serve_deployment
        from pipeline.config import prefect_api_url

        if not prefect_api_url():
            raise CxrError("cxr deploy needs a Prefect server: run `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
        serve_deployment(params.resolve(), notify_block)

    _run(action)


@app.command()
def summary(params: ParamsOption = Path("params.yaml")) -> None:
    """Print the latest test metrics, the registered model and where every result is."""
    _run(lambda: _print_summary(params.resolve().parent))


@app.command()
def status(params: ParamsOption = Path("params.yaml"),
           as_json: Annotated[bool, typer.Option("--json", help="The same as one JSON object, for scripts.")] = False) -> None:
    """What is live and why: data version, last DVC and flow runs, champion and challenger with the gate's numbers,
    quarantine counts, and with a Prefect server (PREFECT_API_URL) the last failed flow runs with their reasons and
    the deployment's next scheduled run. Reads only the project's small files and asks the server with a short
    timeout, so it answers at once."""
    def action() -> None:
        from pipeline.config import prefect_api_url
        from pipeline.paths import ProjectPaths
        from pipeline.status import project_status, status_lines

        found = project_status(ProjectPaths(params.resolve().parent), prefect_api_url())
        typer.echo(json.dumps(found, indent=2) if as_json else "\n".join(status_lines(found)))

    _run(action)


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="DICOM, PNG or JPEG files, folders of them, or DICOMweb study or series URLs "
                                                    "(http(s)://host/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]), "
                                                    "whose films are retrieved with WADO-RS and named by their instance URL.")],
    model: Annotated[str | None, typer.Option("--model", help="MLflow model URI; default models:/<register.model_name>@champion.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print a JSON list: {"path", "label", "probability"}, {"path", "out_of_scope"} (a film '
                                                         'the model was not trained for, with the reason) or {"path", "error"} per file '
                                                         '(multiclass and multilabel models add "probabilities" per label; '
                                                         'with --explain, also "explanation": the overlay PNG, or for a PACS film the '
                                                         'instance URL of its Secondary Capture; films the model scored add "ood_score", '
                                                         'its out-of-distribution score).')] = False,
    explain: Annotated[Path | None, typer.Option("--explain", metavar="OUT_DIR", help="Also write a Grad-CAM overlay PNG per classified file into "
                                                 "this folder (<stem>_gradcam.png): the film with a heat map of where the model found "
                                                 "evidence for the positive class. For DICOMweb URLs (with --store-results) the "
                                                 "overlay goes back into the study as a Secondary Capture instead, never into "
                                                 "this folder. Not available for vit models.")] = None,
    store_results: Annotated[bool, typer.Option("--store-results", help="For DICOMweb URLs: store one DICOM Structured Report per "
                                                "classified film (finding, probability, threshold, model name and version), and with "
                                                "--explain a Grad-CAM Secondary Capture, back into its study with STOW-RS. Sign in with "
                                                "CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN.")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Classify chest X-ray files, or the films of a study or series on a PACS (DICOMweb), with a registered model.
    A film outside what the model was trained for (by its DICOM header: modality, body part, view; colour or
    multi-frame; or by its pixels: the network's out-of-distribution score above the threshold set on validation,
    or a blank image) gets out_of_scope and the reason, not a probability. Local files are answered first, then each
    URL's films. Each answer is appended to the monitoring log (see `cxr monitor`; no path or identifier is
    logged). Exit status 0 when at least one file was classified."""

    def action() -> list:
        from pipeline.config import dicomweb_credentials, load_config
        from pipeline.dicomweb import is_url, reported_model, parse_address, predict_dicomweb
        from pipeline.imaging import limits_of
        from pipeline.paths import ProjectPaths
        from pipeline.predict import expand_inputs, load_model, monitor_answers, predict_files
        from pipeline.privacy import private_umask

        config = load_config(params)
        addresses = [parse_address(item) for item in paths if is_url(item)]
        files = expand_inputs([Path(item) for item in paths if not is_url(item)])
        if not files and not addresses:
            raise CxrError(f"no image files found in {', '.join(paths)}")
        if store_results and not addresses:
            raise CxrError("--store-results writes back to a PACS: give DICOMweb study or series URLs")
        if explain is not None and addresses and not store_results:
            raise CxrError("--explain with DICOMweb URLs stores each overlay back into its study as a Secondary Capture: "
                           "add --store-results (overlays of PACS films are never written to the project)")
        credentials = dicomweb_credentials() if addresses else None
        uri = model or f"models:/{config.registry.model_name}@champion"
        project = ProjectPaths(params.resolve().parent)
        loaded, limits = load_model(uri, project), limits_of(config.data)
        identity = reported_model(loaded, uri, project) if store_results else None
        with private_umask(config.privacy.mask):  # Grad-CAM overlays show the films
            answers = predict_files(loaded, files, explain_dir=explain, limits=limits) if files else []
            if addresses:
                answers += predict_dicomweb(loaded, addresses, credentials, identity, explain=explain is not None, limits=limits)
        monitor_answers(loaded, answers, project.root)
        return answers

    results = _run(action)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.error is not None:
                typer.echo(f"{r.path}\terror: {r.error}")
            elif r.out_of_scope is not None:
                typer.echo(f"{r.path}\tout_of_scope: {r.out_of_scope}")
            else:
                typer.echo("\t".join([r.path, r.label or "(none)", *_shown_probabilities(r), *([r.explanation] if r.explanation else [])]))
    if not any(r.error is None and r.out_of_scope is None for r in results):
        raise typer.Exit(1)


@app.command()
def monitor(
    since: Annotated[str | None, typer.Option("--since", metavar="DATE", help="First day (YYYY-MM-DD, UTC) or ISO timestamp to include.")] = None,
    until: Annotated[str | None, typer.Option("--until", metavar="DATE", help="Last day to include (a bare date includes that whole day, UTC), "
                                              "or an ISO timestamp to stop before.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    log_file: Annotated[Path | None, typer.Option("--log", help="The monitoring log to read; default $CXR_MONITOR_LOG, else "
                                                  "reports/monitoring/predictions.jsonl in the project.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Summarise what the models answered over a period, from the log `cxr predict` and the served model append
    to (one line per film, no identifiers): volume, share out of scope and by reason, share of errors, label
    shares, and per model version the drift of out-of-distribution scores and probabilities against its
    validation films (two-sample Kolmogorov-Smirnov; drift when p < 0.01 over at least 30 films). Exit status 3
    when drift is flagged, so a scheduled check can alert."""

    def action() -> dict:
        from pipeline.monitoring import log_path, model_references, parse_day, project_log, read_records, summarise
        from pipeline.paths import ProjectPaths

        project = ProjectPaths(params.resolve().parent)
        path = log_file or log_path(project_log(project.root))
        if path is None:
            raise CxrError("monitoring is off ($CXR_MONITOR_LOG=off): pass --log FILE")
        start, end = parse_day(since, "--since"), parse_day(until, "--until", end=True)
        records, unreadable = read_records(path, start, end)
        keys = {(r.get("model"), r.get("run_id")) for r in records}
        summary = summarise(records, model_references(project, keys) if records else {})
        return {"log": str(path), "since": since, "until": until, "unreadable_lines": unreadable} | summary

    summary = _run(action)
    typer.echo(json.dumps(summary, indent=2) if as_json else _monitor_text(summary))
    if summary["drift"]:
        raise typer.Exit(3)


def _monitor_text(summary: dict) -> str:
    """The summary as a few readable lines."""
    period = f"{summary['since'] or 'start'} .. {summary['until'] or 'now'}"
    lines = [f"{summary['log']} ({period}): {summary['films']} films"]
    if not summary["films"]:
        return lines[0]
    answers = summary["answers"]
    lines.append(f"classified {answers['classified']}, out of scope {answers['out_of_scope']} ({summary['share_out_of_scope']:.1%}), "
                 f"errors {answers['error']} ({summary['share_error']:.1%})")
    for kind in ("out_of_scope", "error"):
        if summary[f"{kind}_reasons"]:
            lines.append(f"{kind.replace('_', ' ')} by reason: " + ", ".join(f"{r} {s:.1%}" for r, s in summary[f"{kind}_reasons"].items()))
    if summary["label_shares"]:
        lines.append("labels (of classified): " + ", ".join(f"{label} {s:.1%}" for label, s in summary["label_shares"].items()))
    for model in summary["models"]:
        which = f" v{model['version']}" if model["version"] else f" run {model['run_id']}" if model["run_id"] else ""
        name = f"{model['model'] or 'unknown model'}{which}"
        lines.append(f"{name}: {model['films']} films")
        for test, what in (("ood_score_drift", "OOD scores"), ("probability_drift", "probabilities")):
            result = model[test]
            figures = f" (KS {result['ks_statistic']}, p={result['p_value']:.3g}, n={result['n']} vs {result['n_reference']})" if "p_value" in result else ""
            lines.append(f"  {what}: {result['note']}{figures}")
    if summary["unreadable_lines"]:
        lines.append(f"{summary['unreadable_lines']} unreadable line(s) skipped")
    lines.append("DRIFT FLAGGED" if summary["drift"] else "no drift flagged")
    return "\n".join(lines)


def _shown_probabilities(prediction: Any) -> list[str]:
    """The positive label's probability (binary), or every label's as label=probability."""
    if prediction.probabilities is None:
        return [f"{prediction.probability:.4f}"]
    return [f"{label}={probability:.4f}" for label, probability in prediction.probabilities.items()]


def _print_summary(root: Path) -> None:
    """The closing message: headline metrics and where to look next."""
    from pipeline.metrics import format_metric
    from pipeline.paths import ProjectPaths
    from pipeline.tasks import task_for

    paths = ProjectPaths(root)
    if not paths.metrics.exists():
        raise CxrError(f"{paths.metrics} is missing: run `cxr pipeline` or `dvc repro` first")
    metrics = json.loads(paths.metrics.read_text())
    test = metrics["test"]
    intervals = test.get("ci95", {})

    def shown(name: str) -> str:
        low, high = intervals.get(name) or (None, None)
        ci = f" ({format_metric(low, 3)}-{format_metric(high, 3)})" if low is not None else ""
        return f"{format_metric(test.get(name), 3)}{ci}"

    task = task_for(metrics["task"], metrics["labels"])
    headline = "Test " + "  ".join(f"{task.metric_title(name)} {shown(name)}" for name in task.headline)
    patients = f" of {test['n_patients']} patients" if test.get("n_patients") is not None else ""
    lines = ["", f"{headline}  (n={test.get('n')} test films{patients}; threshold chosen on validation "
                 f"({metrics.get('threshold_method', 'fixed')}); 95% intervals resample patients)"]
    if paths.registered.exists():
        reg = json.loads(paths.registered.read_text())
        state = "is @champion" if reg["is_champion"] else "registered (champion unchanged)"
        lines.append(f"Model:       {reg['model_name']} version {reg['version']} {state}: {reg['reason']}")
    lines += [
        f"Report:      {paths.reports / 'report.html'} (open in a browser; self-contained)",
        f"Metrics:     {paths.metrics}",
        f"Plots:       {paths.plots}/ (roc, pr, calibration, confusion PNGs; `dvc plots show` renders the CSVs)",
        f"Data gate:   {paths.validation_summary}",
        f"Quarantine:  {paths.quarantine}",
        f"Runs:        mlflow ui --backend-store-uri sqlite:///{root / 'mlruns.db'}  (then open http://127.0.0.1:5000)",
        "Predict:     cxr predict PATH... --json",
    ]
    typer.echo("\n".join(lines))
