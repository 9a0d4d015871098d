"""Language-modelling records from the offline text corpora: split, tokenize, window.

Split (:func:`split_documents`): by whole documents, so no text is in both parts. Documents are
ordered by ``sha256(f"{source}/{name}")`` and the first ``max(1, round(val_fraction · n))``
are validation, the rest train — deterministic, independent of the file order and of the
tokenizer. Each part is one token stream ``[eot, doc₁, eot, doc₂, ...]`` (documents in name
order, each preceded by the tokenizer's end-of-text id, which the model thus learns to predict
at the end of a document).

Records (:class:`TextLM`, a random-access source for ``mamba_jax.data.pipeline`` like the
synthetic tasks): a window of ``length + 1`` tokens t,

  inputs  (l,) int32 = t[:-1]     targets (l,) int32 = t[1:]     mask (l,) bool = True

  split "train":       record i starts at an offset drawn uniformly from [0, N − l − 1] by a
                       generator seeded with (seed, i) (nanoGPT's sampling): a pure function of
                       the index, so the order is reproducible, shardable and resumable.
  split "validation":  the non-overlapping windows t[i·l : i·l + l + 1] in order, i < (N−1)/l;
                       the same for every seed.

Metrics from the mean loss (nats per token): perplexity = exp(loss) and bits per byte =
loss / ln 2 · tokens / UTF-8 bytes, with the ratio of the whole split (:meth:`TextLM.
loss_metrics`; for bytes it is 1 up to the end-of-text ids).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np

from mamba_jax.data import text_sources
from mamba_jax.data.synthetic import Record, _rng
from mamba_jax.data.tokenization import encode_documents, get_tokenizer

SPLITS = ("train", "validation")


def _split_key(source: str, name: str) -> bytes:
  return hashlib.sha256(f"{source}/{name}".encode("utf-8")).digest()


def split_documents(source: str, documents: list[text_sources.Document], val_fraction: float
                    ) -> dict[str, list[text_sources.Document]]:
  """{"train": [...], "validation": [...]}, each in name order (see the module docstring)."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
  if len(documents) < 2:
    raise ValueError(f"a split needs at least 2 documents, got {len(documents)} from {source!r}")
  ranked = sorted(documents, key=lambda d: _split_key(source, d[0]))
  num_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
  return {"validation": sorted(ranked[:num_val]), "train": sorted(ranked[num_val:])}


@functools.lru_cache(maxsize=8)
def token_stream(source: str, tokenizer: str, split: str, val_fraction: float,
                 max_documents: int | None = None) -> tuple[np.ndarray, int]:
  """(tokens (N,) int32 of the split, its UTF-8 byte count); cached per process."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  docs = split_documents(source, text_sources.load_documents(source, max_documents),
                         val_fraction)[split]
  tok = get_tokenizer(tokenizer)
  ids = encode_documents(tok, [text for _, text in docs])
  pieces = []
  for doc_ids in ids:
    pieces.append(np.array([tok.eot_id], np.int32))
    pieces.append(np.asarray(doc_ids, np.int32))
  tokens = np.concatenate(pieces)
  tokens.setflags(write=False)
  return tokens, sum(len(text.encode("utf-8")) for _, text in docs)


@dataclasses.dataclass(frozen=True)
class TextLM:
  """Next-token prediction on a text source (module docstring).

  Attributes:
    source: one of ``text_sources.SOURCES``.
    tokenizer: "byte" or "neox".
    vocab_size: the tokenizer's vocabulary (256 / 50280); checked when the data is read.
    length: l, tokens per record.
    split: "train" or "validation".
    val_fraction: share of the documents held out for validation.
    max_documents: None, or only the first documents by name (tests, quick runs).
    seed: the training windows' seed (validation windows ignore it).
    num_records: records of the training split (effectively endless).
  """

  source: str
  tokenizer: str = "byte"
  vocab_size: int = 256
  length: int = 256
  split: str = "train"
  val_fraction: float = 0.1
  max_documents: int | None = None
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    if self.source not in text_sources.SOURCES:
      raise ValueError(f"source must be one of {text_sources.SOURCES}, got {self.source!r}")
    if self.split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
    if not isinstance(self.length, int) or self.length < 1:
      raise ValueError(f"length must be an int >= 1, got {self.length!r}")
    if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
      raise ValueError(f"vocab_size must be an int >= 2, got {self.vocab_size!r}")

  @functools.cached_property
  def tokens(self) -> np.ndarray:
    """The split's token stream, read and checked once per task object."""
    tokens, _ = token_stream(self.source, self.tokenizer, self.split, self.val_fraction,
                             self.max_documents)
    if tokens.size < self.length + 1:
      raise ValueError(f"the {self.split} split of {self.source!r} has {tokens.size} tokens, "
                       f"fewer than length + 1 = {self.length + 1}; lower length or raise "
                       f"max_documents / val_fraction")
    top = int(tokens.max())
    if top >= self.vocab_size:
      raise ValueError(f"vocab_size={self.vocab_size} is too small for the {self.tokenizer!r} "
                       f"tokenizer's id {top}; use its vocabulary size")
    return tokens

  @property
  def seq_len(self) -> int:
    return self.length

  @property
  def tokens_per_byte(self) -> float:
    tokens, num_bytes = token_stream(self.source, self.tokenizer, self.split,
                                     self.val_fraction, self.max_documents)
    return tokens.size / max(num_bytes, 1)

  def __len__(self) -> int:
    if self.split == "train":
      return self.num_records
    return (self.tokens.size - 1) // self.length

  def __getitem__(self, index: int) -> Record:
    tokens, l = self.tokens, self.length
    if self.split == "train":
      start = int(_rng(self.seed, index).integers(0, tokens.size - l))
    else:
      if not 0 <= index < len(self):
        raise IndexError(f"validation window {index} is outside [0, {len(self)})")
      start = index * l
    window = tokens[start:start + l + 1]
    return {"inputs": window[:-1].copy(), "targets": window[1:].copy(),
            "mask": np.ones(l, bool)}

  def loss_metrics(self, loss: float) -> dict[str, float]:
    """Perplexity and bits per byte from a mean loss in nats per token."""
    return {"perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) * self.tokens_per_byte}


def make_text_lm(**fields) -> TextLM:
  """A TextLM whose tokenizer vocabulary is checked against ``vocab_size``."""
  task = TextLM(**fields)
  expected = get_tokenizer(task.tokenizer).vocab_size
  if task.vocab_size != expected:
    raise ValueError(f"vocab_size must be the {task.tokenizer!r} tokenizer's {expected}, got "
                     f"{task.vocab_size}")
  return task


TASKS = {"text_lm": make_text_lm}
