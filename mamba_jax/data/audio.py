"""Audio data: the waveform tasks of Mamba §4.4 over 8-bit μ-law samples.

Samples are μ-law codes (:mod:`mamba_jax.data.mulaw`, re-exported here); the waveforms are
generated offline and cached by :mod:`mamba_jax.data.audio_synth`.

Tasks (random-access sources for ``mamba_jax.data.pipeline``; ``task[i]`` depends only on
(seed, i), the split only on the data set's own parameters):
  * :class:`PianoWaveform` (Mamba §4.4.1, Figure 7; a YouTubeMix stand-in): a random window of
    l + 1 μ-law samples of a piece rendered by :mod:`mamba_jax.data.audio_synth`; inputs =
    window[:-1], targets = window[1:]. Pieces, not windows, are split into train and test.
  * :class:`SpokenDigits` (Mamba §4.4.2, Table 4; an SC09 stand-in): one synthesized 1 s clip
    of a digit word, 16,000 μ-law samples, from its start: inputs = [<bos>] + clip[:l − 1],
    targets = clip[:l] (every sample scored; <bos> = 256). Speakers (voices), not clips, are
    split into train and test, as SC09's speakers are.
Vocabulary: 256 μ-law codes (+ <bos> for the digits). NLL in bits per sample = loss / ln 2.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from mamba_jax.data import audio_synth
from mamba_jax.data.mulaw import MU, NUM_CODES, mulaw_decode, mulaw_encode
from mamba_jax.data.sources import check_split
from mamba_jax.data.synthetic import check_int

__all__ = ["MU", "NUM_CODES", "BOS", "mulaw_decode", "mulaw_encode", "PianoWaveform",
           "SpokenDigits"]

BOS = NUM_CODES  # the spoken-digit task's start token


@functools.lru_cache(maxsize=4)
def _piano_split(num_pieces: int, sample_rate: int, max_seconds: float, test_fraction: float,
                 split_seed: int) -> dict[str, tuple[np.ndarray, ...]]:
  pieces = audio_synth.piano_pieces(num_pieces, sample_rate=sample_rate,
                                    max_seconds=max_seconds)
  order = np.random.default_rng(split_seed).permutation(len(pieces))
  num_test = min(len(pieces) - 1, max(1, int(round(test_fraction * len(pieces)))))
  codes = list(pieces)
  return {"test": tuple(codes[i] for i in sorted(order[:num_test])),
          "train": tuple(codes[i] for i in sorted(order[num_test:]))}


@dataclasses.dataclass(frozen=True)
class PianoWaveform:
  """Next-sample prediction on piano renderings of music21's bundled scores.

  Fields: ``length`` l (context), ``split``, ``vocab_size`` (256), ``num_pieces`` (the first
  pieces of :func:`audio_synth.piano_score_paths` that parse), ``sample_rate``,
  ``max_seconds`` (each piece's rendering is cut there), ``test_fraction`` / ``split_seed``
  (pieces held out), ``seed``, ``num_records``.
  """

  length: int
  vocab_size: int = NUM_CODES
  split: str = "train"
  num_pieces: int = 64
  sample_rate: int = 16_000
  max_seconds: float = 60.0
  test_fraction: float = 0.1
  split_seed: int = 0
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length)
    check_split(self.split)
    check_int("num_pieces", self.num_pieces, 2)
    check_int("num_records", self.num_records)
    if self.vocab_size != NUM_CODES:
      raise ValueError(f"vocab_size must be {NUM_CODES} (8-bit μ-law), got {self.vocab_size}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
    room = np.array([len(p) - self.length for p in self.pieces])
    if not (room > 0).any():
      raise ValueError(f"no {self.split} piece is longer than length + 1 = {self.length + 1} "
                       f"samples; lower length or raise max_seconds")
    weights = np.where(room > 0, room, 0).astype(np.float64)
    object.__setattr__(self, "_weights", weights / weights.sum())

  @property
  def pieces(self) -> tuple[np.ndarray, ...]:
    """This split's pieces as (samples,) uint8 μ-law codes."""
    return _piano_split(self.num_pieces, self.sample_rate, self.max_seconds,
                        self.test_fraction, self.split_seed)[self.split]

  @property
  def seq_len(self) -> int:
    return self.length

  def loss_metrics(self, loss: float) -> dict[str, float]:
    """NLL in bits per sample (Figure 7 / Table 4's unit) of a mean loss in nats."""
    return {"bits_per_sample": float(loss / np.log(2.0))}

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    piece = self.pieces[rng.choice(len(self._weights), p=self._weights)]
    start = int(rng.integers(0, len(piece) - self.length))
    window = piece[start:start + self.length + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:],
            "mask": np.ones(self.length, bool)}


