"""params.yaml parsed once into typed config, with `--set section.key=value` overrides.

This is also the only module that reads the user's settings from environment variables (MLflow
tracking URI, the de-identification key), so every other module gets its settings passed in.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.errors import CxrError


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must add up to 1, got {total:g}")
        if self.train == 0 or self.val == 0 or self.test == 0:
            raise ValueError("each of train, val and test needs a fraction above 0")
        return self


DedupeMode = Literal["report", "drop"]
Crop = Literal["none", "center"]  # data.crop: how a film that is not square is made square (pipeline.imaging.resize)


class SourceSpec(Section):
    """One entry of data.sources. A bare path is shorthand for `{path: ...}` with everything detected.

    Tables (CSV or Parquet) name their columns here; `format: nih` and `format: rsna` preset the columns of
    NIH ChestX-ray14's Data_Entry_2017.csv and RSNA Pneumonia's stage_2_train_labels.csv.
    """

    path: str = Field(min_length=1)
    format: Literal["auto", "folder", "table", "npz", "nih", "rsna"] = "auto"
    labelled: bool = True
    image_root: str | None = None  # tables: folder holding the films (default: the table's own folder)
    match: Literal["path", "file_name", "sop_instance_uid"] = "path"  # how a table row finds its film
    path_column: str = "path"
    path_template: str = "{}"  # e.g. "{}.dcm" when the column holds an id rather than a file name
    label_column: str = "label"
    label_separator: str | None = None  # e.g. "|" for NIH's `Finding Labels`
    label_map: dict[str, str] = Field(default_factory=dict)  # table value → one of data.labels
    patient_column: str = "patient_id"
    split_column: str = "split"
    # tables whose films live on a DICOMweb server (its service root, e.g. http://pacs:8042/dicom-web): each row's
    # path_column holds a SOPInstanceUID, retrieved once (pipeline.sources) with CXR_DICOMWEB_* sign-in
    dicomweb: str | None = None

    @model_validator(mode="after")
    def _dicomweb_rows_name_instances(self) -> SourceSpec:
        """A server is searched by SOP Instance UID only (its URL is checked where it is used: pipeline.sources)."""
        if self.dicomweb is not None and self.match != "sop_instance_uid":
            raise ValueError("a dicomweb table names its films by SOP Instance UID: add match: sop_instance_uid")
        if self.dicomweb is not None and self.image_root is not None:
            raise ValueError("a dicomweb table's films are on the server: drop image_root")
        return self

    @field_validator("label_map", mode="before")
    @classmethod
    def _keys_as_text(cls, mapping: Any) -> Any:
        """YAML reads `{0: normal}` with an int key; table cells are read as text."""
        if not isinstance(mapping, dict):
            return mapping
        if any(isinstance(key, bool) for key in mapping):
            raise ValueError("YAML reads yes/no/on/off/true/false as booleans: quote such keys, e.g. {'yes': pneumonia}")
        return {str(key): str(value).lower() for key, value in mapping.items()}


class SourceFilters(Section):
    """Keep only DICOM films whose header matches; empty lists keep everything. PNG/JPEG have no header and pass."""

    modalities: list[str] = Field(default_factory=list)  # e.g. [CR, DX]
    views: list[str] = Field(default_factory=list)  # e.g. [PA, AP]
    body_parts: list[str] = Field(default_factory=list)  # e.g. [CHEST]


Task = Literal["binary", "multiclass", "multilabel"]


class DataConfig(Section):
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(path="data/raw/demo")], min_length=1)
    # binary: two labels, the last positive (softmax). multiclass: three or more, one per film (softmax).
    # multilabel: two or more findings, any number per film, none included (a sigmoid per label).
    task: Task = "binary"
    labels: list[str] = Field(default_factory=lambda: ["normal", "pneumonia"], min_length=2)
    # Where a film's class comes from: `label` (its folder or table label) or `subtype` (the subtype its file name
    # gives by subtype_pattern, e.g. Kermany's bacteria / virus; films without one keep their label).
    class_from: Literal["label", "subtype"] = "label"
    image_size: int = Field(64, ge=16, le=1024)
    # none: the whole film is squeezed into the square; center: its central square (side = the short edge) is kept,
    # as MedMNIST made its images, so a model trained on them sees full-size films as it was trained.
    crop: Crop = "none"
    split: SplitFractions = SplitFractions()
    seed: int = 0
    patient_pattern: str = r"^([A-Za-z]*\d+)_"
    subtype_pattern: str = r"_(bacteria|virus)_"  # Kermany file names carry the pneumonia subtype
    filters: SourceFilters = SourceFilters()
    dedupe: DedupeMode = "drop"  # drop: keep one copy of identical films (train first); report: keep all, the gate counts them
    # Films no header, table or file name gives a patient (MedMNIST's .npz) are each their own patient, so a film and
    # its near-identical copy (validation.near_duplicate_distance) can land in two splits or two crossval folds.
    # true: such films are grouped into pseudo-patients first (pipeline.splits.pseudo_patients); a source's own
    # split is kept, and other films of one person stay apart: the reports still say patients are not known.
    group_near_duplicates: bool = True
    num_workers: int = Field(0, ge=0)  # decoding processes; 0 = one per core
    # Decoded films go to the decode cache every this many, so an interrupted ingest (Ctrl-C, a killed job, a lost
    # machine) keeps them and the next run decodes only the rest; 0: only when decoding is over. Speed, never outputs.
    checkpoint_every: int = Field(20_000, ge=0)
    # Refused before decoding (quarantined as too_large / too_many_frames): a header costs nothing to forge and can
    # declare gigabytes. max_pixels bounds one frame's width x height (50 million: 7000 x 7000, above any chest
    # detector); max_frames bounds a DICOM's NumberOfFrames. A chest radiograph is one frame; a multi-frame object
    # (tomosynthesis, fluoroscopy) is not one, and with max_frames above 1 only its first frame is decoded and kept.
    max_pixels: int = Field(50_000_000, ge=1)
    max_frames: int = Field(1, ge=1)

    @field_validator("sources", mode="before")
    @classmethod
    def _paths_as_specs(cls, sources: Any) -> Any:
        return _as_source_specs(sources)

    @field_validator("labels")
    @classmethod
    def _labels_distinct_lowercase(cls, labels: list[str]) -> list[str]:
        lowered = [label.strip().lower() for label in labels]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"labels must be distinct, got {labels}")
        if any("|" in label or not label for label in lowered):
            raise ValueError("a label can be neither empty nor contain '|' (it separates the labels of a multilabel film)")
        return lowered

    @model_validator(mode="after")
    def _labels_fit_the_task(self) -> DataConfig:
        from pipeline.tasks import TASKS

        task = TASKS[self.task]
        problem = task.label_problem(self.labels)
        if problem:
            raise ValueError(problem)
        if self.class_from == "subtype" and not task.one_label_per_film:
            fitting = " or ".join(name for name, each in TASKS.items() if each.one_label_per_film)
            raise ValueError(f"data.class_from: subtype gives one class per film, so it needs data.task {fitting}")
        return self

    @field_validator("patient_pattern", "subtype_pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str) -> str:
        import re

        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("needs one capture group, e.g. '^([A-Za-z]*\\d+)_'")
        return pattern


class Bounds(Section):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


Severity = Literal["blocking", "warning", "ignore"]


class Severities(Section):
    """What a failed expectation does: `blocking` stops the run, `warning` is reported, `ignore` skips it."""

    labels_in_set: Severity = "blocking"
    required_columns_present: Severity = "blocking"
    splits_complete: Severity = "blocking"
    cross_split_duplicates: Severity = "blocking"
    patient_leakage: Severity = "blocking"
    split_registry: Severity = "blocking"
    class_ratio: Severity = "blocking"
    intensity: Severity = "warning"
    near_duplicates: Severity = "warning"
    image_size: Severity = "warning"
    modality_and_view: Severity = "warning"


class ValidationConfig(Section):
    class_ratio: Bounds = Bounds(min=0.05, max=0.95)
    intensity_mean: Bounds = Bounds(min=10, max=245)
    min_intensity_std: float = Field(2.0, ge=0)
    # Bits of the 63-bit perceptual hash (pipeline.phash) two different films may differ in and still count as
    # near-duplicates: 4 keeps noise and brightness/contrast changes, and found 4 pairs of different films
    # among PneumoniaMNIST's 13.5 million pairs.
    near_duplicate_distance: int = Field(4, ge=0, le=63)
    # Smaller originals are thumbnails, not films; 28 px is the smallest published set (MedMNIST) and passes.
    min_original_side: int = Field(28, ge=1)
    allowed_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])  # DICOM Modality, where known
    allowed_views: list[str] = Field(default_factory=lambda: ["PA", "AP"])  # DICOM ViewPosition, where known
    severity: Severities = Severities()


class RebalanceConfig(Section):
    method: Literal["none", "random_over", "random_under", "combined"] = "none"
    seed: int = 0
    # `combined` only: oversample the minority to over_ratio × the majority, then undersample the majority
    # until minority/majority is under_ratio (1.0: equal counts).
    over_ratio: float = Field(0.5, gt=0, le=1)
    under_ratio: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _under_not_below_over(self) -> RebalanceConfig:
        if self.under_ratio < self.over_ratio:
            raise ValueError(f"under_ratio ({self.under_ratio}) must be at least over_ratio ({self.over_ratio})")
        return self


class AugmentConfig(Section):
    enabled: bool = True
    rotation_deg: float = Field(6.0, ge=0, le=45)
    translate: float = Field(0.04, ge=0, le=0.3)
    scale: float = Field(0.1, ge=0, le=0.5)
    brightness: float = Field(0.1, ge=0, le=0.5)
    contrast: float = Field(0.1, ge=0, le=0.9)
    crop_scale: float = Field(1.0, ge=0.3, le=1)  # random resized crop: smallest area kept (0.85: 85-100 %); 1 = off
    gamma: float = Field(0.0, ge=0, le=0.9)  # gamma drawn from 1 ± this; 0 = off
    hflip: bool = False  # off: anatomy is not left-right symmetric (heart on the left)
    erasing: float = Field(0.0, ge=0, le=1)  # random erasing: chance per image of one rectangle (2-20 % of the area) set to its mean; 0 = off
    mixup_alpha: float = Field(0.0, ge=0, le=10)  # mixup: each batch blended with a shuffled copy of itself, weight ~ Beta(alpha, alpha); 0 = off


class TrainConfig(Section):
    # The same names as pipeline.models.MODEL_NAMES (spelled out so reading params never imports torch).
    model: Literal["seed_cnn", "resnet18", "resnet34", "densenet121", "cnn_gru", "vit", "vgg_gap"] = "vgg_gap"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)  # a batch of one breaks batch norm, so such batches are skipped
    lr: float = Field(3e-3, gt=0)  # the peak learning rate when a schedule changes it
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"  # sgd: momentum 0.9, Nesterov
    weight_decay: float = Field(1e-4, ge=0)  # adam: L2 in the gradient; adamw: decoupled; 0 makes adamw = adam
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"  # stepped every batch
    warmup_fraction: float = Field(0.3, ge=0, lt=1)  # cosine and onecycle: share of all steps spent warming up
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(2.0, ge=0)  # focal only: 0 is cross-entropy
    class_weights: Literal["none", "balanced"] = "balanced"  # balanced: inverse class frequency in the training index
    early_stopping_patience: int = Field(0, ge=0)  # stop after this many epochs without a better val AUC; 0 = off
    # Which epoch's model the checkpoint keeps: the last (where the schedule ends, chosen by nothing, so a validation
    # split sharing patients with train cannot reward memorising) or the best on validation AUC.
    keep: Literal["last", "best"] = "last"
    dropout: float = Field(0.5, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy against (1 - this) on the true class, the rest spread evenly; 0 = off
    ema_decay: float = Field(0.0, ge=0, lt=1)  # exponential moving average of the weights, what validation and the checkpoint use; 0 = off
    ensemble: int = Field(3, ge=1, le=20)  # deep ensemble: this many networks (seeds seed, seed+1, ...) averaged as one model; 1 = off
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # on CUDA, training runs in mixed precision (bfloat16, or float16 with loss scaling)
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 means one per core")


def _as_source_specs(sources: Any) -> Any:
    """A bare path (or a list of them) is shorthand for `{path: ...}` source entries."""
    if isinstance(sources, (str, dict)):
        sources = [sources]
    if isinstance(sources, list):
        return [{"path": item} if isinstance(item, str) else item for item in sources]
    return sources


class TtaView(Section):
    """One test-time view of a film (pipeline.tta): small moves only, never a flip."""

    shift_x: float = Field(0.0, ge=-0.2, le=0.2)  # fraction of the side; + moves the film right
    shift_y: float = Field(0.0, ge=-0.2, le=0.2)  # + moves it down
    scale: float = Field(1.0, ge=0.8, le=1.25)  # above 1 zooms in


class EvaluateConfig(Section):
    # The operating point, chosen on the validation split (never on test): `youden` maximises sensitivity +
    # specificity - 1, `sensitivity` takes the highest threshold whose validation sensitivity reaches
    # target_sensitivity, `fixed` uses `threshold` as given. Multilabel tasks choose one threshold per label.
    # `youden_mid` takes the middle of the interval of thresholds reaching the best J, not its lowest edge.
    threshold_method: Literal["fixed", "youden", "youden_mid", "sensitivity"] = "youden_mid"
    threshold: float = Field(0.5, gt=0, lt=1)  # fixed only
    target_sensitivity: float = Field(0.95, gt=0, le=1)  # sensitivity only
    # Other labelled sources (same forms as data.sources) scored as external validation: never trained on,
    # reported beside the internal test split with the shift between them.
    external: list[SourceSpec] = Field(default_factory=list)
    temperature_scaling: bool = False  # recalibrate probabilities with a temperature fitted on val (kept with the model)
    # Test-time augmentation: each film's probability averaged over itself and these views (pipeline.tta), at evaluate
    # and wherever the registered model serves; [] = off.
    tta: list[TtaView] = Field(default_factory=list)
    bootstrap_rounds: int = Field(1000, ge=100)  # resamples (of patients) behind the 95 % confidence intervals
    calibration_bins: int = Field(10, ge=2)
    # A subgroup (sex, age band, view, ...) of fewer test patients shows "n too small" instead of numbers: the
    # intervals resample patients, and a percentile interval over a handful of them is no interval at all.
    min_subgroup_patients: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("external", mode="before")
    @classmethod
    def _paths_as_specs(cls, sources: Any) -> Any:
        return _as_source_specs(sources)


class RegisterConfig(Section):
    model_name: str = Field("cxr-pneumonia", min_length=1)
    # The challenger takes `champion` only when, on the test films of patients neither model trained or was
    # validated on, it is not worse on this metric (difference >= 0) and the lower bound of the patient-clustered
    # 95 % interval of the difference is above -margin (pipeline.champion); otherwise it gets `challenger`.
    # Test films only: a validation metric would score the challenger on films it chose its checkpoint on.
    gate_metric: Literal["test_auc", "test_accuracy", "test_sensitivity", "test_specificity", "test_f1"] = "test_auc"
    margin: float = Field(0.01, ge=0, le=1)
    min_gate_films: int = Field(30, ge=1)  # fewer such films and the gate refuses to decide (a person promotes)


class ServeConfig(Section):
    """What a registered model answers for (pipeline.scope): a film whose DICOM header says otherwise gets
    `out_of_scope` with a reason instead of a probability. Recorded with the model at `cxr register`; empty lists
    take the training films' own modalities and views (the manifest), or CR/DX/DR and PA/AP without any."""

    modalities: list[str] = []  # DICOM Modality
    views: list[str] = []  # DICOM ViewPosition
    body_parts: list[str] = []  # DICOM BodyPartExamined, when a film has one; empty: CHEST, THORAX, LUNG and kin


