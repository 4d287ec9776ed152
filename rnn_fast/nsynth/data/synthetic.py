"""A deterministic, numpy-only stand-in for NSynth, written in the official jsonwav layout.

Every family has its own voice: a spectrum (harmonic tilt, odd harmonics, drawbars, formants, a pulse, an
inharmonic bar), an envelope (attack, decay, sustain, release), brightness that fades or grows, breath or bow
noise, an onset click, vibrato and tremolo. Each instrument perturbs its family's voice (tilt, per-harmonic
levels and phases, times, noise, vibrato, pitch window, pluck position or vowel), its source colours it
(acoustic: more noise; electronic: saturation; synthetic: clean), and each note draws its pitch, velocity,
a slight detune and fresh noise. So a family is learnable from the first second, yet no two notes are alike
and an unseen instrument is a real test. Test and valid instruments are disjoint from train (and from each
other), and synth_lead appears in train only, as in the official release.
"""
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write, write_json
from .cache import prepare
from .families import (CLASSES, FAMILIES, NOTE_SAMPLES, QUALITIES, SAMPLE_RATE, SOURCES, SPLITS, make_instrument_str,
                       make_note_str)
from .jsonwav import PathLike, audio_dir, examples_path, read_json_or_none, split_path, write_wav

GENERATOR_VERSION = 1
NOTES_PER_INSTRUMENT = 16
VELOCITIES = (25, 50, 75, 100, 127)
PITCH_WINDOW = 18  # semitones one instrument spans (fewer where its family's range is narrower)
# Instrument numbers per split, disjoint so that valid and test hold only unseen instruments.
INSTRUMENT_NUMBERS = {"train": range(0, 800), "valid": range(800, 900), "test": range(900, 1000)}
BUILTIN_SIZES = {"n_train": 3000, "n_valid": 500, "n_test": 500}
SIGNATURE_FILE = "synthetic.json"

_TABLE_SIZE = 4096  # a power of two, so a phase wraps with a bit mask
_TOP_FREQUENCY = 7000.0  # harmonics stay below Nyquist (8 kHz) with a margin, so nothing aliases
_MAX_HARMONICS = 256     # enough for the lowest MIDI pitch (27.5 Hz) up to _TOP_FREQUENCY
_NOTE_OFF = 3.0          # NSynth holds every note for 3 s and records 1 s of release
_TIME = np.arange(NOTE_SAMPLES, dtype=np.float64) / SAMPLE_RATE
_TIME32 = _TIME.astype(np.float32)
_NOISE_GAIN = {"acoustic": 1.5, "electronic": 0.7, "synthetic": 0.2}
_ELECTRONIC_DRIVE = 2.5
_VOWEL_FORMANTS = ((800, 1150, 2900), (400, 1600, 2700), (350, 2300, 3000), (450, 800, 2830), (325, 700, 2530))
_BAR_RATIOS = (1.0, 3.93, 9.54)  # a tuned marimba bar's first three modes


@dataclasses.dataclass(frozen=True)
class Voice:
    """A family's sound; times in seconds, levels relative to the tone."""
    pitches: Tuple[int, int]
    spectrum: str           # harmonic | odd | pluck | drawbar | flute | pulse | formant | bar
    tilt: float             # harmonic k has amplitude k ** -tilt (before the spectrum's own shaping)
    attack: float
    decay: float
    sustain: float          # level the decay settles at
    release: float = 0.1
    long_decay: float = math.inf  # a second, slower decay (a piano's)
    dulling: float = 0.0    # 1/s: how fast the bright spectrum fades into the dull one
    brightening: float = 0.0  # s: a dull onset that opens up (brass)
    noise: float = 0.0      # breath or bow noise
    click: float = 0.0      # onset noise burst (pluck, hammer, mallet)
    vibrato: float = 0.0    # depth as a fraction of f0
    tremolo: float = 0.0    # amplitude modulation depth


