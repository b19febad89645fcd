"""Register: log the trained model to MLflow as a pyfunc, with its tags, patient set and model card, and run the
champion gate.

The `champion` alias moves only when the new version is not worse than the champion on `register.gate_metric` and
non-inferior at `register.margin`, scored on test films neither model has seen (pipeline.champion); otherwise the
new version gets the `challenger` alias and the decision says why. Aliases, not the deprecated stages.

What the version says about itself (tags, model card) comes from the checkpoint and its training run
(pipeline.provenance), never from today's params.yaml; a params.yaml that differs from the run, or a run trained from
a dirty work tree, is refused unless `--from-run` or `--allow-dirty` says otherwise (and the version records it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.champion import (CHALLENGER, CONTRACT_TAG, PATIENTS_ARTIFACT_TAG, PATIENTS_TAG, GateDecision, current_champion,
                               first_decision, gate, move_champion, patient_record)
from pipeline.config import Config
from pipeline.documents import (count_rows, describe_ece, describe_intervals, describe_operating_point, describe_threshold,
                                describe_threshold_spread, describe_tta,
                                headline_rows, per_label_rows, render, subgroup_tables)
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_json, sha256_of, write_json
from pipeline.manifest import REVIEW_TAGS, check_labels, read_manifest
from pipeline.paths import ProjectPaths
from pipeline.provenance import TrainedModel, check_registrable, trained_model

log = logging.getLogger(__name__)

MAX_OOD_FILMS = 20_000  # per split, to fit the out-of-distribution statistics and set their threshold on

# What the served model imports (tests/test_stages.py checks the list against the imports): files, and the tasks
# package. It decodes file bytes as ingest does (imaging, which opens a JPEG with film_jpeg and reads deid's
# Identity, which reads config) and judges scope, by header and by the network's out-of-distribution score (ood).
SERVING_MODULES = ("__init__.py", "errors.py", "labels.py", "tasks", "metrics.py", "losses.py", "models.py", "serving.py",
                   "mlflow_model.py", "imaging.py", "film_jpeg.py", "deid.py", "config.py", "scope.py", "monitoring.py",
                   "ood.py", "tta.py")


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: int
    is_champion: bool
    gate_metric: str
    value: float | None  # the new version's gate metric (on the gate's films when compared)
    previous_champion: int | None
    previous_value: float | None  # the previous champion's, on the same films
    difference_ci95: list[float] | None  # of (new - champion): paired, patient-clustered bootstrap
    reason: str
    margin: float | None = None
    difference: float | None = None
    n_films: int | None = None  # the films compared: test films of patients neither model trained or validated on
    n_patients: int | None = None


def register_stage(paths: ProjectPaths, config: Config, from_run: bool = False, allow_dirty: bool = False) -> RegisterResult:
    """Log checkpoint + signature + input example as a new registered version; move the alias if it earned it.

    Idempotent: the same checkpoint and threshold from the same run reuse the version already registered
    (a rerun, or a Prefect retry after a dropped connection, does not add a copy), and run the gate again.
    from_run registers a model whose training params differ from params.yaml, allow_dirty one trained from a dirty
    work tree (pipeline.provenance.check_registrable); either is recorded on the version and in its model card.
    """
    from pipeline import tracking

    if not paths.checkpoint.exists():
        raise CxrError(f"{paths.checkpoint} is missing: run `cxr train` first")
    metrics = read_json(paths.metrics, "`cxr evaluate`")
    if metrics.get("checkpoint_sha256") != sha256_of(paths.checkpoint):
        raise CxrError(f"{paths.metrics} describes another checkpoint than {paths.checkpoint}: run `cxr evaluate` first")
    check_labels(paths.manifest, metrics["task"], metrics["labels"], "metrics.json's model")  # before anything is registered
    run_id = tracking.read_run_id(paths)
    client = tracking.client(paths)
    name, settings = config.registry.model_name, config.registry
    trained = trained_model(paths, client)
    registered_with = check_registrable(config, trained, from_run, allow_dirty)  # before anything is registered
    patients = _patients_trained_on(paths, client, run_id, config.deid.key_scope)

    fingerprint = f"{sha256_of(paths.checkpoint)}@{json.dumps(metrics['threshold'], sort_keys=True)}@{metrics['temperature']}"
    if metrics.get("tta"):  # another set of test-time views serves other probabilities: another version
        fingerprint += "@tta:" + hashlib.sha256(json.dumps(metrics["tta"], sort_keys=True).encode()).hexdigest()[:12]
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}' and tags.fingerprint='{fingerprint}'")
    if existing:
        version = int(existing[0].version)
        if not existing[0].tags.get(PATIENTS_TAG):  # a retry after a failure in between
            _record_patients(client, name, version, run_id, patients)
    else:
        version, guard = _log_model(paths, config, run_id, trained.params.get("data.crop", "none"))
        client.set_model_version_tag(name, str(version), "fingerprint", fingerprint)
        _record_patients(client, name, version, run_id, patients)
        _describe_version(client, paths, trained, name, version, metrics, registered_with, guard)

    previous = current_champion(client, name)  # fails closed: a store that does not answer stops here
    split, metric = settings.gate_metric.split("_", 1)
    own = metrics[split].get(metric)
    if previous is not None and int(previous.version) == version:
        decision = GateDecision(True, settings.gate_metric, settings.margin, own, own, None, None, None, None, version,
                                "already champion")
    else:
        decision = gate(paths, config, client, previous, version, patients) if previous is not None else \
            first_decision(config, own, metrics[split].get("n"))
        if decision.promote:
            move_champion(paths, client, name, version, "automatic", decision.reason, decision.as_dict(),
                          int(previous.version) if previous else None)
        else:
            client.set_registered_model_alias(name, CHALLENGER, str(version))
        client.set_model_version_tag(name, str(version), "gate", json.dumps(decision.as_dict(), sort_keys=True))
    client.set_model_version_tag(name, str(version), "decision", decision.reason)

    promote, reason = decision.promote, decision.reason
    result = RegisterResult(name, version, promote, settings.gate_metric, decision.challenger_value,
                            int(previous.version) if previous else None, decision.champion_value, decision.difference_ci95,
                            reason, decision.margin, decision.difference, decision.n_films, decision.n_patients)
    write_json(paths.registered, asdict(result))
    state = " is now @champion" if promote else " is @challenger, champion unchanged"
    log.info("register: %s version %d%s (%s)", name, version, state, reason)
    return result


def _patients_trained_on(paths: ProjectPaths, client, run_id: str, key_scope: str) -> dict:
    """The train and val patients of the manifest the run trained on; a manifest changed since training is refused,
    since the version would record patients it did not train on (or miss some it did). So is a changed train index:
    the data and rebalance params reach the weights through these two files (pipeline.provenance)."""
    tags = client.get_run(run_id).data.tags
    for path, tag in ((paths.manifest, "data.manifest_sha256"), (paths.train_index, "data.train_index_sha256")):
        if tags.get(tag) and (not path.exists() or tags[tag] != sha256_of(path)):
            raise CxrError(f"{path} changed since `cxr train` made run {run_id}: run `cxr train` and `cxr evaluate` again")
    return patient_record(paths, sha256_of(paths.manifest), key_scope)


def _record_patients(client, name: str, version: int, run_id: str, patients: dict) -> None:
    """The version's patient set as an artifact of its run, and the file's sha256 as a tag: the gate of every later
    challenger reads it to leave out the test films this version trained or was validated on."""
    import hashlib

    content = json.dumps(patients, sort_keys=True).encode()
    folder = f"registry/v{version}"
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "patients.json").write_bytes(content)
        client.log_artifact(run_id, str(Path(scratch) / "patients.json"), artifact_path=folder)
    client.set_model_version_tag(name, str(version), PATIENTS_ARTIFACT_TAG, f"{folder}/patients.json")
    client.set_model_version_tag(name, str(version), PATIENTS_TAG, hashlib.sha256(content).hexdigest())


def _describe_version(client, paths: ProjectPaths, trained: TrainedModel, name: str, version: int, metrics: dict,
                      registered_with: dict[str, str], guard: dict) -> None:
    """Tags an auditor filters on, and a model card (markdown) as the version's description and a run artifact:
    all from the training run and the checkpoint (and what register let through, and the out-of-scope `guard` it
    logged with the model: its scope and `ood` entry), none from today's params.yaml."""
    run = client.get_run(trained.run_id)
    test = metrics["test"]
    tags = {
        "data.manifest_sha256": run.data.tags.get("data.manifest_sha256", "unknown"),
        "data.dvc_md5.manifest": run.data.tags.get("data.dvc_md5.manifest", "unknown"),  # its run's dataset digest
        **{key: value for key, value in run.data.tags.items() if key in REVIEW_TAGS},  # the label decisions it learnt
        "git.commit": trained.git_commit,
        "git.dirty": trained.git_dirty,
        "params_sha256": trained.params_hash,
        "requirements_lock_sha256": run.data.tags.get("requirements_lock_sha256", "unknown"),
        "threshold": json.dumps(metrics["threshold"]),  # a number; {label: number} for multilabel; null for multiclass
        "threshold_method": describe_threshold(metrics),
        "test_metrics": json.dumps({k: test.get(k) for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "n")
                                    if k in test}),
        "test_ci95": json.dumps(test.get("ci95", {})),
        "patients_known": json.dumps(metrics.get("patients_known")),  # false: val/test may share patients with train
        # what rollback checks a target against
        CONTRACT_TAG: json.dumps({"task": trained.task, "labels": trained.labels, "image_size": trained.image_size}),
        **registered_with,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    card = model_card(paths, trained, name, version, tags, metrics, guard)
    client.update_model_version(name, str(version), description=card)
    with atomic_path(paths.models / "model_card.md") as tmp:
        tmp.write_text(card)
    client.log_artifact(trained.run_id, str(paths.models / "model_card.md"), artifact_path="model")


