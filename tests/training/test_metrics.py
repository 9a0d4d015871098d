"""Metrics: JSONL records, TensorBoard event framing (CRC-32C vectors, decoded back), progress."""

import io
import os
import struct

import pytest

from mamba_jax.training import metrics, tensorboard


def test_crc32c_known_vectors():
  # RFC 3720 (iSCSI) appendix B.4 test vectors and the usual "123456789" check value.
  assert tensorboard.crc32c(b"123456789") == 0xE3069283
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
  assert tensorboard.crc32c(b"\xff" * 32) == 0x62A8AB43


def _read_varint(buf, pos):
  shift = value = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(buf):
  """Protocol-buffer wire format → [(field, value)], values raw bytes / ints."""
  pos, out = 0, []
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    out.append((field, value))
  return out


def _records(path):
  data = open(path, "rb").read()
  pos, out = 0, []
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == tensorboard.masked_crc32c(
        data[pos:pos + 8])
    payload = data[pos + 12:pos + 12 + n]
    assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == (
        tensorboard.masked_crc32c(payload))
    out.append(payload)
    pos += 16 + n
  return out


def test_metrics_writer_jsonl_and_events(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(3, {"loss": 1.5, "mfu": None}, split="train")
  writer.write(7, {"accuracy": 0.25}, split="eval")
  writer.close()
  records = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in records] == [(3, "train"), (7, "eval")]
  assert records[0]["loss"] == 1.5 and "mfu" not in records[0]
  (event_file,) = os.listdir(tmp_path / "tensorboard")
  events = [dict(_fields(p)) for p in _records(tmp_path / "tensorboard" / event_file)]
  assert events[0][3] == b"brain.Event:2"
  assert [e[2] for e in events[1:]] == [3, 7]
  value = dict(_fields(dict(_fields(events[2][5]))[1]))
  assert value[1] == b"eval/accuracy" and struct.unpack("<f", value[2])[0] == 0.25


def test_mfu_unknown_device_is_none():
  # The CPU has no listed peak: MFU is not made up.
  if metrics.peak_flops() is None:
    assert metrics.model_flops_utilization(10**6, 1e5) is None
  else:
    pytest.skip("device with a known peak")


def test_progress_eta_and_plain_lines():
  stream = io.StringIO()  # not a tty: log lines, no bar
  progress = metrics.Progress(100, 20, stream=stream)
  assert progress.eta_seconds(20) is None
  progress._start -= 10.0  # pretend 10 s for 40 steps → 0.25 s/step
  assert progress.eta_seconds(60) == pytest.approx(10.0, rel=0.01)
  progress.update(60, "loss 1.0", force=True)
  assert stream.getvalue() == ""
