"""What training leaves on disk: the resume file after every epoch and the checkpoint
(train.keep: the last epoch's model, or the best on validation).

After every epoch the whole training state is written to models/train_state.pt (atomically): weights,
optimiser, schedule, random-number states, the weight average (train.ema_decay), history and the MLflow run id. `train_stage(..., resume=True)`
continues from that file into the same MLflow run and ends with the same weights as a run that never
stopped (bit-identical on the CPU). The file is removed once training finishes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import distributed
from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import atomic_path, sha256_of
from pipeline.paths import ProjectPaths
from pipeline.training.trainer import Trainer


def train_state_path(paths: ProjectPaths) -> Path:
    """Where the per-epoch training state lives while a run is unfinished."""
    return paths.models / "train_state.pt"


def run_fingerprint(paths: ProjectPaths, config: Config, manifest_sha256: str, world_size: int = 1) -> dict:
    """What a resumed run must share with the interrupted one: every training setting, the exact data and the
    number of torchrun processes (each has its own dropout generator in the saved state).

    train.num_threads is left out: it changes speed only (and a resume on a busier machine may lower it).
    """
    settings = {
        key: value
        for key, value in config.as_flat_dict().items()
        if key.startswith(("train.", "augment.")) and key != "train.num_threads"
    }
    settings["data.image_size"] = config.data.image_size
    settings["data.labels"] = list(config.data.labels)
    settings["world_size"] = world_size
    return {"settings": settings, "manifest_sha256": manifest_sha256, "train_index_sha256": sha256_of(paths.train_index)}


def save_train_state(path: Path, trainer: Trainer, epoch: int, best: dict, history: list[dict], run_id: str,
                     fingerprint: dict, rank_rng: list[dict]) -> None:
    """Everything needed to continue after `epoch` as if never stopped, written atomically.

    rank_rng holds global_rng_state() of every rank (one entry in one process), in rank order.
    """
    import torch

    state = {
        "epoch": epoch,
        "best": best,
        "history": history,
        "run_id": run_id,
        "fingerprint": fingerprint,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "augment_rng": trainer.generator.get_state(),
        "rank_rng": rank_rng,
        "average": trainer.average.state_dict() if trainer.average is not None else None,
    }
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(state, handle)


def load_train_state(path: Path, fingerprint: dict, paths: ProjectPaths) -> dict | None:
    """The saved state if there is one and it belongs to these settings and data; None if there is none."""
    import pickle

    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CxrError(f"{path} cannot be read ({exc}); run `cxr train` without --resume") from None
    if state["fingerprint"] != fingerprint:
        changed = _differences(state["fingerprint"], fingerprint)
        raise CxrError(f"{path} belongs to a run with other settings or data ({changed}); "
                       "restore them, or run `cxr train` without --resume to start over")
    if state["best"]["epoch"] > 0 and not paths.checkpoint.exists():
        raise CxrError(f"{paths.checkpoint} (best of epoch {state['best']['epoch']}) is missing; "
                       "run `cxr train` without --resume to start over")
    return state


def _differences(saved: dict, current: dict) -> str:
    """`key: saved → current` for each setting that changed, or which data file did."""
    changes = [f"{key}: {saved['settings'].get(key)} → {value}"
               for key, value in current["settings"].items() if saved["settings"].get(key) != value]
    changes += [f"{key} changed" for key in ("manifest_sha256", "train_index_sha256") if saved[key] != current[key]]
    return "; ".join(changes)


def resume_state(state_path: Path, fingerprint: dict, paths: ProjectPaths, world: distributed.World) -> dict | None:
    """Rank 0 reads the state file and every rank gets it, or the same one-line error (no rank left waiting)."""
    state, problem = None, None
    if world.is_main:
        try:
            state = load_train_state(state_path, fingerprint, paths)
        except CxrError as exc:
            problem = str(exc)
    state, problem = distributed.broadcast((state, problem), world)
    if problem:
        raise CxrError(problem)
    return state


def restore_trainer(trainer: Trainer, state: dict, rank: int = 0) -> None:
    """Put weights, optimiser, schedule, scaler, weight average and every random-number state back as they were
    saved (for this rank)."""
    import torch

    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["augment_rng"])
    if trainer.average is not None:  # the fingerprint holds train.ema_decay, so the saved state has an average too
        trainer.average.load_state_dict(state["average"])
    own = state["rank_rng"][rank]
    torch.set_rng_state(own["torch"])
    if trainer.device.type == "cuda" and own["cuda"]:
        torch.cuda.set_rng_state_all(own["cuda"])


def global_rng_state(device) -> dict:
    """This process's global torch (and CUDA) generator states: dropout draws from them."""
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def save_checkpoint(path: Path, model, config: Config, best: dict) -> None:
    """Weights plus everything needed to rebuild and feed the model, so prediction never re-types preprocessing."""
    import torch

    state = {
        "model": config.train.model,
        "image_size": config.data.image_size,
        "labels": list(config.data.labels),
        "task": config.data.task,  # how the outputs read: softmax over classes, or a sigmoid per label
        "dropout": config.train.dropout,
        "epoch": best["epoch"],
        "val_auc": best["val_auc"],
        # contiguous: weights trained channels_last on CUDA are stored in the usual layout
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    if config.train.ensemble > 1:  # pipeline.models.network_for rebuilds an Ensemble of that many members
        state["ensemble"] = config.train.ensemble
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(state, handle)  # through a handle, the archive's inner name is fixed: same weights, same bytes
