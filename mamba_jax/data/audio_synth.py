"""Offline audio generation: spoken digits (espeak-ng, flite) and piano renderings (music21).

Nothing is downloaded. Results are 8-bit μ-law codes (:mod:`mamba_jax.data.mulaw`) cached on
disk (:func:`mamba_jax.data.sources.cached_arrays`) under a key of the engine versions and
every generation parameter, so a second call, or another process, reads them back.

Spoken digits (the SC09 stand-in, :func:`spoken_digits`): clip i says the word of digit
i mod 10 in the voice of one speaker drawn with (seed, i). A speaker is an engine voice:
espeak-ng's English accents × voice variants (``en-us+f3``, ``en-gb-scotland+m5``, ...) with
its own base pitch and speed, or one of flite's voices (``kal16``, ``awb``, ``rms``, ``slt``).
Each clip jitters the speaker's pitch and speed, takes a random gain, and is placed at a
random offset in one second of silence; 16 kHz (espeak-ng's 22,050 Hz resampled by sox).
Speakers, not clips, are what a train/test split holds out.

Piano (the YouTubeMix stand-in, :func:`piano_pieces`): scores bundled with music21 (Bach's
chorales, then Beethoven, Mozart and Haydn), every part played on General MIDI
piano (preset 0) of the SoundFont inside the pretty_midi wheel, synthesized by tinysoundfont
at a fixed 96 quarter notes per minute; mono (left and right averaged), peak-normalised to
0.9. Tied notes sound once. Scores music21 cannot parse are skipped.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import io
import os
import shutil
import subprocess
import wave
from typing import Sequence

from absl import logging
import numpy as np

from mamba_jax.data import sources
from mamba_jax.data.mulaw import mulaw_encode

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_INSTALL = "apt-get install -y --no-install-recommends espeak-ng sox"
FLITE_INSTALL = "apt-get install -y --no-install-recommends flite sox"
SOX_INSTALL = "apt-get install -y --no-install-recommends sox"
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
ENGINES = ("espeak-ng", "flite")

PIANO_COMPOSERS = ("bach", "beethoven", "mozart", "haydn")
PIANO_INSTALL = (".venv/bin/pip install music21 pretty_midi && "
                 ".venv/bin/pip install --no-deps tinysoundfont==0.3.7")
QUARTER_NOTES_PER_MINUTE = 96
PEAK = 0.9


def _version(program: list[str]) -> str:
  out = subprocess.run(program, capture_output=True, text=True, check=False)
  return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def speakers(engines: Sequence[str] = ("espeak-ng",)) -> list[tuple[str, str]]:
  """(engine, voice) pairs: every espeak-ng accent × variant, and/or the flite voices."""
  unknown = sorted(set(engines) - set(ENGINES))
  if unknown or not engines:
    raise ValueError(f"engines must be a non-empty subset of {ENGINES}, got {list(engines)}")
  out = []
  if "espeak-ng" in engines:
    out += [("espeak-ng", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
  if "flite" in engines:
    out += [("flite", v) for v in FLITE_VOICES]
  return out


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
  with wave.open(io.BytesIO(data)) as w:
    if w.getsampwidth() != 2:
      raise ValueError(f"expected 16-bit PCM from the synthesizer, got {8 * w.getsampwidth()} bits")
    frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
    return frames.mean(axis=1) / 32768.0, w.getframerate()


def _synthesize(engine: str, voice: str, word: str, pitch: int, speed: float,
                sample_rate: int, sox: str) -> np.ndarray:
  """One utterance as float samples at ``sample_rate`` (resampled by sox)."""
  if engine == "espeak-ng":
    program = [sources.require_executable("espeak-ng", ESPEAK_INSTALL), "-v", voice,
               "-p", str(pitch), "-s", str(int(round(175 * speed))), "-a", "100",
               "--stdout", word]
  else:
    program = [sources.require_executable("flite", FLITE_INSTALL), "-voice", voice,
               "--setf", f"duration_stretch={1.0 / speed:.3f}",
               "--setf", f"int_f0_target_mean={70 + 1.5 * pitch:.1f}", "-t", word,
               "-o", "/dev/stdout"]
  spoken = subprocess.run(program, capture_output=True, check=True).stdout
  resampled = subprocess.run([sox, "-t", "wav", "-", "-t", "wav", "-r", str(sample_rate),
                              "-e", "signed", "-b", "16", "-c", "1", "-"],
                             input=spoken, capture_output=True, check=True).stdout
  samples, rate = _read_wav(resampled)
  if rate != sample_rate:
    raise RuntimeError(f"sox returned {rate} Hz, asked for {sample_rate} Hz")
  return samples


def _clip_parameters(seed: int, index: int, voices: list[tuple[str, str]]) -> dict:
  rng = np.random.default_rng([seed, index])
  speaker = int(rng.integers(len(voices)))
  base = np.random.default_rng([seed, 1 << 30, speaker])  # the speaker's own pitch and speed
  return {"digit": index % 10, "speaker": speaker,
          "pitch": int(np.clip(base.integers(25, 75) + rng.integers(-8, 9), 0, 99)),
          "speed": float(base.uniform(0.85, 1.2) * rng.uniform(0.9, 1.1)),
          "gain": float(rng.uniform(0.3, 0.9)), "offset": float(rng.uniform())}


def _digit_clip(args) -> np.ndarray:
  seed, index, voices, sample_rate, seconds, sox = args
  p = _clip_parameters(seed, index, voices)
  engine, voice = voices[p["speaker"]]
  speech = _synthesize(engine, voice, DIGITS[p["digit"]], p["pitch"], p["speed"],
                       sample_rate, sox)
  nonsilent = np.flatnonzero(np.abs(speech) > 1e-3)
  if len(nonsilent):
    speech = speech[nonsilent[0]:nonsilent[-1] + 1]
  size = int(round(seconds * sample_rate))
  speech = speech[:size]
  peak = np.max(np.abs(speech)) if len(speech) else 0.0
  clip = np.zeros(size, np.float32)
  start = int(p["offset"] * (size - len(speech)))
  clip[start:start + len(speech)] = speech * (p["gain"] / peak if peak > 0 else 0.0)
  return mulaw_encode(clip)


def spoken_digits(num_clips: int, *, sample_rate: int = 16_000, seconds: float = 1.0,
                  engines: Sequence[str] = ("espeak-ng",), seed: int = 0,
                  num_workers: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``num_clips`` spoken digits: (codes (n, samples) uint8 μ-law, digits (n,), speakers (n,)).

  ``speakers`` are the indices into :func:`speakers` ``(engines)``. Generated in parallel
  (``num_workers`` processes of the engines, default the CPU count) and cached on disk.
  """
  if not isinstance(num_clips, int) or num_clips < 1:
    raise ValueError(f"num_clips must be an int >= 1, got {num_clips!r}")
  if sample_rate < 8000 or seconds <= 0:
    raise ValueError(f"sample_rate must be >= 8000 and seconds > 0, got {sample_rate=} "
                     f"{seconds=}")
  voices = speakers(engines)
  programs = {"sox": SOX_INSTALL, "espeak-ng": ESPEAK_INSTALL, "flite": FLITE_INSTALL}
  versions = {tool: _version([shutil.which(tool), "--version"]) for tool in programs
              if (tool == "sox" or tool in engines) and shutil.which(tool)}
  key = sources.cache_key(kind="spoken_digits", num_clips=num_clips, sample_rate=sample_rate,
                          seconds=seconds, voices=voices, seed=seed, digits=DIGITS,
                          generator=2)

  def build():
    for tool in ("sox", *engines):
      sources.require_executable(tool, programs[tool])
    sox = sources.require_executable("sox", SOX_INSTALL)
    jobs = [(seed, i, voices, sample_rate, seconds, sox) for i in range(num_clips)]
    workers = num_workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # the work is in subprocesses
      clips = list(pool.map(_digit_clip, jobs))
    params = [_clip_parameters(seed, i, voices) for i in range(num_clips)]
    return {"codes": np.stack(clips),
            "digits": np.array([p["digit"] for p in params], np.int32),
            "speakers": np.array([p["speaker"] for p in params], np.int32)}

  arrays = sources.cached_arrays("spoken_digits", key, build, versions)
  return arrays["codes"], arrays["digits"], arrays["speakers"]


