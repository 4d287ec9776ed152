"""Training and evaluation of the NSynth classifiers, in one process or under ``torchrun``.

Training metrics are summed over ranks, evaluation splits the examples into one contiguous shard per rank and
gathers every logit, and only rank 0 writes checkpoints.
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import NSynthSplit, waveform_to_frames
from .checkpoint import checkpoint_state, save_checkpoint
from .distributed import (Distributed, all_gather_objects, shard_bounds, sum_over_ranks, synchronize_buffers,
                          unwrap_model)
from .metrics import Evaluation, accuracy
from .state import Learner, TrainingState


PRECISIONS = ("fp32", "bf16")


def forward_precision(precision: str, device: torch.device):
    """The context a forward runs in: autocast to bfloat16 on ``device`` for ``"bf16"`` (the weights stay fp32),
    nothing for ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict_logits(model: nn.Module, audio: np.ndarray, batch_size: int, device: torch.device,
                   precision: str = "fp32") -> np.ndarray:
    """float32 ``[N, C]`` logits of int16 / float waveforms ``[N, >=16000]`` (only the first second is used), the
    forward in ``precision`` (:func:`forward_precision`)."""
    model.eval()
    # Rows are copied out of the (read-only) memory map and cross to the device as int16, half the bytes of
    # float32; they become frames there.
    chunks = []
    for start in range(0, len(audio), batch_size):
        frames = waveform_to_frames(torch.from_numpy(np.array(audio[start:start + batch_size])).to(device))
        with forward_precision(precision, device):
            logits = model(frames)
        chunks.append(logits.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, audio: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
             ctx: Distributed = Distributed(), precision: str = "fp32") -> Evaluation:
    """Logits of every example and mean cross-entropy / accuracy, identical on every rank.

    Each rank runs its contiguous shard through the plain module (DDP's forward would broadcast buffers, a
    collective the ranks cannot all reach when their shards hold different numbers of batches), and the
    logits are gathered in rank order, i.e. in split order.
    """
    module = unwrap_model(model)
    synchronize_buffers(module, ctx)
    shard = shard_bounds(len(labels), ctx)
    parts = all_gather_objects(predict_logits(module, audio[shard], batch_size, device, precision), ctx)
    logits = np.concatenate([part for part in parts if len(part)])
    labels = np.asarray(labels, dtype=np.int64)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return Evaluation(logits, labels, loss, accuracy(labels, logits.argmax(axis=1)))


def train_one_epoch(learner: Learner, loader, epoch: int, epochs: int, ctx: Distributed = Distributed(),
                    log_every: int = 100, progress: bool = True) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean training loss and accuracy over all ranks (accuracy
    against the batch's own labels, also under mixup). The scheduler steps, and the weight average follows,
    after every optimizer step.

    Every ``log_every`` steps rank 0 prints ``Epoch [e/E], Step [s/S], Loss: x, Accuracy: y%`` with the
    epoch's running mean loss and accuracy so far (all ranks). Totals stay on the device so that steps do not
    wait for the host.
    """
    model, optimizer = learner.model, learner.optimizer
    model.train()
    steps = len(loader)
    totals, count = None, 0
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    for step, (frames, labels) in enumerate(loader, start=1):
        with forward_precision(learner.precision, frames.device):
            loss, logits = learner.objective(model, frames, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if learner.scheduler is not None:
            learner.scheduler.step()
        if learner.average is not None:
            learner.average.update_parameters(unwrap_model(model))
        batch_totals = torch.stack([loss.detach().double() * len(labels),
                                    (logits.detach().argmax(dim=1) == labels).sum().double()])
        totals = batch_totals if totals is None else totals + batch_totals
        count += len(labels)
        bar.update(1)
        if step % log_every == 0:
            loss_sum, correct, total_count = sum_over_ranks(totals, count, ctx)
            if ctx.is_main:
                bar.write(f"Epoch [{epoch}/{epochs}], Step [{step}/{steps}], Loss: {loss_sum / total_count:.4f}, "
                          f"Accuracy: {100 * correct / total_count:.2f}%")
    bar.close()
    if totals is None:
        raise ValueError("the training loader yielded no batch: the split holds fewer examples than one batch")
    loss_sum, correct, count = sum_over_ranks(totals, count, ctx)
    return {"train_loss": loss_sum / count, "train_accuracy": correct / count}


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit` runs: up to ``epochs`` epochs on ``device``, a checkpoint holding ``run_config`` (what
    rebuilds the model, and what a resumed run must share) written to ``checkpoint_path`` after each, validation
    in batches of ``eval_batch_size``, a progress line every ``log_every`` steps and a progress bar unless
    ``progress`` is off.

    With ``select_best`` the weights of the epoch with the highest validation accuracy (the earliest on a tie) are
    kept, and loaded into the model at the end; with ``patience > 0`` too, training stops once that many epochs in
    a row have not beaten it (early stopping)."""
    epochs: int
    device: torch.device
    checkpoint_path: Path
    run_config: dict
    eval_batch_size: int = 256
    log_every: int = 100
    progress: bool = True
    select_best: bool = False
    patience: int = 0


def fit(learner: Learner, train_loader, valid: NSynthSplit, state: TrainingState, settings: FitSettings,
        ctx: Distributed = Distributed()) -> TrainingState:
    """Trains from ``state.epoch`` to ``settings.epochs``: each epoch trains, validates, appends to the history,
    prints a summary line and checkpoints (rank 0 writes).

    With a weight average the averaged weights are what is validated, selected and, at the end, loaded into the
    model; training itself continues from the raw weights.
    """
    model, average, epochs = learner.model, learner.average, settings.epochs
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.stopped:
            break
        train_loader.set_epoch(epoch - 1)
        started = time.perf_counter()
        train_metrics = train_one_epoch(learner, train_loader, epoch, epochs, ctx, settings.log_every,
                                        settings.progress)
        epoch_seconds = time.perf_counter() - started
        judged = model if average is None else average.module
        validation = evaluate(judged, valid.audio, valid.labels, settings.eval_batch_size, settings.device, ctx,
                              learner.precision)
        state.history.append({"epoch": epoch, **train_metrics, "val_loss": validation.loss,
                              "val_accuracy": validation.accuracy, "epoch_seconds": epoch_seconds})
        state.epoch = epoch
        if settings.select_best and (not state.best_epoch
                                     or validation.accuracy > state.history[state.best_epoch - 1]["val_accuracy"]):
            state.best_epoch = epoch
            state.best_model = {key: value.detach().cpu().clone()
                                for key, value in unwrap_model(judged).state_dict().items()}
        state.stopped = bool(settings.select_best and settings.patience
                             and epoch - state.best_epoch >= settings.patience)
        if ctx.is_main:
            tqdm.write(f"Epoch [{epoch}/{epochs}] train loss {train_metrics['train_loss']:.4f} "
                       f"acc {100 * train_metrics['train_accuracy']:.2f}% | val loss {validation.loss:.4f} "
                       f"acc {100 * validation.accuracy:.2f}% | {epoch_seconds:.1f} s"
                       + (f" | early stop, best epoch {state.best_epoch}" if state.stopped else ""))
        checkpoint = checkpoint_state(learner, state, settings.run_config, ctx)
        if ctx.is_main:
            save_checkpoint(settings.checkpoint_path, checkpoint)
    if settings.select_best and state.best_model is not None:
        unwrap_model(model).load_state_dict(state.best_model)
    elif average is not None:
        unwrap_model(model).load_state_dict(average.module.state_dict())
    return state
