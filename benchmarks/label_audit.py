"""How many deliberately flipped labels `cxr audit-labels` finds on PneumoniaMNIST (issue 13's done-when).

Why it exists: label_issues.csv is only useful when a reviewer who reads its first rows meets the wrong labels.
The benchmark flips `--flips` training labels of the real PneumoniaMNIST train+val archive (seeded, half of them
each way where the classes allow), ingests the flipped copy into a temporary project with the params.yaml defaults
at 28 px, runs the audit exactly as the CLI does (pipeline.label_audit: cross-validation fold models, cleanlab),
and prints the recall: the share of flipped films among the first `--rows` rows of reports/label_issues.csv. The
done-when asks for at least 60 % of 60 flips within 120 rows. It also prints the wall time and the peak memory of
this process (ingest included), so "a few minutes on 2 cores" is measured, not promised.

The archive has no test split, so ingest carves one from its train films; the flips are drawn from the films it
keeps in train (a first ingest of the unflipped archive fixes the splits in the split registry), so every flip is
audited. Films ingest drops as exact duplicates are left out of the denominator (it says how many).
The archive's own label noise is real, so rows that are not flips are not false alarms by definition.

Run it from the repository root:

    .venv/bin/python benchmarks/label_audit.py --set train.num_threads=1   # one thread: a shared machine
    .venv/bin/python benchmarks/label_audit.py --flips 60 --rows 120 --folds 5 --set train.epochs=5
"""

from __future__ import annotations

import os

os.environ.setdefault("CXR_DEID_KEY", "benchmark-key-0123456789abcdef0123456789")  # before pipeline imports: no key file is written

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_snapshot, others_cpu_s, own_cpu_s  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
DEFAULT_PARAMS = REPO / "params.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(
        "Flip --flips PneumoniaMNIST training labels, run `cxr audit-labels` on the flipped copy in a temporary "
        "project, and print the share of flipped films in the first --rows rows of label_issues.csv, the wall time "
        "and the peak memory. Nothing in the repository changes."))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the PneumoniaMNIST train+val .npz")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file whose values are the defaults")
    parser.add_argument("--flips", type=int, default=60, help="training labels flipped (default 60)")
    parser.add_argument("--rows", type=int, default=120, help="first rows of label_issues.csv searched (default 120)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as `cxr --set` does (repeatable)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the project in this (new) folder")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        if args.data == DEFAULT_DATA:  # a checkout without ../shared/data: nothing to measure, not a failure
            parser.exit(0, f"label_audit: skipped: the PneumoniaMNIST archive {args.data} is not there\n")
        parser.exit(2, f"label_audit: the PneumoniaMNIST archive {args.data} is missing; pass --data PATH\n")
    return args


def flipped_copy(source: Path, target: Path, candidates: list[int], flips: int, seed: int) -> list[str]:
    """The archive with `flips` training labels among `candidates` (indices into train_images) flipped (0 <-> 1),
    written to `target`; the manifest paths (`train/<index>`) of the flipped films. Half of the flips each way, so
    both classes carry planted errors."""
    rng = np.random.default_rng(seed)
    with np.load(source) as arrays:
        data = {name: arrays[name] for name in arrays.files}
    labels = data["train_labels"].reshape(-1).copy()
    pool = np.asarray(sorted(candidates))
    chosen = np.concatenate([rng.choice(pool[labels[pool] == value], flips // 2 + flips % 2 * value, replace=False)
                             for value in (0, 1)])
    labels[chosen] = 1 - labels[chosen]
    data["train_labels"] = labels.reshape(data["train_labels"].shape)
    np.savez(target, **data)
    return [f"train/{index}" for index in sorted(chosen)]


def training_films(paths, config) -> list[int]:
    """Indices into the archive's train_images of the films ingest kept in the train split: the archive has no test
    split, so ingest carves one from its train films, and a flip there would never be audited."""
    from pipeline.manifest import read_manifest

    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels, ["path", "split"])
    kept = manifest.loc[manifest["split"] == "train", "path"]
    return [int(path.split("/")[1]) for path in kept if path.startswith("train/")]


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.label_audit import audit_labels_stage
    from pipeline.manifest import read_manifest
    from pipeline.paths import ProjectPaths
    from pipeline.stages import run_stages

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.INFO)  # the folds' progress
    scratch = Path(tempfile.mkdtemp(prefix="label-audit-")) if args.keep is None else args.keep
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.params, scratch / "params.yaml")
        archive = scratch / "pneumoniamnist_flipped.npz"
        shutil.copyfile(args.data, archive)
        config = load_config(scratch / "params.yaml", [f"data.sources=[{archive}]", "data.image_size=28", *args.overrides])
        paths = ProjectPaths(scratch)
        run_stages(paths, config, until="ingest")  # the split registry fixes each film's split from now on
        flipped = flipped_copy(args.data, archive, training_films(paths, config), args.flips, args.seed)
        cpu, start = cpu_snapshot(), time.perf_counter()
        run_stages(paths, config, until="ingest")  # again, with the flipped labels
        ingested = time.perf_counter() - start
        result = audit_labels_stage(paths, config, folds=args.folds, top=60)
        seconds = time.perf_counter() - start
        own = own_cpu_s() - cpu.own_s
        busy = others_cpu_s(cpu) / (seconds * (os.cpu_count() or 1))

        manifest = read_manifest(paths.manifest, config.data.task, config.data.labels, ["path", "split"])
        present = set(manifest.loc[manifest["split"] == "train", "path"])
        planted = [path for path in flipped if path in present]
        head = set(result.issues["path"].head(args.rows))
        found = [path for path in planted if path in head]
        anywhere = [path for path in planted if path in set(result.issues["path"])]
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"recall: {len(found)} of {len(planted)} flipped labels ({len(found) / max(len(planted), 1):.0%}) "
              f"in the first {args.rows} rows of label_issues.csv; {len(anywhere)} anywhere in its {len(result.issues)} rows")
        if len(planted) < len(flipped):
            print(f"({len(flipped) - len(planted)} flipped film(s) were dropped by ingest as duplicates)")
        print(f"{result.n_films} train+val films, {args.folds} folds ({result.folds_trained} trained), "
              f"{config.train.model} {config.train.epochs} epochs at 28 px: {seconds:.0f} s in all "
              f"(ingest {ingested:.0f} s; this process's CPU time {own:.0f} s), peak memory {peak_mib:.0f} MiB, {os.cpu_count()} CPU cores, "
              f"other processes took {busy:.0%} of the CPU")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
