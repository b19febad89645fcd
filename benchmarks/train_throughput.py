"""Training throughput benchmark: images per second of the pipeline's training step against a bare torch loop.

Why it exists: the pipeline's epoch loop (`pipeline.training.loop.train_one_epoch` and `step` on the Trainer that
`build_trainer` makes from params) carries seeded ordering, uint8 → float conversion per batch, a learning-rate
schedule, loss bookkeeping and the hooks for mixed precision and DistributedDataParallel. None of that may
make training noticeably slower than a careful hand-written loop: the target is bare ÷ pipeline ≤ 1.05.

What runs, in one process, with the same torch thread count:
- pipeline: `build_trainer(config, data, cpu)` then `train_one_epoch` over uint8 images, exactly as
  `cxr train` runs an epoch (params.yaml's augmentation, Adam, the constant schedule stepped every batch,
  cross-entropy), without validation, checkpoints or MLflow.
- bare: the same network (`build_model`, same seed so the same initial weights), the same optimiser
  (`build_optimizer`), `F.cross_entropy`, and the images already in memory as one float tensor in 0..1
  (converted before timing, so the bare loop does strictly less work per batch than the pipeline).
- Both augment every batch with the same function (`pipeline.augment.augment_batch`, same settings, same
  batch size): augmentation is part of the training step a user pays for, and with the same function on
  both sides its cost cancels, so the ratio measures only the loop around it. (Leaving it out of both would
  compare a step `cxr train` never takes.)
- Each loop keeps its own generators (batch order and augmentation; the global one for dropout), so both do
  exactly the same arithmetic: the table's "same weights" column checks that they end bit-identical.

One torch thread by default: the ratio is about the loop's per-batch cost, which threads do not change, and
one thread keeps the timings stable when another process shares the machine (with every core busy, two
OpenMP threads can run many times slower than one). `--threads 0` uses one thread per core, as `cxr train` does.

Timing: per model and size, a warm-up, then epochs of whole batches sized to about --seconds each, alternating
bare and pipeline (bare first on even repeats, pipeline first on odd ones) so slow drift hits both equally.
Each rate is the median over the repeats; the ratio is the median of the back-to-back pairs' ratios, which
cancels a neighbour's changing load better than a ratio of medians. Images are synthetic random uint8
(throughput does not depend on content), or PneumoniaMNIST's training films with `--data pneumoniamnist`
(resized for sizes other than 28 px; synthetic when ../shared/data/pneumoniamnist is absent).

    .venv/bin/python benchmarks/train_throughput.py            # seed_cnn and resnet18 at 28 and 64 px (~1.5 min on 2 cores)
    .venv/bin/python benchmarks/train_throughput.py --quick    # a short smoke run

The last line is `overhead_ratio=<bare img/s ÷ pipeline img/s>` for the worst model and size. Run it on an
otherwise idle machine: the table flags rows during which other processes took more than the cores it
left free, plus 10% of the CPU. It measures the CPU only: on a GPU the pipeline trains in mixed precision,
which the bare float32 loop would not match.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.machine import BUSY_WARNING, cpu_snapshot, others_cpu_s  # noqa: E402
from pipeline.augment import augment_batch  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.tasks import task_for  # noqa: E402
from pipeline.training.data import TrainingData  # noqa: E402
from pipeline.training.loop import train_one_epoch  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402
from pipeline.training.trainer import build_trainer  # noqa: E402

PNEUMONIAMNIST = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
TARGET_RATIO = 1.05
WARM_UP_BATCHES = 3


@dataclass(frozen=True)
class Row:
    model: str
    size: int
    n_images: int  # per timed epoch
    bare: float  # median images per second
    pipeline: float
    ratio: float  # median over the repeats of bare ÷ pipeline, each pair timed back to back
    same_weights: bool  # the loops ended with bit-identical weights: they did the same work
    others_share: float  # share of the machine's CPU other processes took while the row was timed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training images per second: the pipeline's epoch loop against a bare torch loop "
        "(same network, initial weights, optimiser and augmentation), on the CPU.",
        epilog="Run on an otherwise idle machine. The last line is overhead_ratio=<bare/pipeline> for the worst case.",
    )
    parser.add_argument("--models", nargs="+", default=["seed_cnn", "resnet18"], help="train.model values (default: seed_cnn resnet18)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[28, 64], help="image sizes in px (default: 28 64)")
    parser.add_argument("--repeats", type=int, default=11, help="timed epochs per loop; the median is reported (default 11)")
    parser.add_argument("--seconds", type=float, default=0.3, help="about how long each timed epoch runs, at least one batch (default 0.3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for both loops (default 1; 0: one per core)")
    parser.add_argument("--data", choices=("synthetic", "pneumoniamnist"), default="synthetic",
                        help="random uint8 images, or PneumoniaMNIST's training films (synthetic if the file is absent)")
    parser.add_argument("--quick", action="store_true", help="a short run: 3 repeats of about 0.1 s")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seconds = 3, 0.1
    if args.repeats < 1 or args.seconds <= 0:
        parser.error("--repeats must be at least 1 and --seconds above 0")
    return args


# --- inputs -------------------------------------------------------------------------------------


def benchmark_config(model: str, size: int) -> Config:
    """The project's params with the model and size under test; loss, optimiser and schedule pinned to what the bare loop does."""
    overrides = [f"train.model={model}", f"data.image_size={size}", "train.device=cpu", "train.optimizer=adam",
                 "train.schedule=constant", "train.loss=cross_entropy", "train.class_weights=none"]
    return load_config(REPO / "params.yaml", overrides)


