"""The device-side kernel events of a ``jax.profiler.trace`` (its perfetto trace), for the
profiling scripts (``profile_decode.py``, ``profile_training.py``)."""

from __future__ import annotations

import glob
import gzip
import json
import os


def device_events(trace_dir: str) -> list[dict]:
  """The complete ("X") events of the GPU streams in the perfetto trace that
  ``jax.profiler.trace(trace_dir, create_perfetto_trace=True)`` wrote: each a dict with
  ``name`` (the kernel), ``dur`` (µs) and ``args`` (e.g. the HLO op that launched it, where the
  profiler records one). Empty (and a printed note) when the trace has no device streams, as
  on a CPU."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[0], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in e.get("args", {}).get("name", "")
                 and "/device:CPU" not in e["args"]["name"]}
  if not device_pids:
    names = sorted({e.get("args", {}).get("name", "") for e in events
                    if e.get("ph") == "M" and e.get("name") == "process_name"})
    print(f"no device events in the trace; its processes: {names}", flush=True)
  return [dict(name=e["name"], dur=float(e.get("dur", 0.0)), args=e.get("args", {}))
          for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]
