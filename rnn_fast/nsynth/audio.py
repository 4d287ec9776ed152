"""What the NSynth classifiers put between the first second of audio and the LSTM: a front end (the raw 160-sample
frames, or a log-mel spectrogram computed on the fly), loudness normalisation, and augmentation that runs in
training mode only.

:class:`FrontEnd` takes the loader's ``[B, FRAMES, FRAME_SIZE]`` frames and returns the LSTM's ``[B, FRAMES, F]``
inputs, so that a checkpoint holds everything that turns audio into a prediction (``examples/predict.py`` needs
nothing else). Its augmentations draw from torch's global generator, like dropout: a seeded run repeats exactly,
and in ``eval()`` mode they are the identity.

torchaudio's CPU wheel does not install next to the torch this project pins, so the mel spectrogram is written
here with ``torch.stft`` and a triangular mel filterbank (HTK mel scale, unnormalised triangles: torchaudio's
``MelSpectrogram`` defaults, and ``librosa.filters.mel(htk=True, norm=None)``, which the tests compare it with).
"""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .data.families import FRAME_SIZE, FRAMES, SAMPLE_RATE

FRONT_ENDS = ("frames", "logmel")
LOG_FLOOR = 1e-6  # added to the mel power before the log: 60 dB below a unit-RMS signal


def hz_to_mel(frequency):
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(frequency, dtype=torch.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                   f_max: Optional[float] = None) -> torch.Tensor:
    """float64 ``[n_fft // 2 + 1, n_mels]``: column ``m`` is a triangle over the FFT bins that rises from the
    centre frequency of band ``m - 1`` to 1 at band ``m``'s and falls to 0 at band ``m + 1``'s, the centres equally
    spaced in mel from ``f_min`` to ``f_max`` (default: Nyquist). Raises when a band would catch no FFT bin."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got f_min={f_min}, f_max={f_max}")
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    empty = (filters.sum(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mel bands {empty} of {n_mels} catch no bin of a {n_fft}-point FFT; use fewer bands, a "
                         "higher f_min or a longer FFT")
    return filters


def normalise_loudness(waveform: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each row of ``[B, S]`` scaled to unit RMS (a silent row stays silent)."""
    return waveform * torch.rsqrt(waveform.square().mean(dim=-1, keepdim=True) + eps)


