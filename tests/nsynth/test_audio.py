"""The classifier's front end and augmentation (rnn_fast.nsynth.audio): the mel filterbank against librosa's and the
log-mel spectrogram against a numpy reference written from its definition, shapes, loudness invariance,
augmentation that is deterministic under a seed in training mode and the identity in eval mode."""
import math

import librosa
import numpy as np
import pytest
import torch

from rnn_fast.nsynth.audio import (FrontEnd, LogMel, RandomEQ, SpecAugment, WaveformAugment, mel_filterbank,
                                   normalise_loudness)
from rnn_fast.nsynth.data import CLIP_SAMPLES, FRAME_SIZE, FRAMES, SAMPLE_RATE


@pytest.mark.parametrize("n_fft,n_mels,f_min,f_max", [(512, 64, 30.0, 8000.0), (1024, 40, 0.0, 8000.0),
                                                      (400, 23, 100.0, 5000.0)],
                         ids=["nfft512-mels64", "nfft1024-mels40", "nfft400-mels23-100to5000Hz"])
def test_mel_filterbank_matches_librosa(n_fft, n_mels, f_min, f_max):
    """librosa's HTK-scale triangles without normalisation are torchaudio's MelSpectrogram defaults, ours."""
    filters = mel_filterbank(n_fft, n_mels, SAMPLE_RATE, f_min, f_max)
    assert filters.shape == (n_fft // 2 + 1, n_mels) and filters.dtype == torch.float64
    expected = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=True,
                                   norm=None, dtype=np.float64)
    np.testing.assert_allclose(filters.numpy(), expected.T, atol=1e-12)


def test_mel_filterbank_refuses_empty_bands():
    with pytest.raises(ValueError, match="catch no bin"):
        mel_filterbank(256, 128, SAMPLE_RATE)
    with pytest.raises(ValueError, match="f_min < f_max"):
        mel_filterbank(512, 40, SAMPLE_RATE, f_min=9000.0)


def test_log_mel_matches_numpy_stft():
    """Frame t is the Hann-windowed n_fft samples centred on sample t * hop of the reflect-padded signal."""
    torch.manual_seed(0)
    waveform = torch.randn(3, CLIP_SAMPLES, dtype=torch.float64)
    logmel = LogMel(n_mels=40)
    actual = logmel(waveform)
    assert actual.shape == (3, FRAMES, 40) and actual.dtype == torch.float64
    padded = np.pad(waveform.numpy(), ((0, 0), (256, 256)), mode="reflect")
    window = np.hanning(513)[:512]  # periodic Hann, as torch.hann_window
    starts = np.arange(FRAMES) * FRAME_SIZE
    frames = padded[:, starts[:, None] + np.arange(512)] * window
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    expected = np.log(power @ logmel.filterbank.numpy() + 1e-6)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("frequency", [110.0, 440.0, 1000.0, 3520.0])
def test_log_mel_of_a_tone_peaks_in_the_band_around_its_frequency(frequency):
    logmel = LogMel()
    tone = torch.sin(2 * math.pi * frequency * torch.arange(CLIP_SAMPLES) / SAMPLE_RATE)
    band = int(logmel(tone[None])[0, 10:90].mean(dim=0).argmax())
    peak = logmel.filterbank[:, band]
    bins = torch.arange(len(peak)) * SAMPLE_RATE / logmel.n_fft
    covered = bins[peak > 0]
    assert covered.min() <= frequency <= covered.max(), (band, covered.min(), covered.max())


def test_normalise_loudness_gives_unit_rms_and_keeps_silence():
    waveform = torch.stack([0.001 * torch.randn(CLIP_SAMPLES), 0.5 * torch.randn(CLIP_SAMPLES),
                            torch.zeros(CLIP_SAMPLES)])
    normalised = normalise_loudness(waveform)
    rms = normalised.square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms[:2], torch.ones(2), rtol=1e-4, atol=0)
    assert torch.equal(normalised[2], torch.zeros(CLIP_SAMPLES))


def frames_batch(batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, FRAMES, FRAME_SIZE, generator=generator)


def test_front_end_defaults_are_the_identity():
    frames = frames_batch()
    front_end = FrontEnd().train()
    assert front_end.output_size == FRAME_SIZE
    assert torch.equal(front_end(frames), frames)


