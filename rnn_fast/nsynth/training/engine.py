"""Training, evaluation, metrics, checkpoints and DistributedDataParallel for the NSynth classifiers.

Single process and ``torchrun`` share one code path: :func:`distributed_session` yields a :class:`Distributed`
context (rank 0 of 1 when not launched by torchrun), training metrics are summed over ranks, evaluation splits
the examples into one contiguous shard per rank and gathers every logit, and only rank 0 writes files.

Checkpoints hold everything a run's future depends on (weights, optimizer, history, every rank's torch / numpy /
python RNG states, and the finished epochs, which also fix the loader's next shuffle since ``BatchLoader``
orders each epoch from ``(seed, epoch)`` alone), so a run killed at any point and resumed from its last
checkpoint ends, on CPU with a fixed seed, with exactly the metrics of an uninterrupted run.
"""
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..models import build_model
from ..data import waveform_to_frames


# --------------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a (possibly one-process) job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed_session(device_type: str) -> Iterator[Distributed]:
    """Joins the process group torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``env://``):
    NCCL for CUDA, gloo for CPU. Without those variables this is a one-process job and nothing is initialised.

    On a clean exit the ranks wait for each other before tearing the group down: a gloo rank that destroys its
    group while a peer is still working (rank 0 writing figures) can abort with ``terminate called without an
    active exception``. After an exception there is no barrier, since the other ranks may never reach it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Distributed()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield Distributed(rank, world_size, local_rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Distributed, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job, ``model`` itself otherwise."""
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_gather_objects(obj, ctx: Distributed) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_bounds(count: int, ctx: Distributed) -> slice:
    """This rank's contiguous share of ``count`` examples; the shards cover every example exactly once."""
    return slice(count * ctx.rank // ctx.world_size, count * (ctx.rank + 1) // ctx.world_size)


# --------------------------------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states, as tensors and plain Python values so
    that checkpoints load with ``torch.load(weights_only=True)``."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


# --------------------------------------------------------------------------------------------------- metrics
def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each true class (diagonal / row sum); NaN for a class with no examples."""
    totals = confusion.sum(axis=1)
    return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


@dataclass
class Evaluation:
    """Every example's logits (in split order) and the summary metrics derived from them."""
    logits: np.ndarray
    labels: np.ndarray
    loss: float
    accuracy: float

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()

    def confusion(self, num_classes: int) -> np.ndarray:
        return confusion_matrix(self.labels, self.predictions, num_classes)


# --------------------------------------------------------------------------------------------------- train / eval
@torch.no_grad()
def predict_logits(model: nn.Module, audio: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """float32 ``[N, C]`` logits of int16 / float waveforms ``[N, >=16000]`` (only the first second is used)."""
    model.eval()
    # Rows are copied out of the (read-only) memory map and cross to the device as int16, half the bytes of
    # float32; they become frames there.
    chunks = [model(waveform_to_frames(torch.from_numpy(np.array(audio[start:start + batch_size])).to(device)))
              .float().cpu().numpy() for start in range(0, len(audio), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def _synchronize_buffers(model: nn.Module, ctx: Distributed) -> None:
    """Rank 0's buffers (BatchNorm running statistics) everywhere: each rank's last training step updated its
    own copy, and every rank must evaluate the model that rank 0 checkpoints."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(model: nn.Module, audio: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
             ctx: Distributed = Distributed()) -> Evaluation:
    """Logits of every example and mean cross-entropy / accuracy, identical on every rank.

    Each rank runs its contiguous shard through the plain module (DDP's forward would broadcast buffers, a
    collective the ranks cannot all reach when their shards hold different numbers of batches), and the
    logits are gathered in rank order, i.e. in split order.
    """
    module = unwrap_model(model)
    _synchronize_buffers(module, ctx)
    shard = shard_bounds(len(labels), ctx)
    parts = all_gather_objects(predict_logits(module, audio[shard], batch_size, device), ctx)
    logits = np.concatenate([part for part in parts if len(part)])
    labels = np.asarray(labels, dtype=np.int64)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return Evaluation(logits, labels, loss, accuracy(labels, logits.argmax(axis=1)))


def _reduce_sum(totals: torch.Tensor, count: int, ctx: Distributed) -> List[float]:
    """``[loss_sum, correct, count]`` summed over ranks."""
    values = torch.cat([totals, totals.new_tensor([count])])
    if ctx.enabled:
        dist.all_reduce(values)
    return values.tolist()


@dataclass
class Objective:
    """The loss of a training step: cross-entropy, weighted per class when ``class_weights`` is given, and with
    ``mixup > 0`` on a batch mixed with a shuffled copy of itself (Zhang et al., 2018; the mixing weight is drawn
    from Beta(mixup, mixup) once per batch from torch's generator, the loss mixes the two targets' losses alike).
    The frames are mixed before the model, i.e. the two waveforms are added. With ``within_class`` each example
    is mixed with another of its own class, so the mixture keeps its label: a new instrument of the same family
    rather than a blend of two families."""
    class_weights: Optional[torch.Tensor] = None
    mixup: float = 0.0
    label_smoothing: float = 0.0
    within_class: bool = False

    def __call__(self, model: nn.Module, frames: torch.Tensor, labels: torch.Tensor):
        """``(loss, logits)``."""
        weight = None if self.class_weights is None else self.class_weights.to(frames.device)
        if not self.mixup:
            logits = model(frames)
            return self._cross_entropy(logits, labels, weight), logits
        share = torch.distributions.Beta(self.mixup, self.mixup).sample().item()
        if self.within_class:
            partner = same_class_partners(labels)
        else:
            partner = torch.randperm(len(labels), device=frames.device)
        logits = model(share * frames + (1 - share) * frames[partner])
        loss = (share * self._cross_entropy(logits, labels, weight)
                + (1 - share) * self._cross_entropy(logits, labels[partner], weight))
        return loss, logits

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]):
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=self.label_smoothing)


def same_class_partners(labels: torch.Tensor) -> torch.Tensor:
    """A random permutation of the batch that maps every example to another of its class (to itself only when it
    is its class's one example): the classes' members in random order, each sent to the next, the last to the
    first."""
    order = torch.randperm(len(labels), device=labels.device)
    grouped = order[torch.argsort(labels[order], stable=True)]
    grouped_labels = labels[grouped]
    following = torch.roll(grouped, -1)
    group_first = grouped[torch.searchsorted(grouped_labels, grouped_labels)]
    partners = torch.empty_like(grouped)
    partners[grouped] = torch.where(torch.roll(grouped_labels, -1) == grouped_labels, following, group_first)
    return partners


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int, epochs: int,
                    ctx: Distributed = Distributed(), log_every: int = 100, progress: bool = True,
                    objective: Objective = Objective(), scheduler=None,
                    average: Optional[AveragedModel] = None) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean training loss and accuracy over all ranks (accuracy
    against the batch's own labels, also under mixup). ``scheduler`` steps after every optimizer step.

    Every ``log_every`` steps rank 0 prints ``Epoch [e/E], Step [s/S], Loss: x, Accuracy: y%`` with the
    epoch's running mean loss and accuracy so far (all ranks). Totals stay on the device so that steps do not
    wait for the host.
    """
    model.train()
    steps = len(loader)
    totals, count = None, 0
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    for step, (frames, labels) in enumerate(loader, start=1):
        loss, logits = objective(model, frames, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update_parameters(unwrap_model(model))
        batch_totals = torch.stack([loss.detach().double() * len(labels),
                                    (logits.detach().argmax(dim=1) == labels).sum().double()])
        totals = batch_totals if totals is None else totals + batch_totals
        count += len(labels)
        bar.update(1)
        if step % log_every == 0:
            loss_sum, correct, total_count = _reduce_sum(totals, count, ctx)
            if ctx.is_main:
                bar.write(f"Epoch [{epoch}/{epochs}], Step [{step}/{steps}], Loss: {loss_sum / total_count:.4f}, "
                          f"Accuracy: {100 * correct / total_count:.2f}%")
    bar.close()
    if totals is None:
        raise ValueError("the training loader yielded no batch: the split holds fewer examples than one batch")
    loss_sum, correct, count = _reduce_sum(totals, count, ctx)
    return {"train_loss": loss_sum / count, "train_accuracy": correct / count}


# --------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` atomically: a kill at any moment leaves either the previous checkpoint or the new one,
    never a torn file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_classifier(path: Path, device: torch.device, backend: str = "auto"):
    """``(model in eval mode, class names)`` from a checkpoint written by ``examples/train_nsynth.py``: the
    weights the run tested (:func:`served_weights`)."""
    checkpoint = load_checkpoint(path, map_location=device)
    config = checkpoint["config"]
    model = build_model(**config["model_config"], backend=backend).to(device)
    model.load_state_dict(served_weights(checkpoint))
    return model.eval(), list(config["classes"])


def served_weights(checkpoint: dict) -> dict:
    """What :func:`fit` leaves in the model: the selected epoch's weights when the run selected one on validation,
    else the weight average when it kept one, else the last epoch's weights."""
    if checkpoint.get("best_model"):
        return checkpoint["best_model"]
    if checkpoint.get("average"):
        prefix = "module."
        return {key[len(prefix):]: value for key, value in checkpoint["average"].items() if key.startswith(prefix)}
    return checkpoint["model"]


# --------------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainingState:
    """What a run has done so far; ``epoch`` counts finished epochs. With selection on validation,
    ``best_epoch`` (0: none yet) is the epoch of highest validation accuracy and ``best_model`` its weights;
    ``stopped`` is set once early stopping ended the run."""
    epoch: int = 0
    history: Optional[List[dict]] = None
    best_epoch: int = 0
    best_model: Optional[dict] = None
    stopped: bool = False

    def __post_init__(self):
        self.history = [] if self.history is None else self.history


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainingState, config: dict,
                     ctx: Distributed, scheduler=None, average: Optional[AveragedModel] = None) -> dict:
    """The checkpoint dictionary; a collective (every rank's RNG state is gathered), so all ranks call it."""
    return {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "average": None if average is None else average.state_dict(),
        "epoch": state.epoch,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_model": state.best_model,
        "stopped": state.stopped,
        "config": config,
        "rng": all_gather_objects(capture_rng_state(), ctx),
        "world_size": ctx.world_size,
    }


def restore_checkpoint(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                       ctx: Distributed, scheduler=None, average: Optional[AveragedModel] = None) -> TrainingState:
    """Loads weights, optimizer, scheduler, weight average and this rank's RNG state; returns the run's
    progress."""
    unwrap_model(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if average is not None:
        average.load_state_dict(checkpoint["average"])
    if checkpoint["world_size"] != ctx.world_size:
        raise ValueError(f"the checkpoint was written by {checkpoint['world_size']} process(es) and this job has "
                         f"{ctx.world_size}: resume with the same number of processes")
    restore_rng_state(checkpoint["rng"][ctx.rank])
    return TrainingState(checkpoint["epoch"], list(checkpoint["history"]), checkpoint.get("best_epoch", 0),
                         checkpoint.get("best_model"), checkpoint.get("stopped", False))


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_loader, valid_audio: np.ndarray,
        valid_labels: np.ndarray, epochs: int, state: TrainingState, checkpoint_path: Path, config: dict,
        device: torch.device, ctx: Distributed = Distributed(), eval_batch_size: int = 256, log_every: int = 100,
        progress: bool = True, objective: Objective = Objective(), scheduler=None, select_best: bool = False,
        patience: int = 0, average: Optional[AveragedModel] = None) -> TrainingState:
    """Trains from ``state.epoch`` to ``epochs``: each epoch trains, validates, appends to the history, prints
    a summary line and checkpoints (rank 0 writes).

    With ``average`` (updated after every optimizer step) the averaged weights are what is validated, selected
    and, at the end, loaded into ``model``; training itself continues from the raw weights.

    With ``select_best`` the weights of the epoch with the highest validation accuracy (the earliest on a tie) are
    kept, and loaded into ``model`` at the end; with ``patience > 0`` too, training stops once that many epochs in a
    row have not beaten it (early stopping).
    """
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.stopped:
            break
        train_loader.set_epoch(epoch - 1)
        started = time.perf_counter()
        train_metrics = train_one_epoch(model, train_loader, optimizer, epoch, epochs, ctx, log_every, progress,
                                        objective, scheduler, average)
        epoch_seconds = time.perf_counter() - started
        judged = model if average is None else average.module
        validation = evaluate(judged, valid_audio, valid_labels, eval_batch_size, device, ctx)
        state.history.append({"epoch": epoch, **train_metrics, "val_loss": validation.loss,
                              "val_accuracy": validation.accuracy, "epoch_seconds": epoch_seconds})
        state.epoch = epoch
        if select_best and (not state.best_epoch
                            or validation.accuracy > state.history[state.best_epoch - 1]["val_accuracy"]):
            state.best_epoch = epoch
            state.best_model = {key: value.detach().cpu().clone()
                                for key, value in unwrap_model(judged).state_dict().items()}
        state.stopped = bool(select_best and patience and epoch - state.best_epoch >= patience)
        if ctx.is_main:
            tqdm.write(f"Epoch [{epoch}/{epochs}] train loss {train_metrics['train_loss']:.4f} "
                       f"acc {100 * train_metrics['train_accuracy']:.2f}% | val loss {validation.loss:.4f} "
                       f"acc {100 * validation.accuracy:.2f}% | {epoch_seconds:.1f} s"
                       + (f" | early stop, best epoch {state.best_epoch}" if state.stopped else ""))
        checkpoint = checkpoint_state(model, optimizer, state, config, ctx, scheduler, average)
        if ctx.is_main:
            save_checkpoint(checkpoint_path, checkpoint)
    if select_best and state.best_model is not None:
        unwrap_model(model).load_state_dict(state.best_model)
    elif average is not None:
        unwrap_model(model).load_state_dict(average.module.state_dict())
    return state


def metrics_summary(model_name: str, backend: str, evaluation: Evaluation, classes: Sequence[str],
                    counts: Dict[str, int], history: List[dict], recipe: Optional[dict] = None,
                    tested_epoch: Optional[int] = None) -> dict:
    """The content of ``metrics.json``; per-class accuracy is None for a class absent from the test split.
    ``tested_epoch`` is the epoch whose weights were tested (default: the last)."""
    confusion = evaluation.confusion(len(classes))
    per_class = per_class_accuracy(confusion)
    return {
        "model": model_name,
        "backend": backend,
        "recipe": recipe,
        "tested_epoch": tested_epoch or (history[-1]["epoch"] if history else 0),
        "test_accuracy": evaluation.accuracy,
        "per_class_accuracy": {name: (None if math.isnan(value) else float(value))
                               for name, value in zip(classes, per_class)},
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
        "n_train": counts["train"],
        "n_valid": counts["valid"],
        "n_test": counts["test"],
        "history": history,
    }
