"""Checkpoints: everything a run's future depends on, as tensors and plain Python values only (they load with
``torch.load(weights_only=True)``, and name no class, so no module path of ours is stored in them).

A checkpoint holds the weights, optimizer, schedule and weight average, the history, every rank's torch / numpy /
python RNG states and the finished epochs, which also fix the loader's next shuffle since ``BatchLoader`` orders
each epoch from ``(seed, epoch)`` alone. So a run killed at any point and resumed from its last checkpoint ends,
on CPU with a fixed seed, with exactly the metrics of an uninterrupted run.
"""
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from ..atomic import atomic_write
from ..models import build_model
from .distributed import Distributed, all_gather_objects, unwrap_model
from .rng import capture_rng_state, restore_rng_state
from .state import Learner, TrainingState


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` atomically: a kill at any moment leaves either the previous checkpoint or the new one,
    never a torn file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_state(learner: Learner, state: TrainingState, config: dict, ctx: Distributed) -> dict:
    """The checkpoint dictionary; a collective (every rank's RNG state is gathered), so all ranks call it."""
    return {
        "model": unwrap_model(learner.model).state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": None if learner.scheduler is None else learner.scheduler.state_dict(),
        "average": None if learner.average is None else learner.average.state_dict(),
        "epoch": state.epoch,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_model": state.best_model,
        "stopped": state.stopped,
        "config": config,
        "rng": all_gather_objects(capture_rng_state(), ctx),
        "world_size": ctx.world_size,
    }


def restore_checkpoint(checkpoint: dict, learner: Learner, ctx: Distributed) -> TrainingState:
    """Loads weights, optimizer, scheduler, weight average and this rank's RNG state; returns the run's
    progress."""
    unwrap_model(learner.model).load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    if learner.scheduler is not None:
        learner.scheduler.load_state_dict(checkpoint["scheduler"])
    if learner.average is not None:
        learner.average.load_state_dict(checkpoint["average"])
    if checkpoint["world_size"] != ctx.world_size:
        raise ValueError(f"the checkpoint was written by {checkpoint['world_size']} process(es) and this job has "
                         f"{ctx.world_size}: resume with the same number of processes")
    restore_rng_state(checkpoint["rng"][ctx.rank])
    return TrainingState(checkpoint["epoch"], list(checkpoint["history"]), checkpoint.get("best_epoch", 0),
                         checkpoint.get("best_model"), checkpoint.get("stopped", False))


def load_classifier(path: Path, device: torch.device, backend: str = "auto") -> Tuple[nn.Module, List[str]]:
    """``(model in eval mode, class names)`` from a checkpoint of ``examples/train_nsynth.py``: the weights the run
    tested (:func:`served_weights`)."""
    checkpoint = load_checkpoint(path, map_location=device)
    config = checkpoint["config"]
    model = build_model(**config["model_config"], backend=backend).to(device)
    model.load_state_dict(served_weights(checkpoint))
    return model.eval(), list(config["classes"])


def served_weights(checkpoint: dict) -> dict:
    """What :func:`~rnn_fast.nsynth.training.engine.fit` leaves in the model: the selected epoch's weights when
    the run selected one on validation, else the weight average when it kept one, else the last epoch's
    weights."""
    if checkpoint.get("best_model"):
        return checkpoint["best_model"]
    if checkpoint.get("average"):
        prefix = "module."
        return {key[len(prefix):]: value for key, value in checkpoint["average"].items() if key.startswith(prefix)}
    return checkpoint["model"]