VOICES: Dict[str, Voice] = {
    "bass": Voice((28, 55), "harmonic", tilt=1.6, attack=0.004, decay=0.6, sustain=0.25, dulling=3.0, click=0.3),
    "brass": Voice((45, 77), "harmonic", tilt=0.7, attack=0.05, decay=0.6, sustain=0.8, brightening=0.12,
                   noise=0.03, vibrato=0.004),
    "flute": Voice((60, 96), "flute", tilt=1.0, attack=0.09, decay=1.0, sustain=0.9, noise=0.35, vibrato=0.006,
                   tremolo=0.08),
    "guitar": Voice((40, 80), "pluck", tilt=1.0, attack=0.002, decay=0.5, sustain=0.0, dulling=4.0, click=0.5),
    "keyboard": Voice((33, 96), "harmonic", tilt=1.3, attack=0.003, decay=0.15, sustain=0.35, release=0.4,
                      long_decay=2.5, dulling=1.5, click=0.4),
    "mallet": Voice((60, 96), "bar", tilt=1.0, attack=0.001, decay=0.2, sustain=0.0, dulling=6.0, click=0.8),
    "organ": Voice((36, 84), "drawbar", tilt=0.0, attack=0.004, decay=1.0, sustain=1.0, release=0.05),
    "reed": Voice((50, 84), "odd", tilt=1.0, attack=0.035, decay=0.3, sustain=0.85, noise=0.06, vibrato=0.002),
    "string": Voice((40, 90), "harmonic", tilt=1.0, attack=0.22, decay=1.0, sustain=1.0, release=0.3, noise=0.08,
                    vibrato=0.009),
    "synth_lead": Voice((48, 84), "pulse", tilt=1.0, attack=0.01, decay=0.3, sustain=0.9),
    "vocal": Voice((45, 79), "formant", tilt=0.5, attack=0.07, decay=1.0, sustain=0.95, noise=0.05, vibrato=0.012),
}


@dataclasses.dataclass(frozen=True)
class Instrument:
    """One instrument: its family's voice perturbed, plus what stays fixed across its notes."""
    family: str
    source: str
    number: int
    voice: Voice
    harmonic_gains: np.ndarray  # per-harmonic level jitter, the instrument's timbre signature
    harmonic_phases: np.ndarray
    vibrato_rate: float
    shape: float                # pluck position (pluck), pulse duty (pulse) or vowel index (formant)
    gain: float
    notes: Tuple[Tuple[int, int], ...]  # (pitch, velocity) of each of its notes

    @property
    def id(self) -> int:
        return (FAMILIES.index(self.family) * len(SOURCES) + SOURCES.index(self.source)) * 1000 + self.number

    @property
    def name(self) -> str:
        return make_instrument_str(self.family, self.source, self.number)

    def qualities(self) -> List[int]:
        voice = self.voice
        present = {
            "bright": voice.tilt < 0.9, "dark": voice.tilt > 1.4, "distortion": self.source == "electronic",
            "fast_decay": voice.sustain < 0.3 and voice.decay < 0.3, "long_release": voice.release > 0.25,
            "nonlinear_env": voice.tremolo > 0 or voice.brightening > 0, "percussive": voice.click > 0.3,
        }
        return [int(present.get(name, False)) for name in QUALITIES]


def generate_synthetic(root: PathLike, n_train: int = BUILTIN_SIZES["n_train"],
                       n_valid: int = BUILTIN_SIZES["n_valid"], n_test: int = BUILTIN_SIZES["n_test"],
                       seed: int = 0, progress: bool = True) -> Path:
    """Write a synthetic NSynth under ``root`` (``root/nsynth-{train,valid,test}``) and return ``root``.

    Deterministic in ``(sizes, seed)``. Returns at once when ``root`` already holds this exact set; resumes an
    interrupted run; regenerates a set it wrote with other sizes or seed; refuses a directory holding a
    dataset it did not write. Train examples cycle over all 11 families, valid and test over the 10 classes.
    """
    root = Path(root)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for split, count in sizes.items():
        _check_size(split, count)
    signature = {"generator_version": GENERATOR_VERSION, "seed": seed, "sizes": sizes}
    found = read_json_or_none(root / SIGNATURE_FILE)
    if found == {**signature, "complete": True}:
        return root
    if found is None and any(split_path(root, split).exists() for split in SPLITS):
        raise FileExistsError(f"{root} holds nsynth-* directories that generate_synthetic did not write; "
                              "pass an empty or new directory")
    if found is not None and {**found, "complete": False} != {**signature, "complete": False}:
        for split in SPLITS:
            shutil.rmtree(split_path(root, split), ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / SIGNATURE_FILE, {**signature, "complete": False}, indent=None)
    for split, count in sizes.items():
        _write_split(split_path(root, split), split_plan(split, count, seed), seed, progress)
    write_json(root / SIGNATURE_FILE, {**signature, "complete": True}, indent=None)
    return root