@functools.lru_cache(maxsize=4)
def _digit_clips(num_clips: int, sample_rate: int, seconds: float, engines: tuple[str, ...],
                 speakers_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  clips, digits, speakers = audio_synth.spoken_digits(
      num_clips, sample_rate=sample_rate, seconds=seconds, engines=engines,
      seed=speakers_seed)
  return clips, digits, speakers


@dataclasses.dataclass(frozen=True)
class SpokenDigits:
  """Autoregressive modelling of synthesized one-second spoken digits (SC09 stand-in).

  Fields: ``length`` l ≤ the clip's samples (l = 16,000 is the whole clip at 16 kHz),
  ``split``, ``vocab_size`` (257: μ-law codes and <bos>), ``num_clips`` (generated clips,
  cached on disk), ``sample_rate``, ``engines`` ("espeak-ng", optionally "flite"),
  ``test_fraction`` / ``split_seed`` (speakers held out), ``seed``, ``num_records``.
  Records also carry ``digit`` (1,) int32, the spoken word (0–9), for analysis.
  """

  length: int
  vocab_size: int = NUM_CODES + 1
  split: str = "train"
  num_clips: int = 2000
  sample_rate: int = 16_000
  engines: tuple[str, ...] = ("espeak-ng",)
  test_fraction: float = 0.1
  split_seed: int = 0
  generation_seed: int = 0
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length)
    check_split(self.split)
    check_int("num_clips", self.num_clips, 20)
    check_int("num_records", self.num_records)
    if self.vocab_size != NUM_CODES + 1:
      raise ValueError(f"vocab_size must be {NUM_CODES + 1} (μ-law codes and <bos>), got "
                       f"{self.vocab_size}")
    if self.length > self.sample_rate:
      raise ValueError(f"length must be <= one second of samples ({self.sample_rate}), got "
                       f"{self.length}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
    object.__setattr__(self, "engines", tuple(self.engines))
    _, _, speakers = self._clips
    names = np.unique(speakers)
    order = np.random.default_rng(self.split_seed).permutation(len(names))
    num_test = min(len(names) - 1, max(1, int(round(self.test_fraction * len(names)))))
    test = np.isin(speakers, names[order[:num_test]])
    indices = np.flatnonzero(test if self.split == "test" else ~test)
    object.__setattr__(self, "_indices", indices)

  @property
  def _clips(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _digit_clips(self.num_clips, self.sample_rate, 1.0, self.engines,
                        self.generation_seed)

  @property
  def clip_indices(self) -> np.ndarray:
    """Indices (into the generated set) of this split's clips."""
    return self._indices

  @property
  def seq_len(self) -> int:
    return self.length

  def loss_metrics(self, loss: float) -> dict[str, float]:
    """NLL in bits per sample (Figure 7 / Table 4's unit) of a mean loss in nats."""
    return {"bits_per_sample": float(loss / np.log(2.0))}

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    clip_index = self._indices[rng.integers(len(self._indices))]
    codes, digits, _ = self._clips
    clip = codes[clip_index, :self.length].astype(np.int32)
    inputs = np.concatenate([[BOS], clip[:-1]]).astype(np.int32)
    return {"inputs": inputs, "targets": clip, "mask": np.ones(self.length, bool),
            "digit": np.array([digits[clip_index]], np.int32)}


TASKS = {"piano": PianoWaveform, "spoken_digits": SpokenDigits}