class LogMel(nn.Module):
    """``[B, S]`` waveform -> ``[B, frames, n_mels]`` natural-log mel power, one frame every ``hop_length``
    samples (a Hann window of ``n_fft`` samples centred on each frame start, reflect-padded at the edges)."""

    def __init__(self, n_mels: int = 64, n_fft: int = 512, hop_length: int = FRAME_SIZE, frames: int = FRAMES,
                 sample_rate: int = SAMPLE_RATE, f_min: float = 30.0, f_max: Optional[float] = None):
        super().__init__()
        self.n_fft, self.hop_length, self.frames = n_fft, hop_length, frames
        # Derived from the arguments, so not part of the state_dict; float64, cast to the input's dtype.
        self.register_buffer("window", torch.hann_window(n_fft, dtype=torch.float64), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(waveform, self.n_fft, self.hop_length, window=self.window.to(waveform.dtype),
                              center=True, pad_mode="reflect", return_complex=True)
        # [B, frames, n_fft // 2 + 1] (stft's memory is frame-major); re^2 + im^2 costs a third of abs().square()
        spectrum = spectrum.transpose(1, 2)[:, :self.frames]
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.log(power @ self.filterbank.to(power.dtype) + LOG_FLOOR)


class WaveformAugment(nn.Module):
    """Training only: each example's onset delayed by up to ``max_delay`` samples (silence before it, the end
    dropped); then, with probability ``probability`` each, a synthetic room added (the note convolved with
    exponentially decaying white noise of a reverberation time uniform in ``[0.1, max(0.1, reverb_seconds)]``,
    added at a wet gain uniform in ``[0, 1]``: sample libraries are recorded in rooms of their own) and white noise
    at a signal-to-noise ratio drawn uniformly from ``noise_snr`` dB (relative to the example's own RMS)."""

    def __init__(self, max_delay: int = 0, noise_snr: Optional[Sequence[float]] = None,
                 probability: float = 0.5, reverb_seconds: float = 0.0):
        super().__init__()
        self.max_delay = int(max_delay)
        self.noise_snr = None if noise_snr is None else tuple(float(v) for v in noise_snr)
        self.probability = probability
        self.reverb_seconds = float(reverb_seconds)

    def _chosen(self, batch: int, device) -> torch.Tensor:
        """Indices of the examples that one augmentation applies to."""
        return (torch.rand(batch, device=device) < self.probability).nonzero().flatten()

    def _reverberate(self, waveform: torch.Tensor) -> torch.Tensor:
        batch, samples = waveform.shape
        device, dtype = waveform.device, waveform.dtype
        chosen = self._chosen(batch, device)
        longest = max(self.reverb_seconds, 0.1)
        length = round(longest * SAMPLE_RATE)
        rt60 = 0.1 + (longest - 0.1) * torch.rand(len(chosen), 1, device=device, dtype=dtype)
        time = torch.arange(length, device=device, dtype=dtype) / SAMPLE_RATE
        # -60 dB of amplitude after rt60 seconds: exp(-ln(1000) t / rt60)
        response = torch.randn(len(chosen), length, device=device, dtype=dtype) * torch.exp(
            -math.log(1000.0) * time / rt60)
        response = response / response.square().sum(dim=1, keepdim=True).sqrt()
        size = 1 << (samples + length - 2).bit_length()
        wet = torch.fft.irfft(torch.fft.rfft(waveform[chosen], size) * torch.fft.rfft(response, size),
                              size)[:, :samples]
        gain = torch.rand(len(chosen), 1, device=device, dtype=dtype)
        return waveform.index_add(0, chosen, gain * wet)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return waveform
        batch, samples = waveform.shape
        if self.max_delay:
            delays = torch.randint(0, self.max_delay + 1, (batch,), device=waveform.device)
            # Row b of the padded signal's sliding windows, from offset max_delay - delay: one contiguous copy per
            # example instead of a per-sample gather.
            windows = torch.nn.functional.pad(waveform, (self.max_delay, 0)).unfold(1, samples, 1)
            waveform = windows[torch.arange(batch, device=waveform.device), self.max_delay - delays]
        if self.reverb_seconds:
            waveform = self._reverberate(waveform)
        if self.noise_snr is not None:
            low, high = self.noise_snr
            snr_db = low + (high - low) * torch.rand(batch, 1, device=waveform.device)
            noisy = self._chosen(batch, waveform.device)
            rms = waveform[noisy].square().mean(dim=1, keepdim=True).sqrt()
            noise = rms * 10.0 ** (-snr_db[noisy] / 20) * torch.randn(len(noisy), samples, device=waveform.device,
                                                                     dtype=waveform.dtype)
            waveform = waveform.index_add(0, noisy, noise)
        return waveform


class SpecAugment(nn.Module):
    """Training only: per example, the features shifted along the feature (frequency) axis by a random whole
    number of bands in ``[-freq_shift, freq_shift]`` (what slides off is dropped, what comes in is zero; a shift of
    mel bands is a pitch and formant shift), then ``freq_masks`` bands of up to ``freq_width`` features and
    ``time_masks`` spans of up to ``time_width`` frames set to zero (Park et al., 2019). The features are
    standardised, so zero is their mean."""

    def __init__(self, freq_masks: int = 0, freq_width: int = 8, time_masks: int = 0, time_width: int = 10,
                 freq_shift: int = 0):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.freq_shift = freq_shift

    @staticmethod
    def _masks(batch: int, length: int, count: int, width: int, device) -> torch.Tensor:
        """``[B, length]`` True where one of ``count`` random spans of 0..width positions covers."""
        widths = torch.randint(0, width + 1, (batch, count, 1), device=device)
        starts = (torch.rand(batch, count, 1, device=device) * (length - widths + 1)).long()
        position = torch.arange(length, device=device)
        return ((position >= starts) & (position < starts + widths)).any(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or not (self.freq_masks or self.time_masks or self.freq_shift):
            return features
        batch, steps, size = features.shape
        if self.freq_shift:
            shifts = torch.randint(-self.freq_shift, self.freq_shift + 1, (batch, 1, 1), device=features.device)
            source = torch.arange(size, device=features.device) - shifts
            inside = (source >= 0) & (source < size)
            features = torch.where(inside, features.gather(2, source.clamp(0, size - 1).expand(batch, steps, size)),
                                   0.0)
        masked = torch.zeros(batch, steps, size, dtype=torch.bool, device=features.device)
        if self.freq_masks:
            masked |= self._masks(batch, size, self.freq_masks, self.freq_width, features.device)[:, None, :]
        if self.time_masks:
            masked |= self._masks(batch, steps, self.time_masks, self.time_width, features.device)[:, :, None]
        return features.masked_fill(masked, 0.0)


class RandomEQ(nn.Module):
    """Training only: each example's log-mel power plus a random smooth curve over the bands, constant in time: an
    equaliser of up to ``max_db`` dB boost or cut. Two sample libraries of one instrument differ most in such a
    static tonal balance (microphones, filters, the sampled instrument itself), which a model trained on a few
    libraries would otherwise learn as part of the family. The curve is a random mix of the first ``terms``
    cosines over the bands, scaled so that its largest magnitude is uniform in ``[0, max_db]``."""

    def __init__(self, max_db: float = 0.0, terms: int = 3):
        super().__init__()
        self.max_db, self.terms = float(max_db), terms

    def forward(self, log_power: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.max_db:
            return log_power
        batch, _, bands = log_power.shape
        device, dtype = log_power.device, log_power.dtype
        order = torch.arange(1, self.terms + 1, device=device, dtype=dtype)
        position = torch.linspace(0.0, 1.0, bands, device=device, dtype=dtype)
        basis = torch.cos(torch.pi * order[:, None] * position)               # [terms, bands]
        curve = torch.randn(batch, self.terms, device=device, dtype=dtype) @ basis
        peak = curve.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        gain_db = self.max_db * torch.rand(batch, 1, device=device, dtype=dtype) * curve / peak
        return log_power + (gain_db * (math.log(10.0) / 10.0))[:, None, :]  # dB of power -> natural log


class FrontEnd(nn.Module):
    """``[B, FRAMES, FRAME_SIZE]`` frames of the first second -> ``[B, FRAMES, output_size]`` LSTM inputs.

    In order: :class:`WaveformAugment` (training only), :func:`normalise_loudness` (``loudness=True``), then either
    the frames themselves (``kind="frames"``, the seed report's input) or :class:`LogMel` followed by a batch norm
    over the mel bands (``kind="logmel"``, with :class:`RandomEQ` in training before the norm), then
    :class:`SpecAugment` (training only). With the defaults this is
    the identity.
    """

    def __init__(self, kind: str = "frames", loudness: bool = False, n_mels: int = 64, max_delay: float = 0.0,
                 noise_snr: Optional[Sequence[float]] = None, freq_masks: int = 0, freq_width: int = 8,
                 time_masks: int = 0, time_width: int = 10, freq_shift: int = 0, eq_db: float = 0.0,
                 reverb: float = 0.0):
        super().__init__()
        if kind not in FRONT_ENDS:
            raise ValueError(f"unknown front end {kind!r}; expected one of {', '.join(FRONT_ENDS)}")
        if eq_db and kind != "logmel":
            raise ValueError("eq_db (random equalisation) acts on mel bands and needs kind='logmel'")
        self.kind, self.loudness = kind, loudness
        self.augment = WaveformAugment(round(max_delay * SAMPLE_RATE), noise_snr, reverb_seconds=reverb)
        if kind == "logmel":
            self.logmel = LogMel(n_mels)
            self.norm = nn.BatchNorm1d(n_mels)
            self.equalise = RandomEQ(eq_db)
        self.output_size = n_mels if kind == "logmel" else FRAME_SIZE
        self.spec_augment = SpecAugment(freq_masks, freq_width, time_masks, time_width, freq_shift)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch = frames.shape[0]
        waveform = self.augment(frames.reshape(batch, -1))
        if self.loudness:
            waveform = normalise_loudness(waveform)
        if self.kind == "frames":
            features = waveform.reshape(batch, FRAMES, FRAME_SIZE)
        else:
            features = self.norm(self.equalise(self.logmel(waveform)).transpose(1, 2)).transpose(1, 2)
        return self.spec_augment(features)