def soundfont_path() -> str:
  """The General MIDI SoundFont shipped in the pretty_midi wheel (TimGM6mb.sf2)."""
  path = os.path.join(sources.require_package_dir("pretty_midi", PIANO_INSTALL), "TimGM6mb.sf2")
  return sources.require_file(path, PIANO_INSTALL)


def piano_score_paths() -> list[str]:
  """music21's bundled scores in play order: :data:`PIANO_COMPOSERS` in turn, sorted paths.

  Bach's 433 chorales (about a minute each, under 1.5 s to parse) come first; the quartet and
  sonata movements after them take up to a minute each to parse.
  """
  corpus_dir = os.path.join(sources.require_package_dir("music21", PIANO_INSTALL), "corpus")
  order = []
  for composer in PIANO_COMPOSERS:
    found = []
    for root, _, files in os.walk(os.path.join(corpus_dir, composer)):
      found += [os.path.join(root, f) for f in files
                if f.endswith((".mxl", ".xml", ".musicxml", ".krn"))]
    order += sorted(found)
  return order


def score_notes(path: str) -> np.ndarray:
  """(notes, 4) float64 [onset s, end s, MIDI key, velocity] of a score, ties merged."""
  from music21 import converter  # pylint: disable=g-import-not-at-top
  seconds_per_quarter = 60.0 / QUARTER_NOTES_PER_MINUTE
  notes, sounding = [], {}
  for element in converter.parse(path).flatten().notes:
    start = float(element.offset) * seconds_per_quarter
    end = start + float(element.quarterLength) * seconds_per_quarter
    velocity = element.volume.velocity or 80
    tie = getattr(element, "tie", None)
    for pitch in getattr(element, "pitches", ()):
      key = int(pitch.midi)
      if tie is not None and tie.type in ("continue", "stop") and key in sounding:
        notes[sounding[key]][1] = max(notes[sounding[key]][1], end)
        continue
      sounding[key] = len(notes)
      notes.append([start, end, key, velocity])
  return np.asarray(notes, np.float64).reshape(-1, 4)