def model_card(paths: ProjectPaths, trained: TrainedModel, name: str, version: int, tags: dict, metrics: dict,
               guard: dict) -> str:
    """A short, honest model card: what the model is for, what it saw, how good it is, and its limits."""
    return render("model_card.md.j2", **model_card_context(paths, trained, name, version, tags, metrics), guard=guard)


def model_card_context(paths: ProjectPaths, trained: TrainedModel, name: str, version: int, tags: dict, metrics: dict) -> dict:
    """What the model card says, as plain data (model_card.md.j2 lays it out): the model and its training data as
    the checkpoint and its training run say, `tags` as the version carries them."""

    from pipeline.tasks import task_for

    task = task_for(metrics["task"], metrics["labels"])
    manifest = read_manifest(paths.manifest, task.name, task.labels, ["split", "label", "format"], "metrics.json's model")
    count_labels, counts = count_rows(task.label_counts(manifest))
    per_label_header, per_label = per_label_rows(metrics)
    return {
        "name": name,
        "version": version,
        "intended_use": task.intended_use(),
        "model": trained.model,
        "image_size": trained.image_size,
        "run_id": trained.run_id,
        "operating_point_sentence": task.decision_rule(describe_operating_point(metrics), describe_threshold(metrics)),
        "git_commit": tags["git.commit"],
        "git_dirty": tags.get("git.dirty", "unknown"),
        "params_hash": tags["params_sha256"],
        "lock_hash": tags.get("requirements_lock_sha256", "unknown"),
        "registered_with": tags.get("registered_with", ""),
        "params_differ": tags.get("params_differ_from_run", ""),
        "data_version": tags["data.manifest_sha256"],
        "overrides_sha256": tags.get("data.overrides_sha256"),
        "labels_changed": tags.get("data.labels_changed_by_review", "0"),
        "labels_kept": tags.get("data.labels_kept_by_review", "0"),
        "films_excluded": tags.get("data.films_excluded_by_review", "0"),
        "sources": trained.sources,
        "formats": sorted(set(manifest["format"])),
        "dedupe": trained.dedupe,
        "count_labels": count_labels,
        "counts": counts,
        "operating_point": describe_operating_point(metrics),
        "threshold_spread": describe_threshold_spread(metrics),
        "tta": describe_tta(metrics),
        "patient_caveat": metrics.get("patient_caveat"),
        "n": metrics["test"].get("n"),
        "headline": headline_rows(metrics),
        "per_label_header": per_label_header,
        "per_label_rows": per_label,
        "intervals": describe_intervals(metrics),
        "ece": describe_ece(metrics),
        "min_subgroup_patients": metrics["test"]["min_subgroup_patients"],
        "subgroups": subgroup_tables(metrics),
    }


