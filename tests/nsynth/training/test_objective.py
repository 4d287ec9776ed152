"""The training loss (rnn_fast.nsynth.training.objective): cross-entropy weighted per class, mixup across and
within classes, label smoothing."""
import pytest
import torch
import torch.nn.functional as F

from rnn_fast.nsynth.training.objective import Objective, same_class_partners


def logits_model(frames: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in whose logits depend on the (possibly mixed) frames."""
    return frames.reshape(len(frames), -1)[:, :5] * torch.arange(1.0, 6.0)


def test_objective_without_mixup_is_cross_entropy_weighted_per_class():
    torch.manual_seed(0)
    frames, labels = torch.randn(8, 2, 4), torch.randint(0, 5, (8,))
    loss, logits = Objective()(logits_model, frames, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits_model(frames), labels))
    weights = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0])
    loss, _ = Objective(class_weights=weights)(logits_model, frames, labels)
    per_example = F.cross_entropy(logits_model(frames), labels, reduction="none")
    torch.testing.assert_close(loss, (weights[labels] * per_example).sum() / weights[labels].sum())


def test_objective_mixup_mixes_inputs_and_targets_alike_and_is_seeded():
    frames, labels = torch.randn(8, 2, 4), torch.arange(8) % 5
    objective = Objective(mixup=0.4)
    torch.manual_seed(3)
    loss, logits = objective(logits_model, frames, labels)
    torch.manual_seed(3)
    share = torch.distributions.Beta(0.4, 0.4).sample().item()
    partner = torch.randperm(8)
    mixed = share * frames + (1 - share) * frames[partner]
    torch.testing.assert_close(logits, logits_model(mixed))
    expected = share * F.cross_entropy(logits, labels) + (1 - share) * F.cross_entropy(logits, labels[partner])
    torch.testing.assert_close(loss, expected)
    torch.manual_seed(3)
    assert torch.equal(objective(logits_model, frames, labels)[0], loss)


@pytest.mark.parametrize("labels", [[3, 1, 3, 3, 0, 1, 2, 3], [4] * 5, list(range(6))],
                         ids=["mixed", "one-class", "all-singletons"])
def test_same_class_partners_are_a_permutation_within_each_class(labels):
    labels = torch.tensor(labels)
    torch.manual_seed(0)
    drawn = [same_class_partners(labels) for _ in range(20)]
    for partners in drawn:
        assert sorted(partners.tolist()) == list(range(len(labels)))
        assert torch.equal(labels[partners], labels)
        counts = torch.bincount(labels)
        assert all(partner != index or counts[labels[index]] == 1 for index, partner in enumerate(partners.tolist()))
    assert len({tuple(partners.tolist()) for partners in drawn}) > 1 or len(set(labels.tolist())) == len(labels)


def test_objective_within_class_mixup_keeps_each_label():
    frames, labels = torch.randn(8, 2, 4), torch.tensor([0, 1, 0, 1, 2, 2, 0, 3])
    torch.manual_seed(5)
    loss, logits = Objective(mixup=1.0, within_class=True)(logits_model, frames, labels)
    torch.manual_seed(5)
    share = torch.distributions.Beta(1.0, 1.0).sample().item()
    partners = same_class_partners(labels)
    torch.testing.assert_close(logits, logits_model(share * frames + (1 - share) * frames[partners]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_objective_label_smoothing_spreads_a_share_of_each_target_over_the_classes():
    torch.manual_seed(2)
    frames, labels = torch.randn(8, 2, 4), torch.randint(0, 5, (8,))
    loss, logits = Objective(label_smoothing=0.2)(logits_model, frames, labels)
    log_probabilities = logits.log_softmax(dim=1)
    targets = 0.8 * F.one_hot(labels, 5) + 0.2 / 5
    torch.testing.assert_close(loss, -(targets * log_probabilities).sum(dim=1).mean())
