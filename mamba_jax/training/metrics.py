"""Run metrics: a JSONL log, TensorBoard scalars, throughput / MFU, and progress with an ETA.

Only process 0 writes files. Every record of ``metrics.jsonl`` is one JSON object
``{"step": int, "split": "train" | "eval" | ..., "time": unix seconds, <name>: float, ...}``;
the same scalars go to TensorBoard as ``<split>/<name>`` (``tensorboard/`` in the workdir).

MFU (model FLOP utilisation) is 6 · params · tokens/s over the peak dense bf16 FLOP/s of the
devices in use (the usual training-FLOPs estimate, ignoring the sequence-mixing term); it is
reported only for devices whose peak is listed in ``PEAK_BF16_FLOPS``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax

from mamba_jax.training.tensorboard import EventWriter

# Dense bf16 peak FLOP/s per device, by substring of ``device.device_kind`` (first match).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of ``device`` (default: the first), None when unknown."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def model_flops_utilization(num_params: int, tokens_per_second: float,
                            num_devices: int | None = None) -> float | None:
  """6·N·tokens/s / (devices · peak), or None when the peak FLOP/s is unknown."""
  peak = peak_flops()
  if peak is None:
    return None
  devices = jax.device_count() if num_devices is None else num_devices
  return 6.0 * num_params * tokens_per_second / (devices * peak)


def _to_float(value: Any) -> float:
  return float(jax.device_get(value))


class MetricsWriter:
  """JSONL + TensorBoard scalars in ``workdir`` (no-op on processes other than 0)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = None
    self._events = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        self._events = EventWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> dict[str, float]:
    """Logs ``metrics`` (scalars; device arrays are fetched) at ``step``; returns them as floats."""
    values = {k: _to_float(v) for k, v in metrics.items() if v is not None}
    if self.enabled:
      record = {"step": int(step), "split": split, "time": time.time(), **values}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      if self._events is not None:
        self._events.scalars(int(step), {f"{split}/{k}": v for k, v in values.items()})
        self._events.flush()
    return values

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._events is not None:
      self._events.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
  """Steps per second, ETA, and a one-line progress bar on a terminal (log lines otherwise).

  ``update(step, text)`` is cheap to call every step; the bar is redrawn at most ~4×/s, and
  on a non-terminal a log line is written at most every ``log_every_s`` seconds.
  """

  def __init__(self, total_steps: int, first_step: int = 0, *, prefix: str = "",
               log_every_s: float = 30.0, stream=None):
    self.total = total_steps
    self.first = first_step
    self.prefix = prefix
    self.stream = stream or sys.stderr
    self.interactive = self.stream.isatty() and jax.process_index() == 0
    self.log_every_s = log_every_s
    self._start = time.perf_counter()
    self._last_draw = 0.0

  def eta_seconds(self, step: int) -> float | None:
    done = step - self.first
    if done <= 0:
      return None
    elapsed = time.perf_counter() - self._start
    return elapsed / done * (self.total - step)

  def update(self, step: int, text: str = "", force: bool = False) -> None:
    now = time.perf_counter()
    period = 0.25 if self.interactive else self.log_every_s
    if not force and now - self._last_draw < period and step < self.total:
      return
    self._last_draw = now
    eta = self.eta_seconds(step)
    eta_text = _duration(eta) if eta is not None else "--:--"
    elapsed = _duration(now - self._start)
    if self.interactive:
      width = 30
      filled = int(width * step / max(self.total, 1))
      bar = "#" * filled + "." * (width - filled)
      self.stream.write(f"\r{self.prefix}[{bar}] {step}/{self.total} {elapsed}<{eta_text} "
                        f"{text}\033[K")
      if step >= self.total:
        self.stream.write("\n")
      self.stream.flush()
    else:
      logging.info("%sstep %d/%d elapsed %s eta %s %s", self.prefix, step, self.total,
                   elapsed, eta_text, text)