def _log_model(paths: ProjectPaths, config: Config, run_id: str, crop: str) -> tuple[int, dict]:
    """Log the pyfunc (with the code it runs, so it loads anywhere) into the training run and register it. Its
    signature and input example show the bytes form (pipeline.serving); its scope is the training data's contract
    (`serve.*`, else the manifest's modalities and views) and travels with it, as do the decode limits, the crop
    (`crop`: the data.crop its training run logged, so the served model crops each film as the films it learnt
    from were cropped; a run from before data.crop logged none, which squeezed) and the
    out-of-distribution statistics and threshold (pipeline.ood, fitted here on the films it trained and validated on)."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline import tracking
    from pipeline.imaging import limits_of
    from pipeline.models import load_checkpoint
    from pipeline.tasks import task_for

    network, state = load_checkpoint(paths.checkpoint)  # describe the model that was trained, not today's params
    metrics = read_json(paths.metrics, "`cxr evaluate`")  # the operating point evaluate chose on validation
    size, labels, threshold = int(state["image_size"]), list(state["labels"]), metrics["threshold"]
    task = task_for(state["task"], labels)
    temperature = float(metrics["temperature"])
    tta = metrics.get("tta") or []  # the test-time views evaluate scored with: the served model averages over them too
    example = input_example(size)
    output = task.serving_table(np.full((1, len(labels)), 0.5), threshold).assign(out_of_scope="", error="", ood_score=0.0)
    scope = training_scope(paths, config, task).as_dict()
    limits = limits_of(config.data)
    with tempfile.TemporaryDirectory() as scratch:
        package = _serving_package(Path(scratch))
        statistics, ood = out_of_distribution(paths, network, task)
        ood_file = statistics.save(Path(scratch) / "ood.npz")
        with tracking.fluent_store(paths), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(package / "mlflow_model.py"),
                artifacts={"checkpoint": str(paths.checkpoint), "ood": str(ood_file)},
                code_paths=[str(package)],
                pip_requirements=serving_requirements(),
                signature=infer_signature(example, output),
                input_example=example,
                model_config={"threshold": threshold, "temperature": temperature, "scope": scope, "ood": ood, "crop": crop, "tta": tta,
                              "limits": {"max_pixels": limits.max_pixels, "max_frames": limits.max_frames},
                              "identity": {"model": config.registry.model_name, "run_id": run_id}},  # for monitoring records
                metadata={"image_size": size, "labels": labels, "task": task.name, "threshold": threshold, "temperature": temperature,
                          "scope": scope, "ood": ood, "crop": crop, "tta": tta},
                registered_model_name=config.registry.model_name,
            )
    return int(info.registered_model_version), {"scope": scope, "ood": ood}


def input_example(size: int):  # -> pd.DataFrame
    """One PNG of a grey ramp (no patient pixels in the registry), base64-encoded in the `image` column."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from pipeline.serving import IMAGE_COLUMN

    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def out_of_distribution(paths: ProjectPaths, network, task):  # -> tuple[pipeline.ood.Statistics, dict]
    """The out-of-distribution statistics of the training films (class-conditional Gaussians of the network's
    features) and the threshold that about 99 % of the validation films pass (pipeline.ood.calibrate). A multilabel
    task's films have no one class: one Gaussian."""
    from pipeline.ood import calibrate

    manifest = read_manifest(paths.manifest, task.name, task.labels, ["store_index", "split", "label"], "metrics.json's model")
    images = np.load(paths.images, mmap_mode="r")
    train, validation = (manifest[manifest["split"] == split] for split in ("train", "val"))
    if train.empty or validation.empty:
        raise CxrError(f"register: {paths.manifest} has no {'train' if train.empty else 'val'} films to set the "
                       "out-of-distribution threshold on")
    train, validation = (evenly_spaced(rows.sort_values("store_index"), MAX_OOD_FILMS) for rows in (train, validation))
    groups = train["label"].astype(str).to_numpy() if task.name != "multilabel" else np.zeros(len(train), dtype=int)
    statistics, entry = calibrate(network, np.asarray(images[train["store_index"].to_numpy()]), groups,
                                  np.asarray(images[validation["store_index"].to_numpy()]))
    log.info("register: out-of-distribution threshold %.2f (%s, %d validation films)", entry["threshold"],
             entry["method"], len(validation))
    if entry["probes_answered"]:
        log.warning("register: the out-of-scope guard would answer %d of %d non-chest test images (%s): its "
                    "network and statistics were fitted on %d training films (%d features), too little to tell a chest "
                    "film from other images; train on more films or for more epochs before trusting its refusals "
                    "(the model card says so)", len(entry["probes_answered"]), len(entry["probes"]),
                    ", ".join(entry["probes_answered"]), entry["n_train"], entry["n_features"])
    return statistics, entry


