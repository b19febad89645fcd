"""Provenance: what a model was trained from, read from the artifact and its training run, never from today's params.

The checkpoint says what the network is (model, task, labels, image size); the MLflow run `cxr train` opened says
what it was trained from (its logged params, the params hash, git commit and whether the work tree was dirty).
The model card, the report and the registry's tags are filled from here, so editing params.yaml after training
cannot make them describe a model that was never trained. `register` compares params.yaml with the run and refuses
a difference (or, with --from-run, records it), and refuses a run trained from a dirty work tree (or, with
--allow-dirty, records it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.paths import ProjectPaths

# The lock file of the checkout this code runs from (`make install` installs from it); None-like when absent.
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"

# The params `cxr train` reads itself (dvc.yaml's train stage) that decide the weights it produces from its input files.
TRAINED_FROM = ("data.task", "data.labels", "data.image_size")
TRAINED_FROM_SECTIONS = ("augment.", "train.")
SPEED_ONLY = ("train.num_threads",)


def shapes_the_weights(key: str) -> bool:
    """Whether param `key` changes the weights `cxr train` makes from the files it reads: data.task, data.labels,
    data.image_size and every augment and train key but train.num_threads (speed only, like data.num_workers).

    The other data keys and rebalance reach the weights only through files (the manifest, the images, the train
    index), and register compares those files' sha256 with the run's instead: comparing the params would refuse an
    edit that left the files as they were, where `dvc repro` reruns register but rightly skips train.
    """
    if key in SPEED_ONLY:
        return False
    return key in TRAINED_FROM or key.startswith(TRAINED_FROM_SECTIONS)


def logged_value(value: object) -> str:
    """A param as MLflow stores it (text; MLflow keeps at most 6000 characters, no param comes close to 500)."""
    return str(value)[:500]


def logged_params(config: Config) -> dict[str, str]:
    """Every param of `config` as the training run logs it."""
    return {key: logged_value(value) for key, value in config.as_flat_dict().items()}


@dataclass(frozen=True)
class TrainedModel:
    """The model in models/checkpoint.pt and the run that trained it, as the documents and the registry describe it."""

    run_id: str
    model: str  # train.model, from the checkpoint (with the member count for a deep ensemble: describe_network)
    image_size: int  # from the checkpoint
    task: str
    labels: list[str]
    sources: list[str]  # data.sources as the run logged them
    dedupe: str
    params_hash: str  # the run's params_sha256 tag; "unknown" for runs trained before it was logged
    git_commit: str
    git_dirty: str  # "true", "false" or "unknown" (outside git, or a run trained before it was logged)
    params: dict[str, str]  # every param the run logged


def trained_model(paths: ProjectPaths, client) -> TrainedModel:
    """The checkpoint's model and its training run (models/run.json names it)."""
    from pipeline import tracking
    from pipeline.models import describe_network, load_checkpoint

    run_id = tracking.read_run_id(paths)
    run = client.get_run(run_id)
    _, state = load_checkpoint(paths.checkpoint)
    params, tags = dict(run.data.params), run.data.tags
    return TrainedModel(
        run_id=run_id,
        model=describe_network(state),
        image_size=int(state["image_size"]),
        task=str(state["task"]),
        labels=list(state["labels"]),
        sources=source_paths(params.get("data.sources", "unknown")),
        dedupe=params.get("data.dedupe", "unknown"),
        params_hash=tags.get("params_sha256", "unknown"),
        git_commit=tags.get("git.commit", "unknown"),
        git_dirty=tags.get("git.dirty", "unknown"),
        params=params,
    )


def source_paths(logged: str) -> list[str]:
    """The paths of data.sources as the run logged them (the text of a list of source mappings)."""
    try:
        sources = ast.literal_eval(logged)
    except (ValueError, SyntaxError):
        return [logged]  # cut at 500 characters, or a run from older code: shown as logged
    if not isinstance(sources, list):
        return [logged]
    return [str(source.get("path")) if isinstance(source, dict) else str(source) for source in sources]


def params_differences(config: Config, trained: TrainedModel) -> list[str]:
    """`key: params.yaml X, run Y` for each param that shapes the weights and differs from what the run logged."""
    current = {key: value for key, value in logged_params(config).items() if shapes_the_weights(key)}
    return [f"{key}: {config.params_file} {value}, run {trained.params.get(key, '(not logged)')}"
            for key, value in sorted(current.items()) if trained.params.get(key) != value]


def check_registrable(config: Config, trained: TrainedModel, from_run: bool, allow_dirty: bool) -> dict[str, str]:
    """Refuse (one line) a model whose params differ from params.yaml unless from_run, or one trained from a dirty
    work tree unless allow_dirty. Returns the version tags that record what was let through (none when nothing was):
    `registered_with` (e.g. "from-run, allow-dirty") and `params_differ_from_run`."""
    differences = params_differences(config, trained)
    if differences and not from_run:
        raise CxrError(f"{config.params_file} differs from MLflow run {trained.run_id} that trained models/checkpoint.pt "
                       f"({'; '.join(differences)}): run `cxr train` again, restore those values, or register the model as "
                       "trained with `cxr register --from-run`")
    dirty = trained.git_dirty == "true"
    if dirty and not allow_dirty:
        raise CxrError(f"MLflow run {trained.run_id} was trained from a work tree with uncommitted changes (tag git.dirty, "
                       f"commit {trained.git_commit}): commit, then run `cxr train` again, or register it anyway with "
                       "`cxr register --allow-dirty`")
    overrides = (["from-run"] if differences else []) + (["allow-dirty"] if dirty else [])
    tags = {"registered_with": ", ".join(overrides)} if overrides else {}
    if differences:
        tags["params_differ_from_run"] = "; ".join(differences)
    return tags


def lock_sha256() -> str:
    """The sha256 of requirements.lock beside this code, or "unknown" (installed without its checkout)."""
    from pipeline.files import sha256_of

    return sha256_of(LOCK_FILE) if LOCK_FILE.is_file() else "unknown"


def installed_distributions() -> str:
    """Every installed distribution as `name==version` lines, sorted: what `pip freeze` prints, without needing pip
    (a uv-made environment has none) or a subprocess."""
    from importlib.metadata import distributions

    pins = {f"{dist.metadata['Name']}=={dist.version}" for dist in distributions() if dist.metadata["Name"]}
    return "\n".join(sorted(pins, key=str.lower)) + "\n"
