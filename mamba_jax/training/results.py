"""The results of an experiment: ``results.json``, a markdown table, and a figure when possible.

``results.json``: ``{"experiment": str, "reproduces": str, "rows": [{"model": str,
"accuracy": float, ..., "paper": {metric: value}}]}``. ``results.md`` shows the columns named by
``config.results.columns`` (metric keys of the rows) next to the paper's numbers. Configs with
``config.results.plot`` = "accuracy_vs_length" (accuracy@<length> metrics, one line per row) or
"accuracy_vs_width" (rows grouped by ``config.results.group_by``) or "metric_vs_params"
(``config.results.metric`` against the parameter count, grouped likewise) or
"metric_vs_seq_len" (that metric against each row's training length, grouped likewise) get
``results.png`` when matplotlib is importable; it is not a dependency, so without it a log
line says the figure was skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Sequence

from absl import logging
import ml_collections

PLOTS = ("none", "accuracy_vs_length", "accuracy_vs_width", "metric_vs_params",
         "metric_vs_seq_len")


def _fmt(value: Any, percent: bool = True) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{100 * value:.1f}" if percent and 0.0 <= value <= 1.0 else f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """Rows as a markdown table: model, the metric columns (accuracies in %), the paper's.

  Only columns named accuracy* are shown in %; others (loss, perplexity, bits_per_byte) as is.
  """
  paper_columns = [c for c in columns if any(c in r.get("paper", {}) for r in rows)]
  header = ["model", *columns, *[f"paper {c}" for c in paper_columns]]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["model"], *[_fmt(r.get(c), c.startswith("accuracy")) for c in columns],
             *[_fmt(r.get("paper", {}).get(c), c.startswith("accuracy"))
               for c in paper_columns]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _length_of(key: str) -> int | None:
  """accuracy@<int>[...] → the int; None for other keys."""
  if not key.startswith("accuracy@"):
    return None
  digits = key[len("accuracy@"):].split("_")[0]
  return int(digits) if digits.isdigit() else None


def _plot(config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]], path: str) -> bool:
  kind = config.results.plot
  if kind not in PLOTS:
    raise ValueError(f"config.results.plot must be one of {PLOTS}, got {kind!r}")
  if kind == "none":
    return False
  if importlib.util.find_spec("matplotlib") is None:
    logging.info("results: matplotlib is not installed; skipping the figure %s", path)
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  if kind == "accuracy_vs_length":
    for r in rows:
      points = sorted((_length_of(k), v) for k, v in r.items()
                      if _length_of(k) is not None and v is not None)
      if points:
        ax.plot(*zip(*points), marker="o", label=r["model"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length")
  elif kind == "metric_vs_params":
    metric = config.results.metric
    groups_m: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
      if r.get(metric) is not None:
        groups_m.setdefault(str(r.get(config.results.group_by)), []).append(
            (r["params"], r[metric]))
    for name, points in groups_m.items():
      ax.plot(*zip(*sorted(points)), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
  elif kind == "metric_vs_seq_len":
    metric = config.results.metric
    by_group: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
      if r.get(metric) is not None:
        by_group.setdefault(str(r.get(config.results.group_by)), []).append(
            (r["seq_len"], r[metric]))
    for name, points in by_group.items():
      ax.plot(*zip(*sorted(points)), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training sequence length")
  else:
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
      groups.setdefault(str(r.get(config.results.group_by)), []).append(
          (r["d_model"], r["accuracy"]))
    for name, points in groups.items():
      ax.plot(*zip(*sorted(points)), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model dimension")
  if kind in ("metric_vs_params", "metric_vs_seq_len"):
    ax.set_ylabel(config.results.metric)
  else:
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
  ax.legend(fontsize="small")
  ax.set_title(config.experiment)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_results(config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  workdir: str) -> str:
  """Writes results.json, results.md (and results.png); prints and returns the table."""
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"experiment": config.experiment, "reproduces": config.reproduces,
               "rows": list(rows)}, f, indent=2)
  table = markdown_table(rows, list(config.results.columns))
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"# {config.experiment}\n\nReproduces: {config.reproduces}\n\n"
            f"Accuracies in %.\n\n{table}")
  if _plot(config, rows, os.path.join(workdir, "results.png")):
    logging.info("results: wrote %s", os.path.join(workdir, "results.png"))
  print(f"\n{config.experiment} (accuracy, %)\n{table}", flush=True)
  return table