def default_data_dir() -> Path:
    """``$RNN_FAST_DATA_DIR``, else ``~/.cache/rnn_fast``."""
    return Path(os.environ.get("RNN_FAST_DATA_DIR") or Path.home() / ".cache" / "rnn_fast")


def ensure_builtin_dataset(data_dir: Optional[PathLike] = None, progress: bool = True) -> Path:
    """Generate (once) the built-in synthetic NSynth and prepare (once) its cache; returns the cache directory.

    Sized (``BUILTIN_SIZES``) so that a 2-layer LSTM learns it within minutes on a CPU; a second call returns
    at once.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    root = generate_synthetic(data_dir / "nsynth-synthetic", **BUILTIN_SIZES, seed=0, progress=progress)
    return prepare(root, data_dir / "nsynth-synthetic-cache", progress=progress)


def split_plan(split: str, count: int, seed: int) -> List[Tuple[Instrument, int, int]]:
    """``(instrument, pitch, velocity)`` of every note of a split, in generation order."""
    families = FAMILIES if split == "train" else CLASSES
    first_number = INSTRUMENT_NUMBERS[split].start
    instruments: Dict[Tuple[str, str, int], Instrument] = {}
    plan = []
    for index in range(count):
        family = families[index % len(families)]
        per_family = index // len(families)
        source = SOURCES[per_family % len(SOURCES)]
        slot = per_family // len(SOURCES)
        key = (family, source, first_number + slot // NOTES_PER_INSTRUMENT)
        if key not in instruments:
            instruments[key] = make_instrument(*key, seed=seed)
        instrument = instruments[key]
        plan.append((instrument, *instrument.notes[slot % NOTES_PER_INSTRUMENT]))
    return plan


def make_instrument(family: str, source: str, number: int, seed: int) -> Instrument:
    rng = np.random.default_rng([seed, FAMILIES.index(family), SOURCES.index(source), number])
    base = VOICES[family]

    def jitter(value: float, spread: float = 0.25) -> float:
        return float(value * rng.lognormal(0.0, spread))

    voice = dataclasses.replace(
        base, tilt=base.tilt + float(rng.normal(0.0, 0.15)), attack=jitter(base.attack), decay=jitter(base.decay),
        sustain=base.sustain * float(rng.uniform(0.85, 1.0)), release=jitter(base.release),
        long_decay=jitter(base.long_decay), dulling=jitter(base.dulling), brightening=jitter(base.brightening),
        noise=jitter(base.noise * _NOISE_GAIN[source], 0.3), click=jitter(base.click, 0.3),
        vibrato=jitter(base.vibrato), tremolo=jitter(base.tremolo))
    low, high = base.pitches
    window = min(PITCH_WINDOW, high - low)
    lowest = int(rng.integers(low, high - window + 1))
    pairs = [(pitch, velocity) for pitch in range(lowest, lowest + window + 1) for velocity in VELOCITIES]
    chosen = rng.permutation(len(pairs))[:NOTES_PER_INSTRUMENT]
    shape = 0.0
    if base.spectrum == "pluck":
        shape = rng.uniform(0.08, 0.3)
    elif base.spectrum == "pulse":
        shape = rng.uniform(0.15, 0.45)
    elif base.spectrum == "formant":
        shape = rng.integers(len(_VOWEL_FORMANTS))
    return Instrument(
        family=family, source=source, number=number, voice=voice,
        harmonic_gains=rng.lognormal(0.0, 0.2, _MAX_HARMONICS),
        harmonic_phases=rng.uniform(0, 2 * np.pi, _MAX_HARMONICS),
        vibrato_rate=float(rng.uniform(4.5, 6.5)), shape=float(shape), gain=float(rng.uniform(0.9, 1.0)),
        notes=tuple(pairs[i] for i in sorted(chosen)))


def render_note(instrument: Instrument, pitch: int, velocity: int, seed: int) -> np.ndarray:
    """The 4 s int16 waveform of one note."""
    voice = instrument.voice
    rng = np.random.default_rng([seed, instrument.id, pitch, velocity, 1])
    loudness = velocity / 127
    f0 = 440.0 * 2 ** ((pitch - 69) / 12) * (1 + rng.normal(0.0, 0.001))
    if voice.vibrato > 0:
        wobble = voice.vibrato * np.sin(2 * np.pi * instrument.vibrato_rate * _TIME32 + rng.uniform(0, 2 * np.pi))
        cycles = np.cumsum(f0 * (1 + wobble)) / SAMPLE_RATE
    else:
        cycles = f0 * _TIME
    tilt = voice.tilt - 0.4 * (loudness - 0.5)  # louder notes are brighter
    tone = (_bar(instrument, cycles, f0, tilt) if voice.spectrum == "bar"
            else _wavetable_tone(instrument, cycles, f0, tilt))
    envelope = _envelope(voice, instrument.vibrato_rate)
    tone *= envelope
    click = voice.click * (0.5 + loudness) * np.exp(-_TIME32 / 0.008)
    tone += rng.standard_normal(NOTE_SAMPLES, dtype=np.float32) * (voice.noise * envelope + click)
    if instrument.source == "electronic":
        tone = np.tanh(_ELECTRONIC_DRIVE * tone / np.abs(tone).max())
    # Loud throughout (velocity mostly changes brightness): quiet raw input slows an LSTM down a lot.
    peak = (0.6 + 0.35 * loudness) * instrument.gain
    return np.round(tone * (peak * 32767 / np.abs(tone).max())).astype(np.int16)


def _wavetable_tone(instrument: Instrument, cycles: np.ndarray, f0: float, tilt: float) -> np.ndarray:
    """A periodic tone read from two one-cycle tables, crossfading between a bright and a dull one."""
    voice = instrument.voice
    count = min(int(_TOP_FREQUENCY // f0), _MAX_HARMONICS)
    k = np.arange(1, count + 1, dtype=np.float64)
    amplitudes = _spectrum(voice.spectrum, k, f0, tilt, instrument.shape) * instrument.harmonic_gains[:count]
    bright = _one_cycle(amplitudes, instrument.harmonic_phases[:count])
    dull = _one_cycle(amplitudes * np.exp(-0.6 * (k - 1)), instrument.harmonic_phases[:count])
    # Nearest-sample lookup: with this table size the phase error stays far below the added noise.
    index = (cycles * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1)
    bright_wave = bright[index]
    dull_wave = dull[index]
    if voice.brightening > 0:
        brightness = 1 - np.exp(-_TIME32 / voice.brightening)
    else:
        brightness = np.exp(-_TIME32 * voice.dulling)
    return dull_wave + brightness * (bright_wave - dull_wave)


def _spectrum(kind: str, k: np.ndarray, f0: float, tilt: float, shape: float) -> np.ndarray:
    falloff = k ** -tilt
    if kind == "harmonic":
        return falloff
    if kind == "odd":
        return falloff * np.where(k % 2 == 1, 1.0, 0.08)
    if kind == "pluck":  # plucking at a fraction `shape` of the string silences harmonics near 1/shape
        return falloff * np.abs(np.sin(np.pi * k * shape))
    if kind == "pulse":
        return np.abs(np.sin(np.pi * k * shape)) / k
    if kind == "flute":  # nearly a sine
        levels = np.zeros_like(k)
        levels[:4] = (1.0, 0.25, 0.08, 0.03)[:len(k)]
        return levels
    if kind == "drawbar":
        stops = {1: 1.0, 2: 0.8, 3: 0.6, 4: 0.45, 6: 0.35, 8: 0.25}
        return np.array([stops.get(int(h), 0.0) for h in k])
    if kind == "formant":
        frequencies = k * f0
        resonance = sum(np.exp(-0.5 * ((frequencies - formant) / 150.0) ** 2) / (n + 1)
                        for n, formant in enumerate(_VOWEL_FORMANTS[int(shape)]))
        return falloff * (0.03 + resonance)
    raise ValueError(f"unknown spectrum {kind!r}")


def _one_cycle(amplitudes: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """``sum_k a_k sin(2 pi k x + phase_k)`` over one cycle."""
    coefficients = np.zeros(_TABLE_SIZE // 2 + 1, dtype=np.complex128)
    coefficients[1:len(amplitudes) + 1] = amplitudes * np.exp(1j * (phases - np.pi / 2)) * (_TABLE_SIZE / 2)
    return np.fft.irfft(coefficients, n=_TABLE_SIZE).astype(np.float32)


def _bar(instrument: Instrument, cycles: np.ndarray, f0: float, tilt: float) -> np.ndarray:
    """Inharmonic modes of a struck bar; higher modes die faster."""
    tone = np.zeros(NOTE_SAMPLES, dtype=np.float32)
    for mode, ratio in enumerate(_BAR_RATIOS):
        if ratio * f0 >= _TOP_FREQUENCY:
            break
        level = ratio ** -tilt * instrument.harmonic_gains[mode]
        decay = np.exp(-_TIME32 * (instrument.voice.dulling * mode))
        phase = 2 * np.pi * ratio * cycles + instrument.harmonic_phases[mode]
        tone += (level * np.sin(phase)).astype(np.float32) * decay
    return tone


def _envelope(voice: Voice, tremolo_rate: float) -> np.ndarray:
    level = voice.sustain + (1 - voice.sustain) * np.exp(-_TIME32 / voice.decay)
    level *= 1 - np.exp(-_TIME32 / voice.attack)
    if math.isfinite(voice.long_decay):
        level *= np.exp(-_TIME32 / voice.long_decay)
    level *= np.exp(-np.maximum(_TIME32 - _NOTE_OFF, 0) / voice.release)
    if voice.tremolo > 0:
        level *= 1 + voice.tremolo * np.sin(2 * np.pi * tremolo_rate * _TIME32)
    return level


def _write_split(split_dir: Path, plan: List[Tuple[Instrument, int, int]], seed: int, progress: bool) -> None:
    if examples_path(split_dir).is_file():
        return
    wav_dir = audio_dir(split_dir)
    wav_dir.mkdir(parents=True, exist_ok=True)
    examples = {}
    for instrument, pitch, velocity in tqdm(plan, desc=f"synthesise {split_dir.name}", unit="wav",
                                            disable=not progress):
        note_str = make_note_str(instrument.family, instrument.source, instrument.number, pitch, velocity)
        examples[note_str] = _example(instrument, note_str, pitch, velocity)
        path = wav_dir / f"{note_str}.wav"
        if not path.exists():  # a finished file from an interrupted run of the same set
            samples = render_note(instrument, pitch, velocity, seed)
            with atomic_write(path) as handle:
                write_wav(handle, samples, SAMPLE_RATE)
    write_json(examples_path(split_dir), examples, indent=None)


def _example(instrument: Instrument, note_str: str, pitch: int, velocity: int) -> dict:
    qualities = instrument.qualities()
    return {
        "note_str": note_str,
        "note": instrument.id * 1000 + pitch * len(VELOCITIES) + VELOCITIES.index(velocity),
        "instrument": instrument.id,
        "instrument_str": instrument.name,
        "pitch": pitch,
        "velocity": velocity,
        "sample_rate": SAMPLE_RATE,
        "instrument_family": FAMILIES.index(instrument.family),
        "instrument_family_str": instrument.family,
        "instrument_source": SOURCES.index(instrument.source),
        "instrument_source_str": instrument.source,
        "qualities": qualities,
        "qualities_str": [name for name, present in zip(QUALITIES, qualities) if present],
    }


def _check_size(split: str, count: int) -> None:
    families = len(FAMILIES if split == "train" else CLASSES)
    capacity = len(INSTRUMENT_NUMBERS[split]) * NOTES_PER_INSTRUMENT * len(SOURCES) * families
    if not 1 <= count <= capacity:
        raise ValueError(f"n_{split} must be between 1 and {capacity}, got {count}")