def training_images(source: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (n, size, size) and 0/1 labels: random, or PneumoniaMNIST's first n training films."""
    rng = np.random.default_rng(0)
    if source == "pneumoniamnist" and PNEUMONIAMNIST.is_file():
        archive = np.load(PNEUMONIAMNIST)
        films = np.resize(archive["train_images"], (n, 28, 28))  # repeats the set if n exceeds it
        labels = np.resize(archive["train_labels"].ravel(), n).astype(np.int64)
        if size != 28:
            resized = F.interpolate(torch.from_numpy(films).unsqueeze(1).float(), size=(size, size), mode="bilinear")
            films = resized.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
        return films, labels
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 2, n)


# --- the two loops ------------------------------------------------------------------------------


class Bare:
    """A careful hand-written training loop: float images in memory, the same augmentation, no bookkeeping."""

    def __init__(self, config: Config, images: np.ndarray, labels: np.ndarray) -> None:
        torch.manual_seed(config.train.seed)  # the pipeline's Trainer is built after the same seed: same weights
        self.model = build_model(config.train.model, config.data.image_size, len(config.data.labels), config.train.dropout)
        self.optimizer = build_optimizer(self.model, config.train)
        self.images = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
        self.labels = torch.from_numpy(labels).long()
        self.augment = config.augment
        self.batch_size = config.train.batch_size
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.global_rng = torch.get_rng_state()  # dropout's draws, kept apart from the other loop's

    def epoch(self, n: int) -> None:
        self.model.train()
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            batch = order[start : start + self.batch_size]
            inputs = augment_batch(self.images[batch], self.augment, self.generator)
            loss = F.cross_entropy(self.model(inputs), self.labels[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


class Pipeline:
    """The pipeline's own epoch: build_trainer's Trainer and train_one_epoch over uint8 images."""

    def __init__(self, config: Config, images: np.ndarray, labels: np.ndarray) -> None:
        torch.manual_seed(config.train.seed)
        task = task_for(config.data.task, config.data.labels)
        data = TrainingData(train_images=images, train_labels=labels, val_images=images[:2], val_labels=labels[:2], task=task)
        self.trainer = build_trainer(config, data, torch.device("cpu"))
        self.config = config
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)  # as pipeline.training.loop.fit makes them
        self.global_rng = torch.get_rng_state()

    def epoch(self, n: int) -> None:
        train_one_epoch(self.trainer, self.images[:n], self.labels[:n], self.config)


def images_per_second(loop: Bare | Pipeline, n: int) -> float:
    """One timed epoch of n images; each loop keeps its own global random state, as if it ran alone."""
    gc.collect()
    torch.set_rng_state(loop.global_rng)
    start = time.perf_counter()
    loop.epoch(n)
    seconds = time.perf_counter() - start
    loop.global_rng = torch.get_rng_state()
    return n / seconds


def same_weights(bare: Bare, pipeline: Pipeline) -> bool:
    """Both loops did the same arithmetic: same batches, augmentation, dropout and updates, so bit-identical weights."""
    pairs = zip(bare.model.state_dict().values(), pipeline.trainer.model.state_dict().values(), strict=True)
    return all(torch.equal(a, b) for a, b in pairs)


def measure(model: str, size: int, args: argparse.Namespace) -> Row:
    """Median images per second of both loops over alternating timed epochs of about args.seconds."""
    config = benchmark_config(model, size)
    batch = config.train.batch_size
    most = batch * 128
    images, labels = training_images(args.data, most, size)
    bare, pipeline = Bare(config, images, labels), Pipeline(config, images, labels)

    warm_up = batch * WARM_UP_BATCHES
    rate = min(images_per_second(bare, warm_up), images_per_second(pipeline, warm_up))
    n = batch * min(max(1, round(args.seconds * rate / batch)), most // batch)  # whole batches only: no skipped remainder

    rates: dict[str, list[float]] = {"bare": [], "pipeline": []}
    cpu, started = cpu_snapshot(), time.perf_counter()
    for repeat in range(args.repeats):
        order = ("bare", "pipeline") if repeat % 2 == 0 else ("pipeline", "bare")
        for name in order:
            rates[name].append(images_per_second(bare if name == "bare" else pipeline, n))
    capacity = (time.perf_counter() - started) * (os.cpu_count() or 1)
    others = others_cpu_s(cpu) / capacity
    # The ratio of each back-to-back pair: a neighbour's load changes both of a pair alike.
    ratio = statistics.median(b / p for b, p in zip(rates["bare"], rates["pipeline"]))
    return Row(model, size, n, statistics.median(rates["bare"]), statistics.median(rates["pipeline"]), ratio,
               same_weights(bare, pipeline), others)


# --- report -------------------------------------------------------------------------------------


def print_table(rows: list[Row], threads: int) -> None:
    """The table; a row is flagged when other processes took more than the cores this run left free (+10%)."""
    cores = os.cpu_count() or 1
    spare_share = max(0, cores - threads) / cores
    print(f"{'model':<10} {'px':>4} {'images':>7} {'bare img/s':>11} {'pipeline img/s':>15} {'bare/pipeline':>14} "
          f"{'same weights':>13} {'others CPU':>11}")
    for row in rows:
        print(f"{row.model:<10} {row.size:>4} {row.n_images:>7} {row.bare:>11.1f} {row.pipeline:>15.1f} "
              f"{row.ratio:>14.4f} {'yes' if row.same_weights else 'NO':>13} {row.others_share:>11.0%}")
    print("img/s: medians over the repeats; bare/pipeline: the median of back-to-back pairs' ratios; "
          "same weights: both loops ended bit-identical (same batches, augmentation, dropout and updates)")
    for row in rows:
        if row.others_share > spare_share + BUSY_WARNING:  # beyond the cores this benchmark leaves free
            print(f"WARNING: {row.model} {row.size} px: other processes took {row.others_share:.0%} of the CPU "
                  "while it was timed; rerun on an idle machine")


def main() -> None:
    args = parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.data == "pneumoniamnist" and not PNEUMONIAMNIST.is_file():
        print(f"note: {PNEUMONIAMNIST} is absent; using synthetic images")
        args.data = "synthetic"
    print(f"training throughput: {args.data} images, median of {args.repeats} epochs of ~{args.seconds:g} s per loop, "
          f"{threads} torch thread(s), {os.cpu_count()} CPU cores, torch {torch.__version__}")
    rows = [measure(model, size, args) for model in args.models for size in args.sizes]
    print()
    print_table(rows, threads)
    worst = max(rows, key=lambda row: row.ratio)
    verdict = "PASS" if worst.ratio <= TARGET_RATIO else "FAIL"
    print(f"target: bare/pipeline <= {TARGET_RATIO:.2f} in the worst case ({worst.model} {worst.size} px): "
          f"{worst.ratio:.4f}  {verdict}")
    print(f"overhead_ratio={worst.ratio:.4f}")


if __name__ == "__main__":
    main()
