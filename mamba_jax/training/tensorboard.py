"""A TensorBoard scalar event writer with no dependency beyond the standard library.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord framing (length, masked CRC-32C of
the length, payload, masked CRC-32C of the payload) around serialized ``tensorflow.Event``
protocol buffers. Scalars need only a few fields, encoded here by hand:

  Event    1: wall_time (double)   2: step (int64)   3: file_version (string)   5: summary
  Summary  1: value (repeated)
  Value    1: tag (string)         2: simple_value (float)

This avoids depending on tensorflow / tensorboard / tensorboardX just to log scalars.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected.


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, *, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """A serialized ``Event`` with the given scalars (or the file-version header)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
  out += _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode())
                          + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  return out


def frame_record(payload: bytes) -> bytes:
  """TFRecord framing of one payload."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


class EventWriter:
  """Appends scalar summaries to a new event file in ``logdir``."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(frame_record(encode_event(0, time.time(), file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._file.write(frame_record(encode_event(step, time.time(), scalars=values)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