@pytest.mark.parametrize("kind,size", [("frames", FRAME_SIZE), ("logmel", 64)])
def test_front_end_is_invariant_to_gain_with_loudness_normalisation(kind, size):
    front_end = FrontEnd(kind, loudness=True).eval()
    frames = frames_batch()
    features = front_end(frames)
    assert features.shape == (4, FRAMES, size) and front_end.output_size == size
    torch.testing.assert_close(front_end(25.0 * frames), features, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(FrontEnd(kind).eval()(25.0 * frames), FrontEnd(kind).eval()(frames), atol=1e-2)


AUGMENTED = dict(kind="logmel", loudness=True, max_delay=0.05, noise_snr=(10.0, 30.0), freq_masks=2, time_masks=2,
                 freq_shift=2, eq_db=6.0, reverb=0.3)


def test_augmentation_is_deterministic_under_a_seed_and_off_in_eval_mode():
    front_end = FrontEnd(**AUGMENTED)
    frames = frames_batch()
    front_end.train()
    torch.manual_seed(7)
    first = front_end(frames)
    torch.manual_seed(7)
    again = front_end(frames)
    torch.manual_seed(8)
    other = front_end(frames)
    assert torch.equal(first, again) and not torch.allclose(first, other)

    front_end.eval()
    torch.manual_seed(1)
    evaluated = front_end(frames)
    torch.manual_seed(2)
    assert torch.equal(front_end(frames), evaluated)  # draws nothing: the same output whatever the generator
    plain = FrontEnd("logmel", loudness=True)
    plain.load_state_dict(front_end.state_dict())
    assert torch.equal(plain.eval()(frames), evaluated)


def test_waveform_delay_shifts_each_example_by_at_most_the_maximum():
    torch.manual_seed(0)
    waveform = torch.randn(16, CLIP_SAMPLES)
    delayed = WaveformAugment(max_delay=800).train()(waveform)
    delays = []
    for row, original in zip(delayed, waveform):
        delay = int((row != 0).nonzero()[0])
        assert delay <= 800
        assert torch.equal(row[delay:], original[:CLIP_SAMPLES - delay]) and not row[:delay].any()
        delays.append(delay)
    assert len(set(delays)) > 1


def test_waveform_noise_stays_within_the_snr_range_on_about_half_the_examples():
    torch.manual_seed(0)
    waveform = 0.2 * torch.randn(400, CLIP_SAMPLES)
    noisy = WaveformAugment(noise_snr=(10.0, 30.0)).train()(waveform)
    noise_power = (noisy - waveform).square().mean(dim=1)
    changed = noise_power > 0
    snr_db = 10 * torch.log10(waveform.square().mean(dim=1)[changed] / noise_power[changed])
    assert 0.4 < changed.float().mean() < 0.6
    assert snr_db.min() > 9.8 and snr_db.max() < 30.2 and snr_db.max() - snr_db.min() > 15


def test_waveform_reverb_adds_a_decaying_tail_on_about_half_the_examples():
    """An impulse comes back as itself plus a wet tail: nothing before it, and the tail's energy falls by 60 dB
    within at most the longest reverberation time."""
    torch.manual_seed(0)
    impulses = torch.zeros(400, CLIP_SAMPLES)
    impulses[:, 1000] = 1.0
    reverberant = WaveformAugment(reverb_seconds=0.4).train()(impulses)
    tails = reverberant - impulses
    changed = tails.abs().amax(dim=1) > 0
    assert 0.4 < changed.float().mean() < 0.6
    assert tails[:, :1000].abs().max() < 1e-5
    energy = tails[changed, 1000:].square()
    assert (energy.sum(dim=1) <= 1.0 + 1e-4).all()  # a unit-energy response at a wet gain of at most 1
    late = energy[:, round(0.4 * SAMPLE_RATE):].sum(dim=1) / energy.sum(dim=1)
    assert late.max() < 1e-5
    settled = ((energy.cumsum(dim=1) / energy.sum(dim=1, keepdim=True)) < 1 - 1e-3).sum(dim=1) / SAMPLE_RATE
    assert settled.max() - settled.min() > 0.05  # rooms of different sizes
    assert torch.equal(WaveformAugment(reverb_seconds=0.4).eval()(impulses), impulses)


def test_spec_augment_zeroes_bands_and_spans_within_their_widths():
    torch.manual_seed(0)
    features = torch.randn(32, FRAMES, 64) + 5.0  # no feature is zero before masking
    masked = SpecAugment(freq_masks=2, freq_width=8, time_masks=2, time_width=10).train()(features)
    zero = masked == 0
    assert torch.equal(masked[~zero], features[~zero])
    for example in zero:
        bands = example.all(dim=0)   # feature columns masked at every step
        spans = example.all(dim=1)   # steps masked in every feature
        assert torch.equal(example, bands[None, :] | spans[:, None])
        assert bands.sum() <= 16 and spans.sum() <= 20
    assert zero.any(dim=(1, 2)).float().mean() > 0.8
    assert torch.equal(SpecAugment(2, 8, 2, 10).eval()(features), features)


def test_spec_augment_shifts_each_example_by_at_most_the_maximum_number_of_bands():
    torch.manual_seed(0)
    features = torch.randn(32, FRAMES, 64) + 5.0
    shifted = SpecAugment(freq_shift=3).train()(features)
    shifts = []
    for row, original in zip(shifted, features):
        matches = [s for s in range(-3, 4)
                   if torch.equal(row[:, max(s, 0):64 + min(s, 0)], original[:, max(-s, 0):64 - max(s, 0)])]
        assert len(matches) == 1, matches
        shift = matches[0]
        vacated = row[:, :shift] if shift > 0 else row[:, 64 + shift:]
        assert not vacated.any()
        shifts.append(shift)
    assert set(shifts) == set(range(-3, 4))
    assert torch.equal(SpecAugment(freq_shift=3).eval()(features), features)


def test_random_eq_adds_one_smooth_curve_per_example_within_its_gain():
    torch.manual_seed(0)
    log_power = torch.randn(64, FRAMES, 64)
    curves = RandomEQ(max_db=6.0).train()(log_power) - log_power
    torch.testing.assert_close(curves, curves[:, :1].expand_as(curves), rtol=0, atol=1e-5)  # constant in time
    gain_db = curves[:, 0] * 10.0 / math.log(10.0)
    assert gain_db.abs().max() <= 6.0 + 1e-4 and gain_db.abs().amax(dim=1).min() < 3.0
    # Smooth over the bands: each curve lies in the span of the first three cosines.
    basis = torch.cos(torch.pi * torch.arange(1, 4.0)[:, None] * torch.linspace(0, 1, 64))
    coefficients = torch.linalg.lstsq(basis.T, gain_db.T).solution
    torch.testing.assert_close(coefficients.T @ basis, gain_db, rtol=0, atol=1e-4)
    assert torch.equal(RandomEQ(max_db=6.0).eval()(log_power), log_power)
    assert torch.equal(RandomEQ().train()(log_power), log_power)


def test_random_eq_needs_the_log_mel_front_end():
    with pytest.raises(ValueError, match="needs kind='logmel'"):
        FrontEnd("frames", eq_db=3.0)