def evenly_spaced(rows, most: int):  # rows: pd.DataFrame
    """At most `most` of `rows`, evenly spaced (deterministic): a Gaussian's mean and covariance need thousands of
    films, not the whole of a large archive in memory."""
    return rows if len(rows) <= most else rows.iloc[np.linspace(0, len(rows) - 1, most).round().astype(int)]


def training_scope(paths: ProjectPaths, config: Config, task):  # -> pipeline.scope.Scope
    """What the model answers for: serve.* where set, else the modalities and views of the films it trained on."""
    from pipeline.scope import contract

    manifest = read_manifest(paths.manifest, task.name, task.labels, ["split", "modality", "view"], "metrics.json's model")
    trained = manifest[manifest["split"] == "train"].fillna("")
    serve = config.serve
    return contract(serve.modalities, serve.views, serve.body_parts, list(trained["modality"]), list(trained["view"]))


def serving_requirements() -> list[str]:
    """What the logged model needs where it is served: the versions installed here (the model ships its own code)."""
    from importlib.metadata import version

    packages = ("torch", "numpy", "pandas", "mlflow", "monai", "einops", "pydicom", "pillow", "pylibjpeg", "pylibjpeg-libjpeg",
                "pylibjpeg-openjpeg", "pyyaml", "pydantic")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]  # no local tag such as +cpu


def _serving_package(folder: Path) -> Path:
    """A copy of just the modules the pyfunc runs, so the model loads without this project installed."""
    import pipeline

    source = Path(pipeline.__file__).parent
    package = folder / "pipeline"
    package.mkdir(parents=True)
    for module in SERVING_MODULES:
        if (source / module).is_dir():
            shutil.copytree(source / module, package / module, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source / module, package / module)
    return package
