"""Reading any audio file as the clip the classifier reads (rnn_fast.nsynth.audio_files): every format, width, rate
and channel count against the same note at 16 kHz mono 16-bit, the resampler against known sines, and the
reasons given for files that cannot be read."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from rnn_fast.nsynth.audio_files import CLIP_SECONDS, AudioFileError, read_clip, resample, short_clip_warning
from rnn_fast.nsynth.data import CLIP_SAMPLES, SAMPLE_RATE

from . import FORMATS, write_note, write_raw_wav

INT16_STEP = 1 / 32768


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("frequency", [440, 3000])
def test_resampling_a_sine_gives_the_sine_at_16khz(rate, frequency):
    """Away from the first and last 10 ms (where the sine starts and stops abruptly, which no band-limited
    resampler can follow), within 1e-4 of the sine sampled at 16 kHz: soxr's high quality does 3e-5 or better."""
    seconds = np.arange(rate) / rate
    resampled = resample(np.sin(2 * np.pi * frequency * seconds).astype(np.float32), rate)
    expected = np.sin(2 * np.pi * frequency * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    assert resampled.dtype == np.float32 and resampled.shape == (SAMPLE_RATE,)
    np.testing.assert_allclose(resampled[160:-160], expected[160:-160], atol=1e-4)


def test_a_longer_file_is_resampled_as_a_whole_up_to_the_clips_last_sample(tmp_path):
    """The reader reads a little past the clip: a file cut at one second would ring at its end in the resampler."""
    seconds = np.arange(2 * 44100) / 44100
    soundfile.write(tmp_path / "sine.wav", 0.5 * np.sin(2 * np.pi * 1000 * seconds), 44100, subtype="FLOAT")
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(CLIP_SAMPLES) / SAMPLE_RATE)
    np.testing.assert_allclose(read_clip(tmp_path / "sine.wav").samples[160:], expected[160:], atol=1e-4)


def test_16khz_audio_is_not_resampled():
    samples = np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32)
    assert resample(samples, SAMPLE_RATE) is samples


# How far from the 16 kHz mono 16-bit note each format's clip may be: a step of 16-bit PCM where only the width
# differs, the resampler's tolerance where the rate does.
TOLERANCES = {
    "44.1 kHz stereo 16-bit WAV": 1e-3,
    "24-bit WAV": 2 * INT16_STEP,
    "32-bit WAV": 2 * INT16_STEP,
    "8-bit WAV": 1 / 128,
    "float WAV": 2 * INT16_STEP,
    "FLAC": 2 * INT16_STEP,
    "48 kHz 5.1 24-bit FLAC": 1e-3,
    "22.05 kHz mono AIFF": 1e-3,
    "OGG Vorbis": 0.1,  # lossy: close in shape only, which the correlation checks
}


@pytest.mark.parametrize("variant", list(FORMATS))
def test_every_format_reads_as_the_16khz_mono_note(variant, tmp_path):
    file_format, subtype, rate, channels = FORMATS[variant]
    tolerance = TOLERANCES[variant]
    reference = read_clip(write_note(tmp_path / "reference.wav"))
    clip = read_clip(write_note(tmp_path / f"note.{file_format.lower()}", file_format, subtype, rate, channels))
    assert clip.samples.dtype == np.float32 and clip.samples.shape == (CLIP_SAMPLES,)
    assert clip.seconds == pytest.approx(1.2, abs=1 / rate)
    np.testing.assert_allclose(clip.samples, reference.samples, atol=tolerance)
    assert np.corrcoef(clip.samples, reference.samples)[0, 1] > 0.99


def test_a_16khz_mono_16bit_file_reads_exactly_as_the_data_sets_reader_scales_it(tmp_path):
    """The data set's notes reach the model as int16 / 32768; the tolerant reader gives them the same values."""
    samples = np.random.default_rng(0).integers(-32768, 32768, CLIP_SAMPLES, dtype=np.int16)
    soundfile.write(tmp_path / "note.wav", samples, SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_array_equal(read_clip(tmp_path / "note.wav").samples, samples * np.float32(INT16_STEP))


def test_a_short_file_is_padded_with_silence_and_warned_about(tmp_path):
    clip = read_clip(write_note(tmp_path / "short.wav", rate=44100, channels=2, seconds=0.05))
    assert clip.seconds == pytest.approx(0.05)
    assert np.abs(clip.samples[:700]).max() > 0.1 and not clip.samples[900:].any()
    assert short_clip_warning(clip.seconds) == ("only 0.05 s of audio; the model reads 1 s, so 95% of what it saw "
                                                "is padded silence")
    assert short_clip_warning(CLIP_SECONDS) is None


@pytest.mark.parametrize("make,reason", [
    (lambda path: path.write_text("not audio\n"), "not a readable audio file (format not recognised)"),
    (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    (lambda path: write_raw_wav(path, 0, rate=44100, channels=2), "holds no audio (0 samples)"),
    (lambda path: None, "no such file or directory"),
    (lambda path: path.mkdir(), "is a directory"),
])
def test_unreadable_files_say_why(make, reason, tmp_path):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioFileError) as caught:
        read_clip(path)
    assert (caught.value.path, caught.value.reason) == (str(path), reason)
    assert str(caught.value) == f"{path}: {reason}"


def test_the_library_and_the_training_command_load_no_audio_package():
    """soundfile and soxr are the predictor's: ``import rnn_fast`` and the classifier's command lines load them
    only when a file is read."""
    script = ("import sys, rnn_fast, rnn_fast.nsynth.cli; "
              "print(sorted({'soundfile', 'soxr', 'scipy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]"]
