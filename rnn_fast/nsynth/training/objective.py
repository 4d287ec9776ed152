"""The loss of a training step. A recipe configures it (``Recipe.objective``); the training loop calls it."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
