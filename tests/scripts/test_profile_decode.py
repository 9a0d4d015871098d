"""profile_decode's pure pieces: the option-set parser and the trace summary (hand-made trace)."""

import gzip
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import profile_decode  # noqa: E402


def test_parse_option_sets():
  sets = profile_decode.parse_option_sets("default;xla_a=false,xla_b=12;xla_c=name")
  assert sets == [{}, {"xla_a": False, "xla_b": 12}, {"xla_c": "name"}]
  with pytest.raises(ValueError, match="KEY=VALUE"):
    profile_decode.parse_option_sets("xla_a")


def test_device_kernel_times_sums_device_events_only(tmp_path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "gemm_fusion", "dur": 10.0},
      {"ph": "X", "pid": 1, "name": "gemm_fusion", "dur": 5.5},
      {"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 2.0},
      {"ph": "X", "pid": 2, "name": "gemm_fusion", "dur": 100.0},   # host: not counted
  ]
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  with gzip.open(run / "perfetto_trace.json.gz", "wt", encoding="utf-8") as f:
    json.dump({"traceEvents": events}, f)
  times, count = profile_decode.device_kernel_times(str(tmp_path))
  assert times == {"gemm_fusion": 15.5, "loop_fusion": 2.0}
  assert count == 3
  with pytest.raises(FileNotFoundError):
    profile_decode.device_kernel_times(str(tmp_path / "plugins" / "missing"))
