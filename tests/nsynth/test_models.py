"""The NSynth classifiers: output shapes, the last-step semantics of the (B)LSTM head against a plain
torch.nn.LSTM built from the same weights (outputs and every gradient), and the M5 CNN's shapes."""
import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.nsynth.models import LSTMClassifier, M5Classifier, build_model

TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5)}
# The head's wiring is what is tested here (each backend is tested against nn.LSTM in tests/ops): "auto" runs
# the fastest backend of this device, "naive" the fused-path driver on the reference recurrence.
BACKENDS = ["auto", "naive"]


def reference_logits(classifier: LSTMClassifier, frames: torch.Tensor) -> torch.Tensor:
    """The head applied to nn.LSTM's outputs: forward direction at the last step, reverse direction at step 0."""
    lstm = classifier.lstm
    reference = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=True,
                        bidirectional=lstm.bidirectional).to(frames.dtype)
    reference.load_state_dict(lstm.state_dict())
    output, _ = reference(frames)
    hidden = lstm.hidden_size
    features = output[:, -1, :hidden]
    if lstm.bidirectional:
        features = torch.cat([features, output[:, 0, hidden:]], dim=1)
    return classifier.head(features), reference


# (batch, steps, features, hidden, layers, bidirectional)
SHAPES = [(5, 7, 9, 6, 2, False), (5, 7, 9, 6, 2, True), (3, 11, 4, 13, 1, True), (1, 4, 3, 5, 3, False)]


def shape_id(shape) -> str:
    batch, steps, features, hidden, layers, bidirectional = shape
    return f"B{batch}-T{steps}-I{features}-H{hidden}-L{layers}-{'bi' if bidirectional else 'uni'}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps,features,hidden,layers,bidirectional", SHAPES, ids=map(shape_id, SHAPES))
def test_lstm_classifier_matches_last_step_of_nn_lstm(batch, steps, features, hidden, layers, bidirectional,
                                                       backend, dtype):
    torch.manual_seed(batch * 100 + steps)
    classifier = LSTMClassifier(features, hidden, layers, num_classes=7, bidirectional=bidirectional,
                                backend=backend).to(dtype)
    frames = torch.randn(batch, steps, features, dtype=dtype, requires_grad=True)
    logits = classifier(frames)
    assert logits.shape == (batch, 7)

    frames_ref = frames.detach().clone().requires_grad_()
    expected, reference = reference_logits(classifier, frames_ref)
    torch.testing.assert_close(logits, expected, **TOLERANCES[dtype])

    weighting = torch.randn_like(logits)
    (logits * weighting).sum().backward()
    (expected * weighting).sum().backward()
    torch.testing.assert_close(frames.grad, frames_ref.grad, **TOLERANCES[dtype])
    reference_params = dict(reference.named_parameters())
    for name, param in classifier.lstm.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[name].grad, **TOLERANCES[dtype], msg=name)


def test_bidirectional_features_are_both_directions_final_states():
    torch.manual_seed(0)
    classifier = LSTMClassifier(4, 3, num_layers=2, num_classes=2, bidirectional=True, backend="torch")
    frames = torch.randn(2, 6, 4)
    output, (h_n, _) = classifier.lstm(frames)
    features = classifier.features(frames)
    torch.testing.assert_close(features[:, :3], output[:, -1, :3])   # forward after the last frame
    torch.testing.assert_close(features[:, 3:], output[:, 0, 3:])    # reverse after the first frame
    torch.testing.assert_close(features, torch.cat([h_n[-2], h_n[-1]], dim=1))
    assert not torch.allclose(features[:, 3:], output[:, -1, 3:])    # not the reverse output at the last frame


@pytest.mark.parametrize("name,parameters", [("lstm", 281_866), ("blstm", 694_794), ("cnn", 559_114)])
def test_build_model_seed_architectures(name, parameters):
    """Default sizes are the report's: hidden 128, 2 layers, 10 classes, M5 with 128/128/256/512 channels."""
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.randn(2, 100, 160)).shape == (2, 10)


def test_build_model_passes_lstm_settings():
    model = build_model("blstm", num_classes=4, input_size=8, hidden_size=5, num_layers=3, dropout=0.25,
                        backend="naive")
    lstm = model.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.dropout, lstm.bidirectional, lstm.backend) == \
        (8, 5, 3, 0.25, True, "naive")
    assert isinstance(lstm, rnn_fast.LSTM) and lstm.batch_first
    assert model.head.out_features == 4


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'gru'"):
        build_model("gru")


@pytest.mark.parametrize("batch", [1, 3])
def test_m5_reads_the_frames_as_one_waveform(batch):
    torch.manual_seed(batch)
    model = M5Classifier(num_classes=10, width=4).eval()
    frames = torch.randn(batch, 100, 160)
    logits = model(frames)
    assert logits.shape == (batch, 10)
    waveform = frames.reshape(batch, 1, 16000)
    feature_map = model.blocks(waveform)
    # 16000 -> conv 80/4 -> 3981 -> pool 995 -> conv 993 -> 248 -> 246 -> 61 -> 59 -> 14
    assert feature_map.shape == (batch, 16, 14)
    torch.testing.assert_close(logits, model.head(feature_map.mean(dim=-1)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_pooling_reads_the_average_spread_and_maximum_of_the_last_layers_outputs(bidirectional):
    torch.manual_seed(1)
    classifier = LSTMClassifier(4, 3, num_layers=2, num_classes=5, bidirectional=bidirectional, backend="torch",
                                pooling="mean")
    frames = torch.randn(2, 6, 4)
    output, _ = classifier.lstm(frames)
    torch.testing.assert_close(classifier.features(frames), output.mean(dim=1))
    torch.testing.assert_close(classifier(frames), classifier.head(output.mean(dim=1)))
    both = LSTMClassifier(4, 3, num_layers=2, num_classes=5, bidirectional=bidirectional, backend="torch",
                          pooling="meanmax")
    both.lstm.load_state_dict(classifier.lstm.state_dict())
    torch.testing.assert_close(both.features(frames), torch.cat([output.mean(dim=1), output.amax(dim=1)], dim=1))
    assert both.head.in_features == 2 * classifier.head.in_features
    three = LSTMClassifier(4, 3, num_layers=2, num_classes=5, bidirectional=bidirectional, backend="torch",
                           pooling="meanstdmax")
    three.lstm.load_state_dict(classifier.lstm.state_dict())
    spread = (output.double().std(dim=1, unbiased=False) ** 2 + 1e-5).sqrt().float()
    torch.testing.assert_close(three.features(frames), torch.cat([output.mean(dim=1), spread, output.amax(dim=1)],
                                                                 dim=1))
    assert three.head.in_features == 3 * classifier.head.in_features
    with torch.no_grad():  # every output 0 at every step: the spread's gradient must stay finite
        for parameter in three.lstm.parameters():
            parameter.zero_()
    three(frames).sum().backward()
    assert all(torch.isfinite(parameter.grad).all() for parameter in three.parameters())
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        LSTMClassifier(pooling="max")
    with pytest.raises(ValueError, match="front_end and pooling apply to the LSTM models only"):
        build_model("cnn", pooling="mean")