class OrchestrationConfig(Section):
    """How `cxr pipeline` runs its tasks (the DVC stages and single commands ignore this)."""

    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None  # an existing Dask scheduler, e.g. tcp://scheduler:8786; none: a local cluster
    dask_workers: int = Field(2, ge=1)  # workers of the local Dask cluster
    ingest_shard_size: int | None = Field(None, ge=1)  # files per decode task on Dask; none: 2 per worker thread
    deployment_name: str = Field("scheduled", min_length=1)  # `cxr deploy` serves cxr-pipeline/<this>
    cron: str = "0 2 * * *"  # when the deployment runs (here: every night at 02:00)


class TrackingConfig(Section):
    experiment: str = Field("cxr-pneumonia", min_length=1)


KeyScope = Literal["project", "user"]


class DeidConfig(Section):
    """Where the de-identification key lives: `user` (~/.config/cxr/deid.key, shared by the user's projects, so
    their pseudonyms agree) or `project` (<project>/.cxr/deid.key, git- and dvc-ignored: pseudonyms that no other
    project can match). CXR_DEID_KEY, when set, overrides both."""

    key_scope: KeyScope = "user"


class PrivacyConfig(Section):
    """How outputs that hold film pixels are protected on disk."""

    # The umask every writing command and stage runs under, as octal digits: 077 makes new files 0600 and new
    # folders 0700 (owner only); 022 would let every local user read the films.
    umask: str = Field("077", pattern=r"^0?[0-7]{3}$")

    @field_validator("umask", mode="before")
    @classmethod
    def _octal_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError("write the umask as quoted octal digits, e.g. '077' (YAML reads 077 unquoted as the "
                             "number 63 and 77 as seventy-seven)")
        return value

    @property
    def mask(self) -> int:
        return int(self.umask, 8)


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)  # built when a Config is: its validator asks pipeline.tasks
    validation: ValidationConfig = ValidationConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # `register` is the params key; the attribute is `registry` because pydantic models already have a `register`.
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    serve: ServeConfig = ServeConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    deid: DeidConfig = DeidConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # The params load_config was given on the command line (--set) whose value differs from the params file:
    # `section.key` -> what the file says (or the default it leaves in place). Not a param: it travels with the config.
    _command_line: dict[str, tuple[Any, bool]] = PrivateAttr(default_factory=dict)
    _params_file: str = PrivateAttr("params.yaml")

    @property
    def params_file(self) -> str:
        """The name of the params file this config was loaded from, for messages ("params.yaml")."""
        return self._params_file

    def setting(self, key: str) -> str:
        """A param as a decision should record it: `margin 0.01`, or, when a --set changed it from the params file,
        `margin 1 (set on the command line; params.yaml says 0.01)`."""
        value = self.as_flat_dict()[key]
        shown = f"{key.rsplit('.', 1)[-1]} {value:g}" if isinstance(value, float) else f"{key.rsplit('.', 1)[-1]} {value}"
        if key not in self._command_line:
            return shown
        in_file, written = self._command_line[key]
        said = f"{self._params_file} says {_shown(in_file)}" if written else f"{self._params_file} leaves the default {_shown(in_file)}"
        return f"{shown} (set on the command line; {said})"

    @model_validator(mode="after")
    def _model_fits_image_size(self) -> Config:
        if self.train.model == "vit" and self.data.image_size % 2:
            raise ValueError(f"train.model vit needs an even data.image_size (patches must tile it), got {self.data.image_size}")
        return self

    @model_validator(mode="after")
    def _label_smoothing_fits_the_loss(self) -> Config:
        """Label smoothing is cross-entropy's (PyTorch's label_smoothing) over one-label classes: refused where it
        would mean something else (focal's modulation, or independent sigmoids' targets)."""
        if self.train.label_smoothing > 0 and self.train.loss == "focal":
            raise ValueError("train.label_smoothing works with train.loss cross_entropy only; set one of them back "
                             "(train.label_smoothing=0 or train.loss=cross_entropy)")
        if self.train.label_smoothing > 0 and self.data.task == "multilabel":
            raise ValueError("train.label_smoothing is for binary and multiclass tasks (one class per film); "
                             "with data.task multilabel set train.label_smoothing=0")
        return self

    @model_validator(mode="after")
    def _gate_metric_fits_the_task(self) -> Config:
        from pipeline.tasks import TASKS

        split, metric = self.registry.gate_metric.split("_", 1)
        defined = TASKS[self.data.task].table_metrics
        if metric not in defined:
            having = " and ".join(name for name, each in TASKS.items() if metric in each.table_metrics)
            raise ValueError(f"register.gate_metric {self.registry.gate_metric} is defined for {having} tasks only; with "
                             f"data.task {self.data.task} use one of {', '.join(f'{split}_{name}' for name in defined)}")
        return self

    def params_hash(self) -> str:
        """A short hash of every param that shapes a model (orchestration only changes how runs are scheduled, privacy
        only the modes of the files written)."""
        import hashlib
        import json

        shaping = {k: v for k, v in self.as_flat_dict().items() if not k.startswith(("orchestration.", "privacy."))}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def as_flat_dict(self) -> dict[str, Any]:
        """`section.key -> value` pairs, the form MLflow params and `--set` use."""
        return _flatten(self.model_dump(mode="json", by_alias=True))


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CxrError(f"--set '{text}': expected section.key=value, e.g. --set train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise CxrError(f"--set '{text}': the value is not valid YAML ({first_line})") from None
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set one nested key in the raw params tree; a key that the schema does not know is an error."""
    node: Any = tree
    schema: Any = Config
    for depth, part in enumerate(path):
        fields = _field_names(schema)
        if fields is not None and part not in fields:
            known = ", ".join(sorted(fields))
            where = ".".join(path[: depth + 1])
            raise CxrError(f"--set '{text}': unknown key '{where}' (known here: {known})")
        schema = _field_type(schema, part)
        if depth == len(path) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _field_names(schema: Any) -> set[str] | None:
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return {info.alias or name for name, info in schema.model_fields.items()}
    return None  # a plain value: the override stops here


def _field_type(schema: Any, part: str) -> Any:
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        for name, info in schema.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    return None


def load_config(params_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml (missing file means all defaults), apply overrides, validate everything."""
    raw: dict[str, Any] = {}
    if params_path.is_dir():
        raise CxrError(f"--params {params_path}: is a folder; give the params file, e.g. {params_path / 'params.yaml'}")
    if params_path.exists():
        try:
            loaded = yaml.safe_load(params_path.read_text())
        except yaml.YAMLError as exc:
            raise CxrError(f"{params_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise CxrError(f"{params_path}: expected a mapping of sections (data:, train:, ...)")
        raw = loaded or {}
    in_file = _flatten(copy.deepcopy(raw))
    overridden: list[str] = []
    for text in overrides:
        path, value = parse_override(text)
        apply_override(raw, path, value, text)
        overridden.append(".".join(path))
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        where = f"{params_path} with --set {' '.join(overrides)}" if overrides else str(params_path)
        raise CxrError(_describe(exc, where)) from None
    config._params_file = params_path.name
    if overridden:
        defaults = Config().as_flat_dict()
        for key, value in config.as_flat_dict().items():
            written = key in in_file
            before = in_file[key] if written else defaults.get(key)
            if any(key == path or key.startswith(f"{path}.") for path in overridden) and value != before:
                config._command_line[key] = (before, written)
    return config


def _describe(exc: ValidationError, where: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif isinstance(error.get("input"), dict):  # a whole section: the message names the keys, its input is noise
            problems.append(f"'{key}': {error['msg']}")
        else:
            problems.append(f"'{key}': {error['msg']} (got {error.get('input')!r})")
    return f"{where}: " + "; ".join(problems)


# --- settings that come from the environment -------------------------------------------------


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


def tracking_uri(root: Path) -> str:
    """MLflow tracking store: MLFLOW_TRACKING_URI when set, else SQLite under the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def artifact_location(root: Path) -> str | None:
    """Where new experiments keep artifacts: mlartifacts/ beside the default store, the server's choice otherwise."""
    if tracking_uri(root) != default_tracking_uri(root):
        return None
    return (root / "mlartifacts").resolve().as_uri()


def prefect_api_url() -> str | None:
    """A Prefect server to use; without one, Prefect runs flows in its local (ephemeral) mode."""
    return os.environ.get("PREFECT_API_URL") or None


PROJECT_KEY_FILE = Path(".cxr") / "deid.key"  # deid.key_scope: project, relative to the project root


def deid_key_file(root: Path | None = None, scope: KeyScope = "user") -> Path:
    """The de-identification key file of `scope`: the user's ~/.config/cxr/deid.key (CXR_DEID_KEY_FILE moves it),
    or <root>/.cxr/deid.key for a project-scoped key (beside the project, never inside its data or outputs)."""
    if scope == "project":
        if root is None:
            raise CxrError("deid.key_scope is project, but no project root was given to find .cxr/deid.key in")
        return Path(root) / PROJECT_KEY_FILE
    configured = os.environ.get("CXR_DEID_KEY_FILE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".config" / "cxr" / "deid.key"


def deid_key_from_env() -> bytes | None:
    """CXR_DEID_KEY, when set (even to ""), is the key itself (for CI and clusters that inject secrets); None when unset.
    A set but empty variable is returned as b"" so that it is refused, not quietly replaced by the key file."""
    value = os.environ.get("CXR_DEID_KEY")
    return None if value is None else value.encode()


DEFAULT_LOCK_TIMEOUT_S = 600.0


def lock_timeout() -> float:
    """Seconds a run waits for another run's project lock before refusing (CXR_LOCK_TIMEOUT; default 600)."""
    value = os.environ.get("CXR_LOCK_TIMEOUT")
    if not value:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise CxrError(f"CXR_LOCK_TIMEOUT must be a number of seconds (0 or more), not {value!r}")
    return seconds


def monitor_log_setting() -> str | None:
    """CXR_MONITOR_LOG as set (a file, or `off`), None when unset: where answers are logged (pipeline.monitoring)."""
    return os.environ.get("CXR_MONITOR_LOG")


def dicomweb_credentials() -> tuple[str, str] | str | None:
    """How to sign in to a DICOMweb server: (user, password) for HTTP basic from CXR_DICOMWEB_USER and
    CXR_DICOMWEB_PASSWORD, a bearer token from CXR_DICOMWEB_TOKEN, or None. Read from the environment only, so
    a secret never sits in params.yaml, a URL or a shell history; one of the two ways, never both."""
    user, password = os.environ.get("CXR_DICOMWEB_USER"), os.environ.get("CXR_DICOMWEB_PASSWORD")
    token = os.environ.get("CXR_DICOMWEB_TOKEN")
    if token and (user or password):
        raise CxrError("set either CXR_DICOMWEB_TOKEN or CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD, not both")
    if bool(user) != bool(password):
        raise CxrError("CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD go together: set both for HTTP basic authentication")
    if token:
        return token
    return (user, password) if user else None
