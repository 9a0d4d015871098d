"""Generate text from a checkpoint or a preset, streaming tokens to the terminal.

  PYTHONPATH=. python scripts/generate.py --model=PRESET_OR_DIR --prompt="Mamba is" \
      --max_new_tokens=64 [--temperature=0.8 --top_p=0.9 --top_k=0 --min_p=0 \
      --repetition_penalty=1.0 --seed=0 --tokenizer=path/to/tokenizer.json --eos_id=N]

--model: a checkpoint directory (HF, mamba_ssm or orbax, read by
``mamba_jax.convert.load_pretrained``) or a preset name (``mamba_jax.config.PRESET_NAMES``)
with random weights (``--seed``).

Tokenizer: byte-level by default: the prompt's UTF-8 bytes are the token ids 0–255 (id = byte
value; the model's vocabulary must have ≥ 256 ids), and generated ids 0–255 are decoded back
as bytes (invalid UTF-8 shows as U+FFFD); ids ≥ 256 have no byte and are shown as ⟨id⟩.
``--tokenizer`` reads a local HF ``tokenizer.json`` with the optional ``tokenizers`` package.

Tokens are printed as the compiled decoding loop produces them (an ordered ``io_callback``
from inside the ``while_loop``); the last line gives the decoding speed in tokens/s, measured
from the first streamed token to the last (compilation and prefill excluded), and the time to
the first token (compilation and prefill included).
"""

from __future__ import annotations

import codecs
import sys
import time
from pathlib import Path
from typing import Callable

from absl import app, flags

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import PRESET_NAMES, preset
from mamba_jax.inference import generate
from mamba_jax.nn.lm import MambaLM

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory or preset name", required=True)
flags.DEFINE_string("prompt", None, "the prompt text", required=True)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
flags.DEFINE_float("temperature", 0.0, "0: greedy")
flags.DEFINE_integer("top_k", 0, "0: off")
flags.DEFINE_float("top_p", 1.0, "1: off")
flags.DEFINE_float("min_p", 0.0, "0: off")
flags.DEFINE_float("repetition_penalty", 1.0, "1: off")
flags.DEFINE_integer("eos_id", None, "stop after this id")
flags.DEFINE_integer("seed", 0, "sampling key, and the weights of a preset")
flags.DEFINE_string("tokenizer", None, "a local HF tokenizer.json (needs `tokenizers`)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute/parameter dtype")

BYTES = 256


class ByteTokenizer:
  """UTF-8 bytes as ids 0–255; decoding streams through an incremental UTF-8 decoder."""

  def __init__(self, vocab_size: int):
    if vocab_size < BYTES:
      raise ValueError(f"the byte tokenizer needs a vocabulary of >= {BYTES} ids, the model "
                       f"has {vocab_size}: pass --tokenizer")
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def stream(self, token: int) -> str:
    if token < BYTES:
      return self._decoder.decode(bytes([token]))
    return self._decoder.decode(b"", final=True) + f"⟨{token}⟩"


class HFTokenizer:
  """A local tokenizer.json; streaming decodes the ids so far and prints the new text."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer
    except ImportError as error:
      raise ImportError("--tokenizer needs the `tokenizers` package: pip install tokenizers"
                        ) from error
    if not Path(path).is_file():
      raise FileNotFoundError(f"--tokenizer={path} is not a file")
    self._tokenizer = Tokenizer.from_file(path)
    self._ids: list[int] = []
    self._text = ""

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text).ids

  def stream(self, token: int) -> str:
    self._ids.append(token)
    text = self._tokenizer.decode(self._ids)
    new, self._text = text[len(self._text):], text
    return new


def load_model(name: str, dtype, seed: int) -> MambaLM:
  if Path(name).is_dir():
    from mamba_jax.convert import load_pretrained  # only needed for checkpoints
    return load_pretrained(name, dtype=dtype)
  if name in PRESET_NAMES:
    return MambaLM(preset(name), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
  raise ValueError(f"--model={name!r} is neither a directory nor a preset of {PRESET_NAMES}")


def streamer(stream: Callable[[int], str], times: list[float]):
  """The decoding loop's callback: prints row 0's token, records its time."""
  def callback(step, tokens) -> None:
    times.append(time.perf_counter())
    sys.stdout.write(stream(int(tokens[0])))
    sys.stdout.flush()
  return callback


def main(argv) -> None:
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  model = load_model(FLAGS.model, dtype, FLAGS.seed)
  vocab = model.config.vocab_size
  tokenizer = HFTokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else ByteTokenizer(vocab)
  ids = tokenizer.encode(FLAGS.prompt)
  if not ids:
    raise ValueError("--prompt encodes to no tokens")
  if max(ids) >= vocab:
    raise ValueError(f"the prompt has token id {max(ids)} >= the model's vocab_size {vocab}")
  times: list[float] = []
  sys.stdout.write(FLAGS.prompt)
  sys.stdout.flush()
  start = time.perf_counter()
  out = generate(model, jnp.asarray([ids], jnp.int32), FLAGS.max_new_tokens,
                 temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                 min_p=FLAGS.min_p, repetition_penalty=FLAGS.repetition_penalty,
                 eos_id=FLAGS.eos_id, key=jax.random.key(FLAGS.seed),
                 callback=streamer(tokenizer.stream, times))
  jax.block_until_ready(out)
  n = len(times)
  speed = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")
  first = times[0] - start if times else float("nan")
  print(f"\n\n[{n} tokens; {speed:.1f} tokens/s decoding; first token after {first:.2f} s "
        f"(compilation + prefill); {jax.devices()[0].device_kind}]")


if __name__ == "__main__":
  app.run(main)
