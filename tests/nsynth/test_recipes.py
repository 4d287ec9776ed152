"""The training recipes' pieces (rnn_fast.recipes, and the objective / selection of rnn_fast.training): what each
recipe sets, class weights, the cosine schedule, the mixup and class-weighted losses, and selection of the best
validation epoch with early stopping."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnn_fast.nsynth import data as nsynth
from rnn_fast.nsynth.audio import FrontEnd
from rnn_fast.nsynth.models import build_model
from rnn_fast.nsynth.recipes import RECIPES, Recipe, class_weights, cosine_schedule
from rnn_fast.nsynth.training.engine import Objective, TrainingState, evaluate, fit, same_class_partners


def test_seed_recipe_is_the_report_setup():
    seed = RECIPES["seed"]
    assert seed == Recipe() and seed.front_end_config() is None
    assert (seed.lr, seed.weight_decay, seed.dropout, seed.mixup, seed.schedule, seed.select_best) == \
        (0.003, 0.0, 0.0, 0.0, "constant", False)


def test_robust_recipe_builds_its_front_end():
    robust = RECIPES["robust"]
    config = robust.front_end_config()
    assert config["kind"] == robust.front_end
    model = build_model("lstm", **robust.model_options())
    assert isinstance(model.front_end, FrontEnd) and model.lstm.input_size == model.front_end.output_size
    assert model(torch.zeros(2, nsynth.FRAMES, nsynth.FRAME_SIZE)).shape == (2, len(nsynth.CLASSES))


def test_recipe_replace_keeps_fields_given_as_none_and_checks_values():
    robust = RECIPES["robust"]
    assert robust.replace(mixup=None, lr=None) == robust
    assert robust.replace(mixup=0.0).mixup == 0.0 and robust.replace(mixup=0.0).lr == robust.lr
    assert robust.replace(noise_snr=()).front_end_config()["noise_snr"] is None
    with pytest.raises(ValueError, match="unknown schedule"):
        Recipe(schedule="step")
    with pytest.raises(ValueError, match="needs select_best"):
        Recipe(patience=3)
    with pytest.raises(ValueError, match="noise_snr"):
        Recipe(noise_snr=(10.0,))
    with pytest.raises(ValueError, match="needs mixup"):
        Recipe(mixup_within_family=True)
    assert Recipe(noise_snr=(10.0, 20.0)).as_dict()["noise_snr"] == [10.0, 20.0]


def test_class_weights_are_inverse_frequency():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
    torch.testing.assert_close(class_weights(labels, 4), torch.tensor([12 / (4 * 6), 12 / (4 * 3), 12 / (4 * 3), 0.0]))
    torch.testing.assert_close(class_weights(np.arange(10), 10), torch.ones(10))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = cosine_schedule(optimizer, total_steps=14, warmup_steps=4)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.0 * (step + 1) / 4 for step in range(4)]
    expected += [2.0 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 10)) for step in range(4, 14)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


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


def test_weight_average_follows_every_step_and_is_what_fit_validates_and_serves(tmp_path):
    """The moving average starts at the first step's weights and then moves ``1 - decay`` of the way to each
    later step's; validation reads it, and at the end the model holds it."""
    model, optimizer = tiny_classifier(lr=0.05)
    average = Recipe(ema=0.7).weight_average(model)
    expected, raw = {}, {}

    def follow(optimizer, args, kwargs):
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                raw[name] = value.clone()
                expected[name] = raw[name] if name not in expected else 0.7 * expected[name] + 0.3 * value

    optimizer.register_step_post_hook(follow)
    state, valid = tiny_fit(model, optimizer, tmp_path, epochs=2, average=average)
    assert average.n_averaged.item() == 2 * 3  # 48 examples in batches of 16, twice
    served = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(served[name], value, msg=name)
    assert any(not torch.equal(served[name], raw[name]) for name in raw)
    validated = evaluate(model, valid.audio, valid.labels, 8, torch.device("cpu"))
    assert validated.accuracy == state.history[-1]["val_accuracy"]
    assert Recipe().weight_average(model) is None
    with pytest.raises(ValueError, match="ema"):
        Recipe(ema=1.0)


def tiny_classifier(lr: float):
    torch.manual_seed(0)
    model = build_model("lstm", hidden_size=8, num_layers=1, backend="naive", front_end={"kind": "logmel",
                                                                                        "n_mels": 16})
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def tiny_fit(model, optimizer, tmp_path, epochs: int, **options):
    """``fit`` on 48 random training and 20 validation notes; ``(state, valid split)``."""
    train, valid = random_split(48, 0), random_split(20, 1)
    state = fit(model, optimizer, nsynth.BatchLoader(train, 16, seed=0), valid.audio, valid.labels, epochs,
                TrainingState(), tmp_path / "c.pt", {}, torch.device("cpu"), progress=False, **options)
    return state, valid


def random_split(count: int, seed: int) -> nsynth.NSynthSplit:
    rng = np.random.default_rng(seed)
    zeros = np.zeros(count, np.int64)
    return nsynth.NSynthSplit(audio=rng.integers(-3000, 3000, (count, nsynth.CLIP_SAMPLES), dtype=np.int16),
                              labels=np.arange(count) % len(nsynth.CLASSES), families=zeros, sources=zeros,
                              pitches=zeros, velocities=zeros, instruments=zeros,
                              note_strs=[f"note{index}" for index in range(count)])


@pytest.mark.parametrize("lr,patience", [(0.0, 2), (0.05, 0)], ids=["flat-stops-early", "learning-keeps-best"])
def test_fit_keeps_the_best_validation_epoch_and_stops_without_improvement(lr, patience, tmp_path):
    model, optimizer = tiny_classifier(lr)
    state, valid = tiny_fit(model, optimizer, tmp_path, epochs=5, select_best=True, patience=patience)
    accuracies = [entry["val_accuracy"] for entry in state.history]
    assert state.best_epoch == 1 + int(np.argmax(accuracies))  # the earliest of equal accuracies
    if patience:  # nothing is learnt at lr 0, so the first epoch stays best and training stops `patience` later
        assert state.stopped and len(state.history) == 1 + patience and state.best_epoch == 1
    else:
        assert not state.stopped and len(state.history) == 5
    reloaded = evaluate(model, valid.audio, valid.labels, 8, torch.device("cpu"))
    assert reloaded.accuracy == accuracies[state.best_epoch - 1]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state.best_model[name]), name
