"""Where every stage reads and writes, relative to the project root (the folder holding params.yaml).

Fixed paths keep dvc.yaml, the Prefect flow and the CLI in agreement: each stage's outputs are the
next stage's inputs, as in nnU-Net's one-file-per-step layout.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path
    # The folder of the MLflow store (mlruns.db, mlartifacts/) when it is not the root's own: a cross-validation
    # fold is a small project inside its parent, and logs to the parent's store.
    store_root: Path | None = None

    @property
    def tracking_root(self) -> Path:
        """Where the default MLflow store lives (MLFLOW_TRACKING_URI, when set, names another)."""
        return self.store_root or self.root

    @property
    def interim(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def manifest(self) -> Path:
        return self.interim / "manifest.parquet"

    @property
    def images(self) -> Path:
        return self.interim / "images.npy"

    @property
    def quarantine(self) -> Path:
        return self.interim / "quarantine.csv"

    @property
    def dropped_duplicates(self) -> Path:
        """Films removed as identical copies when data.dedupe is drop (empty otherwise)."""
        return self.interim / "dropped_duplicates.csv"

    @property
    def split_registry(self) -> Path:
        """Every patient ever ingested with the split decided for them once (pipeline.splits): ingest reads and extends it."""
        return self.root / "data" / "splits.parquet"

    @property
    def erasures(self) -> Path:
        """The append-only record of patients erased by `cxr forget` (pseudonyms and counts only): ingest skips them."""
        return self.root / "data" / "erasures.jsonl"

    @property
    def label_overrides(self) -> Path:
        """A reviewer's label decisions (pipeline.overrides): versioned in git, a dependency of ingest."""
        return self.root / "data" / "labels" / "overrides.csv"

    @property
    def decode_cache(self) -> Path:
        """Decoded films by file content: a local speed-up, not versioned (ingest rebuilds it as needed)."""
        return self.root / "data" / "cache"

    @property
    def validation_dir(self) -> Path:
        return self.root / "reports" / "validation"

    @property
    def validation_results(self) -> Path:
        return self.validation_dir / "results.json"

    @property
    def validation_summary(self) -> Path:
        return self.validation_dir / "summary.json"

    @property
    def train_index(self) -> Path:
        return self.root / "data" / "processed" / "train_index.npy"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoint(self) -> Path:
        return self.models / "checkpoint.pt"

    @property
    def run_info(self) -> Path:
        """The MLflow run id written by train and read by evaluate and register (one run spans all three)."""
        return self.models / "run.json"

    @property
    def last_success(self) -> Path:
        """Data version and params hash of the last complete scheduled run, so an unchanged one is skipped."""
        return self.models / "last_success.json"

    @property
    def registered(self) -> Path:
        return self.models / "registered.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def scores(self) -> Path:
        """Evaluate's DVC metrics: the headline numbers of metrics.json (pipeline.evaluate.headline_scores)."""
        return self.reports / "scores.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def predictions(self) -> Path:
        """Val and test probabilities per film (image_id, no identifiers): the registry gate and audits read them."""
        return self.reports / "predictions.csv"

    @property
    def history(self) -> Path:
        return self.plots / "history.csv"

    @property
    def roc(self) -> Path:
        return self.plots / "roc.csv"

    @property
    def confusion(self) -> Path:
        return self.plots / "confusion.csv"
