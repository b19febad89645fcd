"""Training under torchrun with DistributedDataParallel: two CPU processes (gloo) train to one process's result,
only rank 0 logs and writes, and a crashed torchrun run resumes to the same weights.

Each test starts real `torchrun --standalone --nproc_per_node 2` jobs (one torch thread per process) on a tiny
project, so they are marked slow (about 20 s per torchrun job on 2 cores, most of it start-up).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import load_config
from pipeline.models import load_checkpoint, predict_proba
from pipeline.paths import ProjectPaths
from pipeline.tracking import client as tracking_client, read_run_id
from pipeline.train import train_stage
from pipeline.training.data import load_training_data
from pipeline.training.state import train_state_path
from tests.conftest import REPO, ingest_and_rebalance

pytestmark = pytest.mark.slow

# Dropout off: each process draws its own dropout masks, so with dropout the two runs part ways by design.
# Without it both see the same batches, augmented alike, and differ only in float rounding (two half-batch
# gradients averaged instead of one), so weights agree to about 1e-6 after 3 epochs; the tolerances leave 10x room.
# seed_cnn: it has no batch norm, whose statistics each CPU process takes over its own share of the batch.
# seed_cnn: no batch norm, whose statistics each CPU rank takes over its own share of the batch. lr 0.001: the
# tolerance below is sized for the steps it makes.
SAME_RUN = ["train.model=seed_cnn", "train.device=cpu", "train.epochs=3", "train.dropout=0", "train.schedule=cosine",
            "train.num_threads=1", "train.lr=0.001"]
# Absolute, on weights of size ~0.05 that moved up to lr x steps (~1e-2): 200 times below that. The ranks' summed
# gradients differ from one process's in their last bits (another summation order), and Adam's normalisation can
# make that a difference of up to 2.6e-5 in a weight (measured on an AMD EPYC Zen 2 VM; 2e-5 failed there).
WEIGHT_TOLERANCE = 5e-5
PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project ingested and rebalanced once (the data gate is not needed for training)."""
    return ingest_and_rebalance(tmp_path_factory.mktemp("ddp"))


def torchrun(arguments: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGUMENTS...`, one torch thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def cxr_train(params: Path, overrides: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`cxr train` under torchrun, as a user runs it."""
    return torchrun(["-m", "cxr", "train", "--params", str(params), *[f"--set={o}" for o in overrides], *flags])


def _steps(paths: ProjectPaths, run_id: str, key: str) -> list[int]:
    return [m.step for m in tracking_client(paths).get_metric_history(run_id, key)]


def _run_count(paths: ProjectPaths) -> int:
    client = tracking_client(paths)
    return len(client.search_runs([experiment.experiment_id for experiment in client.search_experiments()]))


def test_two_gloo_processes_train_to_the_weights_of_one_process(project):
    params, paths = project
    config = load_config(params, SAME_RUN)
    single = train_stage(paths, config)
    single_model, _ = load_checkpoint(paths.checkpoint)
    single_history = pd.read_csv(paths.history)
    runs_before = _run_count(paths)

    done = cxr_train(params, SAME_RUN)
    assert done.returncode == 0, done.stderr[-3000:]

    model, checkpoint = load_checkpoint(paths.checkpoint)
    assert checkpoint["epoch"] == single.epoch
    for (key, weights), single_weights in zip(model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(weights, single_weights, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    val_images = load_training_data(paths, config.data).val_images
    cpu = torch.device("cpu")
    softmax = lambda logits: torch.softmax(logits, dim=1)  # noqa: E731 (a binary model's activation)
    np.testing.assert_allclose(predict_proba(model, val_images, cpu, softmax), predict_proba(single_model, val_images, cpu, softmax),
                               rtol=0, atol=PROBABILITY_TOLERANCE)
    history = pd.read_csv(paths.history)
    assert list(history["epoch"]) == [1, 2, 3]
    for column in ("train_loss", "val_loss", "lr"):
        np.testing.assert_allclose(history[column], single_history[column], rtol=1e-4, err_msg=column)

    # Only rank 0 talks to MLflow: one new run, each epoch logged once, and no state left behind.
    run_id = read_run_id(paths)
    assert run_id != single.run_id
    assert _run_count(paths) == runs_before + 1
    assert _steps(paths, run_id, "train_loss") == [1, 2, 3]
    assert tracking_client(paths).get_run(run_id).data.tags["world_size"] == "2"
    assert not train_state_path(paths).exists()


CRASH_AFTER_EPOCH_1 = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import pipeline.training.loop as loop
    from pipeline.config import load_config
    from pipeline.paths import ProjectPaths
    from pipeline.train import train_stage

    params = Path(sys.argv[1])
    save = loop.save_train_state

    def save_then_die(path, trainer, epoch, *rest):  # rank 0 alone saves
        save(path, trainer, epoch, *rest)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # torchrun then stops rank 1: the whole job dies

    loop.save_train_state = save_then_die
    train_stage(ProjectPaths(params.parent), load_config(params, sys.argv[2:]))
""")


def test_a_crashed_torchrun_run_resumes_to_the_weights_of_an_uninterrupted_one(project, tmp_path):
    params, paths = project
    # Dropout on, so each rank's own dropout generator has to come back from the state file too.
    overrides = ["train.device=cpu", "train.epochs=2", "train.num_threads=1", "augment.hflip=true"]
    straight = cxr_train(params, overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_weights = torch.load(paths.checkpoint, weights_only=True)["state_dict"]
    straight_history = pd.read_csv(paths.history)

    script = tmp_path / "crash_after_epoch_1.py"
    script.write_text(CRASH_AFTER_EPOCH_1)
    crashed = torchrun([str(script), str(params), *overrides])
    assert crashed.returncode != 0
    state = torch.load(train_state_path(paths), weights_only=True)
    assert state["epoch"] == 1 and len(state["rank_rng"]) == 2

    # A resume with other settings is refused by every rank with the same one-line error, and the state survives.
    refused = cxr_train(params, [*overrides, "train.lr=0.5"], "--resume")
    assert refused.returncode != 0
    assert refused.stderr.count("error: ") == 2 and f"train.lr: {load_config(params).train.lr} → 0.5" in refused.stderr
    assert train_state_path(paths).exists()

    resumed = cxr_train(params, overrides, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert read_run_id(paths) == state["run_id"]  # continued the crashed run
    weights = torch.load(paths.checkpoint, weights_only=True)["state_dict"]
    for key, expected in straight_weights.items():
        assert torch.equal(weights[key], expected), key
    pd.testing.assert_frame_equal(pd.read_csv(paths.history), straight_history)
    assert _steps(paths, state["run_id"], "train_loss") == [1, 2]
    assert not train_state_path(paths).exists()
