"""Training recipes of the NSynth classifiers: everything around the 2-layer LSTM that ``examples/train_nsynth.py``
``--recipe`` selects, as one frozen :class:`Recipe`.

* ``seed``: the course report's recipe: the raw 160-sample frames, Adam at a constant lr 0.003, plain
  cross-entropy, no regularisation, the last epoch's model.
* ``robust``: the pieces that an ablation on the development set kept because they help on instruments the model
  has never heard (docs/nsynth.md, "Choosing the robust recipe").

Every field can be overridden (``Recipe.replace`` / the script's flags), which is how the ablation ran.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .audio import FRONT_ENDS
from .models import POOLINGS
from .training.objective import Objective

SCHEDULES = ("constant", "cosine")


def piece(default, help: str, **flag) -> dataclasses.Field:
    """A field of :class:`Recipe` with its command-line flag ``--<name-with-dashes>``: ``help`` and ``flag``
    (argparse's ``choices``, ``metavar``, ``type``) are what the CLI declares it with."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def parse_noise_snr(text: str) -> Tuple[float, ...]:
    """``--noise-snr``: ``LOW,HIGH`` in dB, or ``off``."""
    if text == "off":
        return ()
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in dB or off, got {text!r}") from None
    return low, high


@dataclass(frozen=True)
class Recipe:
    """Every field but ``name`` (which ``--recipe`` picks) is a flag of ``examples/train_nsynth.py``."""
    name: str = "seed"
    # The front end (rnn_fast.nsynth.audio.FrontEnd), part of the model.
    front_end: str = piece("frames", "LSTM input: raw 160-sample frames or log-mel", choices=FRONT_ENDS)
    n_mels: int = piece(64, "mel bands of the log-mel front end")
    loudness: bool = piece(False, "scale every example's first second to unit RMS")
    max_delay: float = piece(0.0, "random onset delay in training", metavar="SECONDS")
    noise_snr: Tuple[float, ...] = piece((), "white noise at a random SNR (dB) on half the training examples",
                                         metavar="LOW,HIGH|off", type=parse_noise_snr)
    freq_masks: int = piece(0, "SpecAugment frequency masks (up to 8 bands each)")
    time_masks: int = piece(0, "SpecAugment time masks (up to 10 frames each)")
    freq_shift: int = piece(0, "shift the features by a random number of bands up to this (training only)",
                            metavar="BANDS")
    reverb: float = piece(0.0, "training only: a random room with a reverberation time of up to SECONDS on half "
                               "the examples", metavar="SECONDS")
    eq_db: float = piece(0.0, "log-mel only: random smooth equalisation of up to DB dB per training example",
                         metavar="DB")
    pooling: str = piece("last", "the head reads the LSTM's last step, or its mean over the steps, with the maximum "
                                 "(and standard deviation)", choices=POOLINGS)
    # Regularisation and optimisation.
    dropout: float = piece(0.0, "dropout between LSTM layers and before the head")
    mixup: float = piece(0.0, "mixup with Beta(ALPHA, ALPHA); 0 = off", metavar="ALPHA")
    mixup_within_family: bool = piece(False, "with --mixup: mix each note with another of its own family, keeping "
                                             "its label")
    class_balanced: bool = piece(False, "weight the loss by inverse training class frequency")
    label_smoothing: float = piece(0.0, "cross-entropy against targets with EPS spread evenly over the classes",
                                   metavar="EPS")
    lr: float = piece(0.003, "Adam learning rate")
    weight_decay: float = piece(0.0, "decoupled (AdamW) weight decay; 0 is Adam")
    schedule: str = piece("constant", "learning rate schedule (cosine: one epoch of linear warm-up, then cosine "
                                      "decay to 0)", choices=SCHEDULES)
    ema: float = piece(0.0, "validate, select and serve an exponential moving average of the weights (per-step "
                            "decay; 0 = off)", metavar="DECAY")
    select_best: bool = piece(False, "test (and serve to predict.py) the epoch with the best validation accuracy "
                                     "instead of the last")
    patience: int = piece(0, "with --select-best: stop after this many epochs without a better validation "
                             "accuracy; 0 = never")

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.patience and not self.select_best:
            raise ValueError("patience (early stopping) needs select_best")
        if self.mixup_within_family and not self.mixup:
            raise ValueError("mixup_within_family needs mixup (its Beta parameter)")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema is a per-step decay in [0, 1), got {self.ema}")
        if len(self.noise_snr) not in (0, 2):
            raise ValueError(f"noise_snr is (low, high) dB or () for no noise, got {self.noise_snr}")

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes``; a ``None`` value keeps the field (so unset command-line flags change nothing)."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})

    def front_end_config(self) -> Optional[dict]:
        """Keyword arguments of :class:`rnn_fast.nsynth.audio.FrontEnd`, or ``None`` for the seed's plain frames."""
        config = self._front_end_kwargs()
        return None if config == SEED_FRONT_END else config

    def _front_end_kwargs(self) -> dict:
        config = {"kind": self.front_end, "loudness": self.loudness, "max_delay": self.max_delay,
                  "noise_snr": list(self.noise_snr) or None,
                  "freq_masks": self.freq_masks, "time_masks": self.time_masks, "freq_shift": self.freq_shift,
                  "eq_db": self.eq_db, "reverb": self.reverb}
        if self.front_end == "logmel":
            config["n_mels"] = self.n_mels
        return config

    def model_options(self) -> dict:
        """The recipe's keyword arguments of :func:`rnn_fast.nsynth.models.build_model`."""
        return {"dropout": self.dropout, "front_end": self.front_end_config(), "pooling": self.pooling}

    def optimizer(self, parameters) -> torch.optim.Optimizer:
        """Adam at the recipe's learning rate, with decoupled weight decay (AdamW) when there is any."""
        return torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay, decoupled_weight_decay=True)

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
        """The per-step learning-rate schedule over ``epochs`` epochs, or ``None`` for a constant rate."""
        if self.schedule == "constant":
            return None
        return cosine_schedule(optimizer, epochs * steps_per_epoch, warmup_steps=steps_per_epoch)

    def objective(self, train_labels: np.ndarray, num_classes: int) -> Objective:
        """The training loss, class-weighted from ``train_labels`` when the recipe balances classes."""
        weights = class_weights(train_labels, num_classes) if self.class_balanced else None
        return Objective(weights, self.mixup, self.label_smoothing, self.mixup_within_family)

    def weight_average(self, model: torch.nn.Module) -> Optional[AveragedModel]:
        """The exponential moving average of ``model``'s weights and buffers that the recipe validates, selects
        and serves, or ``None`` when it serves the weights themselves."""
        if not self.ema:
            return None
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.ema), use_buffers=True)

    def as_dict(self) -> dict:
        """Plain values (lists, not tuples), as stored in checkpoints and metrics.json."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


SEED_FRONT_END = Recipe()._front_end_kwargs()  # the default fields: the raw frames, nothing around them
RECIPES = {
    "seed": Recipe(),
    # What the ablation on the proxy soundfont kept (docs/nsynth.md, "Choosing the robust recipe").
    "robust": Recipe(name="robust", front_end="logmel", pooling="meanmax", schedule="cosine", select_best=True),
}


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``count / (num_classes * count_c)`` per class (1 everywhere for balanced labels); 0 for an absent class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear from ``1 / warmup_steps`` to 1 over ``warmup_steps``, then half a
    cosine from 1 down to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # a Python float: checkpoints load weights_only
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
