"""The training loop and evaluation (rnn_fast.nsynth.training.engine): logits in split order, the weight average,
selection of the best validation epoch and early stopping."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from rnn_fast.nsynth.data import CLASSES, CLIP_SAMPLES, BatchLoader, NSynthSplit, waveform_to_frames
from rnn_fast.nsynth.models import build_model
from rnn_fast.nsynth.recipes import Recipe
from rnn_fast.nsynth.training.engine import FitSettings, evaluate, fit
from rnn_fast.nsynth.training.state import Learner, TrainingState


def test_evaluate_returns_every_logit_in_split_order():
    torch.manual_seed(0)
    model = build_model("blstm", hidden_size=5, num_layers=1, num_classes=10)
    audio = np.random.default_rng(0).integers(-2**15, 2**15, (11, CLIP_SAMPLES), dtype=np.int16)
    labels = np.arange(11) % 10
    evaluation = evaluate(model, audio, labels, batch_size=4, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(waveform_to_frames(audio))
    np.testing.assert_allclose(evaluation.logits, logits.numpy(), rtol=2e-5, atol=2e-5)
    assert evaluation.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
                                            rel=1e-5)
    assert evaluation.accuracy == accuracy_score(labels, logits.argmax(1).numpy())


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


def tiny_fit(model, optimizer, tmp_path, epochs: int, average=None, **settings):
    """``fit`` on 48 random training and 20 validation notes; ``(state, valid split)``."""
    train, valid = random_split(48, 0), random_split(20, 1)
    state = fit(Learner(model, optimizer, average=average), BatchLoader(train, 16, seed=0), valid, TrainingState(),
                FitSettings(epochs, torch.device("cpu"), tmp_path / "c.pt", {}, progress=False, **settings))
    return state, valid


def random_split(count: int, seed: int) -> NSynthSplit:
    rng = np.random.default_rng(seed)
    zeros = np.zeros(count, np.int64)
    return NSynthSplit(audio=rng.integers(-3000, 3000, (count, CLIP_SAMPLES), dtype=np.int16),
                              labels=np.arange(count) % len(CLASSES), families=zeros, sources=zeros,
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
