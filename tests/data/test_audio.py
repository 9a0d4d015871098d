"""Audio data: μ-law round trip, spoken-digit synthesis, piano rendering, the two tasks."""

import importlib.util
import shutil

import numpy as np
import pytest

from mamba_jax.data import audio, audio_synth, mulaw, sources

needs_espeak = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")),
    reason=f"espeak-ng / sox missing: `{audio_synth.ESPEAK_INSTALL}` (or scripts/setup_data.sh)")
needs_piano = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("music21", "tinysoundfont", "pretty_midi")),
    reason=f"music21 / tinysoundfont / pretty_midi missing: `{audio_synth.PIANO_INSTALL}` "
           f"(or scripts/setup_data.sh)")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "audio_cache"))


def test_mulaw_hand_values():
  # x = 0 -> F = 0 -> q = floor(0.5 · 255 + 0.5) = 128; x = ±1 -> F = ±1 -> q = 255 / 0.
  np.testing.assert_array_equal(mulaw.mulaw_encode(np.array([0.0, 1.0, -1.0, 2.0])),
                                [128, 255, 0, 255])
  # q = 255 -> y = 1 -> x = (256 − 1) / 255 = 1.
  np.testing.assert_allclose(mulaw.mulaw_decode(np.array([255, 0])), [1.0, -1.0], rtol=1e-6)


def test_mulaw_round_trip():
  codes = np.arange(256)
  np.testing.assert_array_equal(mulaw.mulaw_encode(mulaw.mulaw_decode(codes)), codes)
  x = np.random.default_rng(0).uniform(-1, 1, 10_000)
  back = mulaw.mulaw_decode(mulaw.mulaw_encode(x))
  companded = lambda v: np.sign(v) * np.log1p(255 * np.abs(v)) / np.log1p(255)
  # Within half a quantisation step (1/255 in the companded domain), plus float32 rounding.
  assert np.max(np.abs(companded(back) - companded(x))) <= 1 / 255 + 1e-6
  # Small amplitudes are kept far finer than large ones (the point of μ-law): half a step
  # at |x| = 0.01 is (1/255) · ln(256)/255 · (1 + 255 · 0.01) ≈ 3.0e-4.
  small = np.max(np.abs(back - x)[np.abs(x) < 0.01])
  assert small < 3.1e-4 and 10 * small < np.max(np.abs(back - x)[np.abs(x) > 0.5])
  with pytest.raises(ValueError, match="codes"):
    mulaw.mulaw_decode(np.array([256]))
  assert audio.mulaw_encode is mulaw.mulaw_encode


def test_missing_sources_name_the_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install -y foo"):
    sources.require_file(str(tmp_path / "nope"), "apt-get install -y foo")
  with pytest.raises(FileNotFoundError, match="apt-get install -y bar"):
    sources.require_executable("surely-not-a-program-xyz", "apt-get install -y bar")
  with pytest.raises(FileNotFoundError, match="pip install baz"):
    sources.require_package_dir("surely_not_a_package_xyz", "pip install baz")


def test_cached_arrays_build_once(tmp_path, monkeypatch):
  monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path))
  calls = []
  build = lambda: calls.append(1) or {"x": np.arange(3)}
  key = sources.cache_key(a=1)
  for _ in range(2):
    np.testing.assert_array_equal(sources.cached_arrays("t", key, build)["x"], [0, 1, 2])
  assert len(calls) == 1 and sources.cache_key(a=2) != key
  # Stamped with the tools' versions: rebuilt when a tool present here has another version,
  # read as it is when the tool is absent here (no entry for it).
  sources.cached_arrays("v", key, build, {"tool": "1.0"})
  sources.cached_arrays("v", key, build, {})
  sources.cached_arrays("v", key, build, {"tool": "1.0", "other": "3"})
  assert len(calls) == 2
  sources.cached_arrays("v", key, build, {"tool": "2.0"})
  assert len(calls) == 3


@needs_espeak
def test_spoken_digits_are_cached_one_second_clips():
  codes, digits, speakers = audio_synth.spoken_digits(12, sample_rate=8000, seed=5)
  assert codes.shape == (12, 8000) and codes.dtype == np.uint8
  np.testing.assert_array_equal(digits, np.arange(12) % 10)
  wave = mulaw.mulaw_decode(codes)
  voiced = np.mean(np.abs(wave) > 0.01, axis=1)
  assert np.all(voiced > 0.05) and np.all(voiced < 0.95)  # a word in silence
  again = audio_synth.spoken_digits(12, sample_rate=8000, seed=5)
  np.testing.assert_array_equal(again[0], codes)
  assert np.all(speakers < len(audio_synth.speakers(("espeak-ng",))))


@needs_espeak
def test_spoken_digit_task_splits_speakers():
  fields = dict(length=4000, num_clips=40, sample_rate=8000, test_fraction=0.3)
  train = audio.SpokenDigits(split="train", **fields)
  test = audio.SpokenDigits(split="test", **fields)
  _, _, speakers = train._clips
  assert not set(speakers[train.clip_indices]) & set(speakers[test.clip_indices])
  assert len(train.clip_indices) + len(test.clip_indices) == 40
  record = test[3]
  assert record["inputs"][0] == audio.BOS and record["inputs"].shape == (4000,)
  np.testing.assert_array_equal(record["inputs"][1:], record["targets"][:-1])
  assert record["mask"].all() and 0 <= record["digit"][0] < 10
  with pytest.raises(ValueError, match="length"):
    audio.SpokenDigits(length=9000, sample_rate=8000, num_clips=40)


@needs_piano
def test_piano_rendering_of_one_chorale():
  path = audio_synth.piano_score_paths()[0]
  assert "bach" in path
  notes = audio_synth.score_notes(path)
  assert notes.shape[1] == 4 and np.all(notes[:, 1] > notes[:, 0])
  assert np.all((notes[:, 2] >= 21) & (notes[:, 2] <= 108))  # piano keys
  codes = audio_synth.piano_piece(path, sample_rate=8000, max_seconds=4.0)
  assert codes.dtype == np.uint8 and codes.shape == (32_000,)
  wave = mulaw.mulaw_decode(codes)
  # Peak-normalised to PEAK, up to half a μ-law step there (≈ 2.2 % of the amplitude).
  assert audio_synth.PEAK * 0.97 < np.max(np.abs(wave)) <= audio_synth.PEAK * 1.025
  assert np.std(wave[8000:]) > 0.01  # sounding, not silence


@needs_piano
def test_piano_task_windows(monkeypatch):
  rendered = [np.arange(100 + 50 * i, dtype=np.uint8) for i in range(4)]
  monkeypatch.setattr(audio_synth, "piano_pieces", lambda n, **_: rendered[:n])
  audio._piano_split.cache_clear()
  train = audio.PianoWaveform(length=64, num_pieces=4, test_fraction=0.25, seed=1)
  test = audio.PianoWaveform(length=64, split="test", num_pieces=4, test_fraction=0.25)
  assert len(train.pieces) == 3 and len(test.pieces) == 1
  train_lengths = {len(p) for p in train.pieces}
  assert len(test.pieces[0]) not in train_lengths  # held-out piece
  record = train[7]
  np.testing.assert_array_equal(record["inputs"][1:], record["targets"][:-1])
  np.testing.assert_array_equal(np.diff(record["inputs"]), 1)  # a contiguous window
  assert set(train.loss_metrics(np.log(2.0))) == {"bits_per_sample"}
  audio._piano_split.cache_clear()