def render_notes(notes: np.ndarray, sample_rate: int, max_seconds: float) -> np.ndarray:
  """Notes (n, 4) -> mono float32 samples on GM piano, cut at ``max_seconds``."""
  import tinysoundfont  # pylint: disable=g-import-not-at-top
  synth = tinysoundfont.Synth(samplerate=sample_rate)
  font = synth.sfload(soundfont_path())
  synth.program_select(0, font, 0, 0)
  events = sorted([(on, 1, int(k), int(v)) for on, _, k, v in notes]
                  + [(off, 0, int(k), 0) for _, off, k, _ in notes])  # note-offs first
  total = int(min(max_seconds, (notes[:, 1].max() + 1.0) if len(notes) else 0) * sample_rate)
  out, done = [], 0
  for time_s, is_on, key, velocity in events:
    at = min(int(time_s * sample_rate), total)
    if at > done:
      out.append(np.frombuffer(synth.generate(at - done), np.float32))
      done = at
    if done >= total:
      break
    if is_on:
      synth.noteon(0, key, velocity)
    else:
      synth.noteoff(0, key)
  if total > done:
    out.append(np.frombuffer(synth.generate(total - done), np.float32))
  stereo = np.concatenate(out).reshape(-1, 2) if out else np.zeros((0, 2), np.float32)
  mono = stereo.mean(axis=1)
  peak = np.max(np.abs(mono)) if len(mono) else 0.0
  return (mono * (PEAK / peak) if peak > 0 else mono).astype(np.float32)


def _piano_versions() -> dict[str, str]:
  """Versions of the rendering tools installed here (none on a machine without them)."""
  versions = {}
  for package in ("music21", "tinysoundfont", "pretty_midi"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def piano_piece(path: str, *, sample_rate: int = 16_000, max_seconds: float = 60.0
                ) -> np.ndarray:
  """One score rendered to (samples,) uint8 μ-law codes (cached); empty if it cannot parse."""
  corpus_root = os.path.dirname(sources.require_package_dir("music21", PIANO_INSTALL))
  key = sources.cache_key(kind="piano", path=os.path.relpath(path, corpus_root),
                          sample_rate=sample_rate, max_seconds=max_seconds,
                          qpm=QUARTER_NOTES_PER_MINUTE, peak=PEAK, generator=1)

  def build():
    try:
      notes = score_notes(path)
    except Exception as e:  # pylint: disable=broad-except  # music21 fails on ~3 % of its corpus
      logging.warning("piano: skipping %s, which music21 cannot parse: %s", path, e)
      notes = np.zeros((0, 4))
    if not len(notes):
      return {"codes": np.zeros(0, np.uint8)}
    return {"codes": mulaw_encode(render_notes(notes, sample_rate, max_seconds))}

  return sources.cached_arrays("piano", key, build, _piano_versions())["codes"]


def piano_pieces(num_pieces: int, *, sample_rate: int = 16_000, max_seconds: float = 60.0
                 ) -> list[np.ndarray]:
  """The first ``num_pieces`` scores of :func:`piano_score_paths` that render, as μ-law.

  The set is cached as one file too (keyed by its parameters), so a machine without music21
  and tinysoundfont can read it from a copied cache directory.
  """
  if not isinstance(num_pieces, int) or num_pieces < 1:
    raise ValueError(f"num_pieces must be an int >= 1, got {num_pieces!r}")
  key = sources.cache_key(kind="piano_set", num_pieces=num_pieces, sample_rate=sample_rate,
                          max_seconds=max_seconds, qpm=QUARTER_NOTES_PER_MINUTE, peak=PEAK,
                          composers=PIANO_COMPOSERS, generator=1)

  def build():
    pieces = []
    for path in piano_score_paths():
      codes = piano_piece(path, sample_rate=sample_rate, max_seconds=max_seconds)
      if len(codes):
        pieces.append(codes)
      if len(pieces) == num_pieces:
        return {f"piece{i:05d}": p for i, p in enumerate(pieces)}
    raise ValueError(f"only {len(pieces)} of music21's scores render; num_pieces must be <= "
                     f"that, got {num_pieces}")

  arrays = sources.cached_arrays("piano_set", key, build, _piano_versions())
  return [arrays[k] for k in sorted(arrays)]
