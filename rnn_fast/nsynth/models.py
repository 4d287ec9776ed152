"""NSynth instrument-family classifiers on the first second of audio, framed as ``[B, 100, 160]``.

* :class:`LSTMClassifier`: the course report's model. A stack of :class:`rnn_fast.LSTM` layers over the 100
  frames of 160 samples, then one linear layer on the last time step. An optional
  :class:`rnn_fast.nsynth.audio.FrontEnd` turns the frames into other inputs first (a log-mel spectrogram, loudness
  normalisation, augmentation in training mode), still 100 steps; ``pooling`` other than ``"last"`` reads
  statistics of the last layer's outputs over the steps (their mean, and with it their maximum or standard
  deviation) instead of the last step. For a bidirectional stack the "last time step" is each direction's final
  state: the forward direction after frame 99 and the reverse direction after frame 0 (``h_n`` of the last layer),
  because the reverse direction's output at frame 99 has seen one frame only.
* :class:`M5Classifier`: the raw-waveform CNN baseline, M5 of Dai et al., "Very deep convolutional neural networks
  for raw waveforms" (ICASSP 2017): one wide strided convolution (80 taps, stride 4) then three 3-tap
  convolutions with batch norm, ReLU and 4x max pooling, global average pooling and a linear layer. It takes the
  same ``[B, 100, 160]`` batches and reads them back as the ``[B, 1, 16000]`` waveform.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from .audio import FrontEnd
from rnn_fast import LSTM

MODEL_NAMES = ("lstm", "blstm", "cnn")
# Statistics over the steps of the last layer's outputs that each pooling gives the head, side by side.
POOLED_STATISTICS = {"mean": ("mean",), "meanmax": ("mean", "max"), "meanstdmax": ("mean", "std", "max")}
POOLINGS = ("last", *POOLED_STATISTICS)
# Keeps the standard deviation's gradient finite where an output is constant over the steps.
_VARIANCE_FLOOR = 1e-5


def _statistic(name: str, output: torch.Tensor) -> torch.Tensor:
    if name == "mean":
        return output.mean(dim=1)
    if name == "max":
        return output.amax(dim=1)
    return (output.var(dim=1, unbiased=False) + _VARIANCE_FLOOR).sqrt()


class LSTMClassifier(nn.Module):
    """``[B, T, input_size]`` frames -> ``[B, num_classes]`` logits through an LSTM stack and a linear head.

    ``dropout`` applies between LSTM layers and to the head's input. ``front_end`` holds the keyword arguments of
    a :class:`~rnn_fast.nsynth.audio.FrontEnd` that the frames go through first (its ``output_size`` then replaces
    ``input_size``; it needs ``[B, 100, 160]`` frames); ``None`` feeds the frames to the LSTM as they are.
    ``pooling`` is what the head reads: ``"last"`` the final states, ``"mean"`` the last layer's outputs (both
    directions) averaged over the steps, ``"meanmax"`` that average and the outputs' maximum over the steps side by
    side (the head then takes twice as many inputs), ``"meanstdmax"`` those and the standard deviation over the
    steps between them.
    """

    def __init__(self, input_size: int = 160, hidden_size: int = 128, num_layers: int = 2, num_classes: int = 10,
                 bidirectional: bool = False, dropout: float = 0.0, backend: str = "auto",
                 front_end: Optional[dict] = None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.front_end = None if front_end is None else FrontEnd(**front_end)
        if self.front_end is not None:
            input_size = self.front_end.output_size
        self.lstm = LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout,
                         bidirectional=bidirectional, backend=backend)
        self.num_directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        pooled = len(POOLED_STATISTICS[pooling]) if pooling in POOLED_STATISTICS else 1
        self.head = nn.Linear(hidden_size * self.num_directions * pooled, num_classes)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, D*H]``: the last layer's final state of each direction, forward first (nn.LSTM's output order),
        or ``[B, S*D*H]``: the ``S`` statistics over the steps of its outputs that ``POOLED_STATISTICS[pooling]``
        names, side by side."""
        inputs = frames if self.front_end is None else self.front_end(frames)
        output, (h_n, _) = self.lstm(inputs)
        if self.pooling in POOLED_STATISTICS:
            return torch.cat([_statistic(name, output) for name in POOLED_STATISTICS[self.pooling]], dim=1)
        last_layer = h_n[-self.num_directions:]
        return last_layer.transpose(0, 1).reshape(frames.shape[0], -1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(frames)))


class M5Classifier(nn.Module):
    """M5 (Dai et al. 2017) on the raw waveform; ``width`` is the first block's channel count (128 in the paper).

    With 16000 samples the time axis shrinks 16000 -> 3981 (conv 80/4) -> 995 -> 248 -> 61 -> 14 (pools) before
    the global average, so every block sees a valid input.
    """

    def __init__(self, num_classes: int = 10, width: int = 128, channel_multipliers: Sequence[int] = (1, 1, 2, 4)):
        super().__init__()
        channels = [width * m for m in channel_multipliers]
        blocks = []
        in_channels = 1
        for index, out_channels in enumerate(channels):
            first = index == 0
            blocks += [
                nn.Conv1d(in_channels, out_channels, kernel_size=80 if first else 3, stride=4 if first else 1),
                nn.BatchNorm1d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool1d(4),
            ]
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        waveform = frames.reshape(frames.shape[0], 1, -1)
        return self.head(self.blocks(waveform).mean(dim=-1))


def build_model(name: str, num_classes: int = 10, input_size: int = 160, hidden_size: int = 128,
                num_layers: int = 2, dropout: float = 0.0, backend: str = "auto", cnn_width: int = 128,
                front_end: Optional[dict] = None, pooling: str = "last") -> nn.Module:
    """``"lstm"``, ``"blstm"`` (:class:`LSTMClassifier`) or ``"cnn"`` (:class:`M5Classifier`).

    ``hidden_size``, ``num_layers``, ``dropout``, ``backend``, ``front_end`` and ``pooling`` apply to the LSTMs,
    ``cnn_width`` to the CNN.
    """
    if name in ("lstm", "blstm"):
        return LSTMClassifier(input_size, hidden_size, num_layers, num_classes, bidirectional=name == "blstm",
                              dropout=dropout, backend=backend, front_end=front_end, pooling=pooling)
    if name == "cnn":
        if front_end is not None or pooling != "last":
            raise ValueError("the CNN reads the raw waveform: front_end and pooling apply to the LSTM models only")
        return M5Classifier(num_classes, width=cnn_width)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
