"""What a training run is made of and how far it has come; a checkpoint holds both."""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .objective import Objective


@dataclass
class Learner:
    """What a training step uses and changes: the model (wrapped for DistributedDataParallel or not), its optimizer
    and loss, and when the recipe has them the per-step learning-rate schedule and the weight average (updated
    after every optimizer step); ``precision``, ``"fp32"`` or ``"bf16"`` (autocast), is how its forwards run."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective = field(default_factory=Objective)
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    average: Optional[AveragedModel] = None
    precision: str = "fp32"


@dataclass
class TrainingState:
    """What a run has done so far; ``epoch`` counts finished epochs. With selection on validation,
    ``best_epoch`` (0: none yet) is the epoch of highest validation accuracy and ``best_model`` its weights;
    ``stopped`` is set once early stopping ended the run."""
    epoch: int = 0
    history: List[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_model: Optional[dict] = None
    stopped: bool = False
