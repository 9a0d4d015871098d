"""DNA data: tokenizer, FASTA / MAF readers on small slices, the region split, the two tasks."""

import os

import numpy as np
import pytest

from mamba_jax.data import dna

needs_chrx = pytest.mark.skipif(
    not os.path.isfile(dna.HUMAN_CHRX),
    reason=f"{dna.HUMAN_CHRX} missing: `{dna.HUMAN_CHRX_INSTALL}` (or scripts/setup_data.sh)")
needs_apes = pytest.mark.skipif(
    not os.path.isfile(dna.GREAT_APES_MAF),
    reason=f"great-apes alignment missing: `{dna.GREAT_APES_INSTALL}` (or scripts/setup_data.sh)")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "dna_cache"))


def test_tokenizer_round_trip_and_case():
  tokens = dna.encode("ACGTNacgtnRY")
  # A C G T N -> 4 5 6 7 8; lower case the same; IUPAC R, Y -> N.
  np.testing.assert_array_equal(tokens, [4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 8, 8])
  assert dna.decode(tokens) == "ACGTNACGTNNN"
  assert dna.encode("-")[0] == dna.UNK and dna.VOCAB_SIZE == 9
  with pytest.raises(ValueError, match="tokens"):
    dna.decode(np.array([9]))


def test_read_fasta_and_maf_on_files(tmp_path):
  fasta = tmp_path / "x.fa"
  fasta.write_text(">chr1 test\nACGT\nnnAC\n>chr2\nGG\n")
  out = dna.read_fasta(str(fasta))
  assert dna.decode(out["chr1"]) == "ACGTNNAC" and dna.decode(out["chr2"]) == "GG"
  assert sum(map(len, dna.read_fasta(str(fasta), max_bases=5).values())) == 5
  maf = tmp_path / "x.maf"
  maf.write_text("##maf version=1\na\ns Hsap.22 0 4 + 9 AC-GT\ns Ptro.22 0 5 + 9 ACcGT\n\n"
                 "a\ns Hsap.22 4 2 + 9 TT\n\n"  # no chimp: skipped
                 "a\ns Ptro.22 5 1 + 9 -A\ns Hsap.22 6 1 + 9 G-\n")
  seqs, ends = dna.read_maf(str(maf), species=("Hsap", "Ptro"))
  assert dna.decode(seqs["Hsap"]) == "ACGTG" and dna.decode(seqs["Ptro"]) == "ACCGTA"
  np.testing.assert_array_equal(ends, [[4, 5], [5, 6]])


@needs_chrx
def test_human_chrx_slice():
  tokens = dna.read_fasta(dna.HUMAN_CHRX, max_bases=200_000)
  (name, seq), = tokens.items()
  assert name == "X" and len(seq) == 200_000
  # chrX starts with the 60 kb telomere gap (N), then sequence.
  assert np.all(seq[:10_000] == dna.N_TOKEN)
  assert set(np.unique(seq[100_000:])) <= {4, 5, 6, 7, 8}


@needs_apes
def test_great_apes_slice():
  seqs, ends = dna.read_maf(dna.GREAT_APES_MAF, max_blocks=30)
  assert ends.shape == (30, 4) and set(seqs) == set(dna.APE_SPECIES)
  human, chimp = seqs["Hsap"], seqs["Ptro"]
  # Orthologous rows: the first 100 bases of human and chimp (before any indel) mostly agree.
  assert np.mean(human[:100] == chimp[:100]) > 0.9


def test_split_regions_has_no_overlap_and_covers_everything():
  ends = np.cumsum(np.random.default_rng(0).integers(50, 150, size=(300, 2)), axis=0)
  split = dna.split_regions(ends, region_size=1000, test_fraction=0.2, split_seed=3)
  regions = np.concatenate([split["train"], split["test"]])
  for s in range(2):
    intervals = sorted(map(tuple, regions[:, s]))
    assert intervals[0][0] == 0 and intervals[-1][1] == ends[-1, s]
    assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))  # a partition
  assert len(split["test"]) == round(0.2 * len(regions))
  # The same regions every time; a different seed picks others.
  again = dna.split_regions(ends, 1000, 0.2, split_seed=3)
  np.testing.assert_array_equal(again["test"], split["test"])
  other = dna.split_regions(ends, 1000, 0.2, split_seed=4)
  assert not np.array_equal(other["test"], split["test"])
  with pytest.raises(ValueError, match="test_fraction"):
    dna.split_regions(ends, 1000, 1.5)
  with pytest.raises(ValueError, match="region_size"):
    dna.split_regions(ends, 10**9, 0.2)


@needs_chrx
def test_next_base_windows_stay_in_their_split():
  fields = dict(length=512, max_bases=3_000_000, region_size=1 << 18, test_fraction=0.2)
  train = dna.NextBasePretraining(split="train", seed=1, **fields)
  test = dna.NextBasePretraining(split="test", seed=2, **fields)
  test_regions = test.regions
  for i in range(200):
    start = train.window_start(i)
    end = start + 513
    # No training window touches a test region.
    assert np.all((end <= test_regions[:, 0]) | (start >= test_regions[:, 1]))
  record = test[5]
  assert record["inputs"].shape == record["targets"].shape == record["mask"].shape == (512,)
  np.testing.assert_array_equal(record["inputs"][1:], record["targets"][:-1])
  np.testing.assert_array_equal(test[5]["inputs"], record["inputs"])  # a function of (seed, i)
  assert record["mask"].mean() > 0.9
  assert set(test.loss_metrics(np.log(3.0))) == {"perplexity", "bits_per_base"}
  with pytest.raises(ValueError, match="vocab_size"):
    dna.NextBasePretraining(length=8, vocab_size=5)
  with pytest.raises(ValueError, match="region_size"):
    dna.NextBasePretraining(length=1 << 20, max_bases=3_000_000, region_size=1 << 18)


@needs_apes
def test_great_apes_records_and_split():
  fields = dict(length=256, max_blocks=400, region_size=1 << 18, test_fraction=0.25)
  train = dna.GreatApesClassification(split="train", seed=1, **fields)
  test = dna.GreatApesClassification(split="test", seed=2, **fields)
  labels = []
  for i in range(100):
    label, offset = train.window(i)
    labels.append(label)
    for region in test.regions:  # same blocks for every species: check in the label's rows
      lo, hi = region[label]
      assert offset + 256 <= lo or offset >= hi
  assert set(labels) == {0, 1, 2, 3}
  record = test[0]
  assert record["inputs"].shape == (256,) and record["targets"].shape == (1,)
  assert record["mask"].tolist() == [True] and 0 <= record["targets"][0] < 4
  with pytest.raises(ValueError, match="num_classes"):
    dna.GreatApesClassification(length=8, num_classes=5, max_blocks=400)
