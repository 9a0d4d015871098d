"""DNA data: readers, a character tokenizer, a region split, and the two tasks of Mamba §4.3.

Sources (Debian packages, installed by ``scripts/setup_data.sh``):
  * human chrX, the first 70 Mb of GRCh37 (``smalt-examples``): :data:`HUMAN_CHRX`, read by
    :func:`read_fasta`. The pretraining corpus (a stand-in for the paper's HG38).
  * the Ensembl EPO alignment of human, chimpanzee, gorilla and orangutan chr22
    (``maffilter-examples``): :data:`GREAT_APES_MAF`, read by :func:`read_maf`: each species'
    ``s`` lines of every block, gaps ``-`` dropped. The paper's Great Apes task has five
    species; bonobo is in no offline source, so here it is 4-way.

Tokens (:data:`VOCAB`): 0 <pad>, 1 <bos>, 2 <sep>, 3 <unk>, 4 A, 5 C, 6 G, 7 T, 8 N. Soft-masked
(lower-case) repeats are upper-cased; IUPAC ambiguity codes (R, Y, K, ...) become N.

Split (:func:`split_regions`): the sequence is cut into contiguous regions of at least
``region_size`` bases (whole alignment blocks for the MAF); a seeded permutation puts
``test_fraction`` of them in the test split. Every window lies inside one region, so no base
is in both splits. For the apes the regions are the same blocks for every species (the
alignment's orthologous rows), so a test window has no near-copy in training.

Tasks (random-access sources for ``mamba_jax.data.pipeline``; ``task[i]`` depends only on
(seed, i); the split depends only on ``split_seed``, so train and eval tasks agree):
  * :class:`NextBasePretraining` (Mamba §4.3.1–4.3.2, Figure 5): a random window of l + 1
    bases; inputs = window[:-1], targets = window[1:], scored where the target is not N.
  * :class:`GreatApesClassification` (Mamba §4.3.4, Figure 6): a species k uniformly, then a
    random window of l bases from k's sequence of a random region; inputs (l,), targets (1,)
    = k, mask (1,) = True (the classifier's logits are (b, 1, classes)).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from typing import Iterator, Sequence

import numpy as np

from mamba_jax.data import sources
from mamba_jax.data.sources import check_split
from mamba_jax.data.synthetic import check_int

HUMAN_CHRX = "/usr/share/doc/smalt/test/data/hs37chrXtrunc.fa.gz"
HUMAN_CHRX_INSTALL = "apt-get install -y --no-install-recommends smalt-examples"
GREAT_APES_MAF = ("/usr/share/doc/maffilter/examples/Gorilla/"
                  "Compara.epo_5_catarrhini_hsap-projected.chr22.subset.nogap.cleaned_aln.maf.gz")
GREAT_APES_INSTALL = "apt-get install -y --no-install-recommends maffilter-examples"
# The alignment's source-name prefixes, in label order.
APE_SPECIES = ("Hsap", "Ptro", "Ggor", "Ppyg")
APE_NAMES = ("human", "chimpanzee", "gorilla", "orangutan")

SPECIALS = ("<pad>", "<bos>", "<sep>", "<unk>")
BASES = ("A", "C", "G", "T", "N")
VOCAB = SPECIALS + BASES
PAD, BOS, SEP, UNK = range(4)
N_TOKEN = VOCAB.index("N")
VOCAB_SIZE = len(VOCAB)

_ENCODE = np.full(256, UNK, np.uint8)
for _letter in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
  _ENCODE[_letter] = _ENCODE[_letter + 32] = N_TOKEN  # IUPAC ambiguity codes -> N
for _base in BASES:
  _ENCODE[ord(_base)] = _ENCODE[ord(_base.lower())] = VOCAB.index(_base)
_DECODE = np.frombuffer("".join(c if len(c) == 1 else "?" for c in VOCAB).encode(), np.uint8)


def encode(sequence: str | bytes) -> np.ndarray:
  """DNA letters -> (n,) uint8 token ids (case-insensitive; other letters N, others <unk>)."""
  if isinstance(sequence, str):
    sequence = sequence.encode("ascii")
  return _ENCODE[np.frombuffer(sequence, np.uint8)]


def decode(tokens: np.ndarray) -> str:
  """(n,) token ids -> letters (specials as '?')."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
    raise ValueError(f"tokens must be in [0, {VOCAB_SIZE}), got range "
                     f"[{tokens.min()}, {tokens.max()}]")
  return _DECODE[tokens.astype(np.int64)].tobytes().decode("ascii")


