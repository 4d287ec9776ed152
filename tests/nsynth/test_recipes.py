"""The training recipes (rnn_fast.nsynth.recipes): what each recipe sets, class weights and the cosine schedule (the
losses they configure are tested in training/test_objective.py, selection and the weight average in
training/test_engine.py)."""
import math

import numpy as np
import pytest
import torch

from rnn_fast.nsynth.data import CLASSES, FRAME_SIZE, FRAMES
from rnn_fast.nsynth.audio import FrontEnd
from rnn_fast.nsynth.models import build_model
from rnn_fast.nsynth.recipes import RECIPES, Recipe, class_weights, cosine_schedule


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
    assert model(torch.zeros(2, FRAMES, FRAME_SIZE)).shape == (2, len(CLASSES))


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