def _lines(path: str) -> Iterator[bytes]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    yield from f


def read_fasta(path: str, max_bases: int | None = None) -> dict[str, np.ndarray]:
  """{record name: (n,) uint8 tokens} of a (gzipped) FASTA file; stops after ``max_bases``."""
  records: dict[str, list[bytes]] = {}
  current, total = None, 0
  for line in _lines(path):
    if line.startswith(b">"):
      current = line[1:].split()[0].decode()
      records[current] = []
      continue
    if current is None:
      raise ValueError(f"{path} is not FASTA: sequence before the first '>' header")
    line = line.strip()
    records[current].append(line)
    total += len(line)
    if max_bases is not None and total >= max_bases:
      break
  out = {name: encode(b"".join(parts)) for name, parts in records.items()}
  if max_bases is not None and total > max_bases:  # the last record ends at max_bases overall
    out[current] = out[current][:len(out[current]) - (total - max_bases)]
  return out


def read_maf(path: str, species: Sequence[str] = APE_SPECIES, max_blocks: int | None = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Each species' bases over the alignment blocks that hold all of them, gaps dropped.

  Returns ({species: (n_s,) uint8 tokens}, block_ends (blocks, species) int64: the end offset
  of each block in each species' sequence). A block lacking one of ``species`` is skipped.
  """
  seqs: dict[str, list[np.ndarray]] = {s: [] for s in species}
  lengths = {s: 0 for s in species}
  ends: list[list[int]] = []
  block: dict[str, bytes] = {}

  def flush():
    if block and all(s in block for s in species):
      for s in species:
        tokens = encode(block[s].replace(b"-", b""))
        seqs[s].append(tokens)
        lengths[s] += len(tokens)
      ends.append([lengths[s] for s in species])
    block.clear()

  for line in _lines(path):
    if line.startswith(b"a"):
      flush()
      if max_blocks is not None and len(ends) >= max_blocks:
        break
    elif line.startswith(b"s "):
      fields = line.split()
      name = fields[1].split(b".")[0].decode()
      if name in seqs:
        block[name] = fields[6]
  else:
    flush()
  if not ends:
    raise ValueError(f"{path} has no alignment block with all of {list(species)}")
  return ({s: np.concatenate(seqs[s]) for s in species}, np.asarray(ends, np.int64))


@functools.lru_cache(maxsize=4)
def human_chrx(max_bases: int = 0) -> np.ndarray:
  """GRCh37 chrX[0:70 Mb] as (n,) uint8 tokens, or its first ``max_bases`` (0: all).

  Parsed once per process and cached on disk (keyed by the file's path: the Debian example
  data does not change); a prefix reads only that much of the file.
  """
  key = sources.cache_key(path=HUMAN_CHRX, vocab=VOCAB, max_bases=max_bases)

  def build():
    path = sources.require_file(HUMAN_CHRX, HUMAN_CHRX_INSTALL)
    return {"tokens": np.concatenate(list(read_fasta(path, max_bases or None).values()))}

  return sources.cached_arrays("hs37_chrx", key, build)["tokens"]


@functools.lru_cache(maxsize=4)
def great_apes(max_blocks: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(species tokens, block ends) of the chr22 alignment, or of its first ``max_blocks``."""
  key = sources.cache_key(path=GREAT_APES_MAF, vocab=VOCAB, species=APE_SPECIES,
                          max_blocks=max_blocks)

  def build():
    path = sources.require_file(GREAT_APES_MAF, GREAT_APES_INSTALL)
    seqs, ends = read_maf(path, max_blocks=max_blocks or None)
    return {"block_ends": ends, **seqs}

  arrays = sources.cached_arrays("great_apes_chr22", key, build)
  return {s: arrays[s] for s in APE_SPECIES}, arrays["block_ends"]


def split_regions(block_ends: np.ndarray, region_size: int, test_fraction: float,
                  split_seed: int = 0) -> dict[str, np.ndarray]:
  """Groups consecutive blocks into regions and assigns each region to one split.

  Args:
    block_ends: (blocks, s) int: cumulative end offsets of the blocks in each of s parallel
      sequences (s = 1 for a single genome cut into fixed blocks).
    region_size: a region closes at the first block end at least this far (in the first
      sequence) from its start; the last region takes what is left.
    test_fraction: share of the regions in the test split (at least one region each).
    split_seed: seed of the permutation that picks the test regions.
  Returns:
    {"train": (r_train, s, 2), "test": (r_test, s, 2)} int64 [start, end) offsets per region.
  """
  block_ends = np.asarray(block_ends, np.int64)
  if block_ends.ndim != 2 or not len(block_ends):
    raise ValueError(f"block_ends must be a non-empty (blocks, sequences) array, got shape "
                     f"{block_ends.shape}")
  if region_size < 1:
    raise ValueError(f"region_size must be >= 1, got {region_size}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  bounds, start = [], np.zeros(block_ends.shape[1], np.int64)
  for end in block_ends:
    if end[0] - start[0] >= region_size:
      bounds.append(np.stack([start, end], -1))
      start = end
  if start[0] < block_ends[-1, 0]:
    bounds.append(np.stack([start, block_ends[-1]], -1))
  regions = np.asarray(bounds, np.int64)
  if len(regions) < 2:
    raise ValueError(f"region_size={region_size} leaves {len(regions)} region(s) of a "
                     f"{block_ends[-1, 0]}-base sequence; use a smaller region_size")
  num_test = min(len(regions) - 1, max(1, int(round(test_fraction * len(regions)))))
  order = np.random.default_rng(split_seed).permutation(len(regions))
  test = np.sort(order[:num_test])
  train = np.sort(order[num_test:])
  return {"train": regions[train], "test": regions[test]}


def fixed_blocks(length: int, block_size: int) -> np.ndarray:
  """(blocks, 1) end offsets of a single sequence of ``length`` cut every ``block_size``."""
  ends = np.arange(block_size, length, block_size, dtype=np.int64)
  return np.append(ends, length)[:, None]


def _usable(regions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Regions (r, 2) that hold a window of ``length``, and their sampling weights."""
  room = regions[:, 1] - regions[:, 0] - length + 1
  keep = room > 0
  return regions[keep], room[keep] / room[keep].sum() if keep.any() else room[keep]


@dataclasses.dataclass(frozen=True)
class NextBasePretraining:
  """Next-base prediction on windows of human chrX (Mamba §4.3, HG38 pretraining stand-in).

  Fields: ``length`` l (the model's context), ``split`` "train" | "test", ``vocab_size``
  (must be :data:`VOCAB_SIZE`), ``region_size`` / ``test_fraction`` / ``split_seed`` (the
  split), ``max_n_fraction`` (windows with more N targets are redrawn, up to 64 times),
  ``max_bases`` (use only the first bases of the chromosome; 0 = all), ``seed``,
  ``num_records``.
  """

  length: int
  vocab_size: int = VOCAB_SIZE
  split: str = "train"
  region_size: int = 1 << 20
  test_fraction: float = 0.1
  split_seed: int = 0
  max_n_fraction: float = 0.1
  max_bases: int = 0
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length, 2)
    check_split(self.split)
    if self.vocab_size != VOCAB_SIZE:
      raise ValueError(f"vocab_size must be {VOCAB_SIZE} (the DNA tokenizer), got "
                       f"{self.vocab_size}")
    check_int("num_records", self.num_records)
    check_int("max_bases", self.max_bases, 0)
    if not 0.0 <= self.max_n_fraction <= 1.0:
      raise ValueError(f"max_n_fraction must be in [0, 1], got {self.max_n_fraction}")
    tokens = self.tokens
    regions = split_regions(fixed_blocks(len(tokens), self.region_size), self.region_size,
                            self.test_fraction, self.split_seed)[self.split][:, 0]
    usable, weights = _usable(regions, self.length + 1)
    if not len(usable):
      raise ValueError(f"no {self.split} region holds length + 1 = {self.length + 1} bases; "
                       f"raise region_size (now {self.region_size}) or lower length")
    object.__setattr__(self, "_regions", usable)
    object.__setattr__(self, "_weights", weights)

  @property
  def tokens(self) -> np.ndarray:
    """The corpus, (n,) uint8 tokens."""
    return human_chrx(self.max_bases)

  @property
  def regions(self) -> np.ndarray:
    """(r, 2) [start, end) of this split's regions that can hold a window."""
    return self._regions

  @property
  def seq_len(self) -> int:
    return self.length

  def __len__(self) -> int:
    return self.num_records

  def loss_metrics(self, loss: float) -> dict[str, float]:
    """Perplexity (Figure 5's metric) and bits per base of a mean loss in nats per base."""
    return {"perplexity": float(np.exp(loss)), "bits_per_base": float(loss / np.log(2.0))}

  def window_start(self, index: int) -> int:
    """Offset in :attr:`tokens` of record ``index``'s window of length + 1 bases."""
    rng = np.random.default_rng([self.seed, index])
    tokens, l = self.tokens, self.length + 1
    for _ in range(64):
      start, end = self._regions[rng.choice(len(self._regions), p=self._weights)]
      offset = int(rng.integers(start, end - l + 1))
      if np.mean(tokens[offset + 1:offset + l] == N_TOKEN) <= self.max_n_fraction:
        break
    return offset

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    offset = self.window_start(index)
    window = self.tokens[offset:offset + self.length + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:], "mask": window[1:] != N_TOKEN}


@dataclasses.dataclass(frozen=True)
class GreatApesClassification:
  """Which of human / chimpanzee / gorilla / orangutan a window of chr22 comes from.

  Fields: ``length`` l, ``split``, ``vocab_size`` (:data:`VOCAB_SIZE`), ``num_classes``
  (4), ``region_size`` / ``test_fraction`` / ``split_seed`` (the split by alignment block),
  ``max_blocks`` (use only the first blocks of the alignment; 0 = all), ``seed``,
  ``num_records``. Records: inputs (l,) int32, targets (1,) int32 label, mask (1,) True.
  """

  length: int
  vocab_size: int = VOCAB_SIZE
  num_classes: int = len(APE_SPECIES)
  split: str = "train"
  region_size: int = 1 << 20
  test_fraction: float = 0.1
  split_seed: int = 0
  max_blocks: int = 0
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length)
    check_split(self.split)
    if self.vocab_size != VOCAB_SIZE:
      raise ValueError(f"vocab_size must be {VOCAB_SIZE} (the DNA tokenizer), got "
                       f"{self.vocab_size}")
    if self.num_classes != len(APE_SPECIES):
      raise ValueError(f"num_classes must be {len(APE_SPECIES)} ({', '.join(APE_NAMES)}; no "
                       f"offline source has bonobo), got {self.num_classes}")
    check_int("num_records", self.num_records)
    check_int("max_blocks", self.max_blocks, 0)
    _, ends = self.data
    regions = split_regions(ends, self.region_size, self.test_fraction,
                            self.split_seed)[self.split]
    room = (regions[:, :, 1] - regions[:, :, 0]).min(axis=1) - self.length + 1
    keep = room > 0
    if not keep.any():
      raise ValueError(f"no {self.split} region holds {self.length} bases of every species; "
                       f"raise region_size (now {self.region_size}) or lower length")
    object.__setattr__(self, "_regions", regions[keep])
    object.__setattr__(self, "_weights", room[keep] / room[keep].sum())

  @property
  def data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({species: (n_s,) uint8 tokens}, block ends (blocks, species))."""
    return great_apes(self.max_blocks)

  @property
  def regions(self) -> np.ndarray:
    """(r, species, 2) [start, end) of this split's regions in each species' sequence."""
    return self._regions

  @property
  def seq_len(self) -> int:
    return self.length

  def __len__(self) -> int:
    return self.num_records

  def window(self, index: int) -> tuple[int, int]:
    """(label, offset in that species' sequence) of record ``index``."""
    rng = np.random.default_rng([self.seed, index])
    label = int(rng.integers(self.num_classes))
    region = self._regions[rng.choice(len(self._regions), p=self._weights), label]
    return label, int(rng.integers(region[0], region[1] - self.length + 1))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    label, offset = self.window(index)
    seqs, _ = self.data
    inputs = seqs[APE_SPECIES[label]][offset:offset + self.length].astype(np.int32)
    return {"inputs": inputs, "targets": np.array([label], np.int32),
            "mask": np.ones(1, bool)}


TASKS = {"dna_next_base": NextBasePretraining, "great_apes": GreatApesClassification}
