"""pytorch_model.bin without torch: the allow-listed reader and the writer.

The reader is checked on a file torch.save really wrote (a fixture), on our writer's files,
and on hostile or malformed archives. That torch.load(weights_only=True) reads our writer's
files (shared storages and mmap included) was checked with torch 2.13.0 when this module
was written; torch is not in the test environment.
"""

import io
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mamba_jax.convert import torch_pickle
from mamba_jax.convert.hf_layout import read_safetensors
from mamba_jax.convert.torch_pickle import load_torch_state_dict, read_torch_zip, write_torch_zip

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def test_reads_a_file_torch_wrote():
  state = read_torch_zip(FIXTURES / "mamba1_tied_residual_fp32_mamba_ssm" / "pytorch_model.bin")
  hf = read_safetensors(FIXTURES / "mamba1_tied_residual_fp32" / "model.safetensors")
  assert set(state) == {k.replace("embeddings", "embedding") for k in hf} | {"lm_head.weight"}
  for key, value in hf.items():
    ours = state[key.replace("embeddings", "embedding")]
    if key == "backbone.embeddings.weight":  # padded from 37 to 40 rows by zeros
      np.testing.assert_array_equal(ours[37:], 0)
      ours = ours[:37]
    assert ours.dtype == value.dtype and ours.shape == value.shape, key
    np.testing.assert_array_equal(ours, value, err_msg=key)
  # The tied head shares the embedding's storage in the file.
  np.testing.assert_array_equal(state["lm_head.weight"], state["backbone.embedding.weight"])


def test_load_without_torch_uses_the_restricted_reader():
  path = FIXTURES / "mamba2_ngroups2_mamba_ssm" / "pytorch_model.bin"
  a, b = load_torch_state_dict(path), read_torch_zip(path)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_write_then_read_is_exact(tmp_path):
  rng = np.random.default_rng(0)
  shared = rng.standard_normal((5, 3)).astype(np.float32)
  tensors = {
      "f32": rng.standard_normal((4, 3, 2)).astype(np.float32),
      "f64": rng.standard_normal((7,)),
      "f16": rng.standard_normal((2, 2)).astype(np.float16),
      "bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
      "i64": np.array([2**40, -3, 0], np.int64),
      "bool": np.array([[True, False]]),
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
      "transposed": rng.standard_normal((3, 4)).astype(np.float32).T,
      "tied_a": shared,
      "tied_b": shared,
  }
  path = tmp_path / "pytorch_model.bin"
  write_torch_zip(path, tensors)
  back = read_torch_zip(path)
  assert list(back) == list(tensors)
  for key, value in tensors.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  with zipfile.ZipFile(path) as archive:
    storages = [n for n in archive.namelist() if "/data/" in n]
    assert len(storages) == len(tensors) - 1  # tied_a and tied_b share one storage
    for info in archive.infolist():  # torch.save's 64-byte alignment of storage data
      if "/data/" in info.filename:
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        assert start % 64 == 0, info.filename


class _Exploit:
  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def _archive(tmp_path: Path, payload: bytes, extra: dict[str, bytes] | None = None) -> Path:
  path = tmp_path / "evil.bin"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    for name, data in (extra or {}).items():
      archive.writestr(f"archive/{name}", data)
  return path


# Protocol 2 names builtins "__builtin__" and os.system "posix.system" (on Linux).
@pytest.mark.parametrize("func,name", [(os.system, r"\w+\.system"), (eval, r"__builtin__\.eval"),
                                       (getattr, r"__builtin__\.getattr")])
def test_refuses_other_globals(tmp_path, func, name):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"w": _Exploit(func, f"touch {marker}")}, protocol=2)
  with pytest.raises(ValueError, match=rf"refusing to unpickle the global {name}:"):
    read_torch_zip(_archive(tmp_path, payload))
  assert not marker.exists()


def test_refuses_a_view_past_its_storage(tmp_path):
  body = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + torch_pickle._op_str("w")
          + torch_pickle._tensor_pickle("0", "FloatStorage", 4, (3, 3)) + pickle.SETITEM
          + pickle.STOP)
  path = _archive(tmp_path, body, {"data/0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(ValueError, match="reads past its storage"):
    read_torch_zip(path)


def test_refuses_a_short_or_missing_storage(tmp_path):
  body = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + torch_pickle._op_str("w")
          + torch_pickle._tensor_pickle("0", "FloatStorage", 4, (4,)) + pickle.SETITEM
          + pickle.STOP)
  with pytest.raises(ValueError, match="not 4 elements"):
    read_torch_zip(_archive(tmp_path, body, {"data/0": b"\0" * 12}))
  (tmp_path / "evil.bin").unlink()
  with pytest.raises(ValueError, match="missing from the archive"):
    read_torch_zip(_archive(tmp_path, body))


def test_refuses_non_state_dicts_and_legacy_files(tmp_path):
  with pytest.raises(ValueError, match="not a dict of tensors"):
    read_torch_zip(_archive(tmp_path, pickle.dumps([1, 2], protocol=2)))
  (tmp_path / "evil.bin").unlink()
  with pytest.raises(ValueError, match="not a tensor"):
    read_torch_zip(_archive(tmp_path, pickle.dumps({"step": 3}, protocol=2)))
  legacy = tmp_path / "legacy.bin"
  buffer = io.BytesIO()
  pickle.dump(0x1950a86a20f9469cfc6c, buffer, protocol=2)  # torch's legacy magic number
  legacy.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="not a zip-format torch file"):
    read_torch_zip(legacy)
  with pytest.raises(FileNotFoundError):
    read_torch_zip(tmp_path / "absent.bin")


def test_writer_rejects_unsupported_dtypes(tmp_path):
  with pytest.raises(ValueError, match="complex64"):
    write_torch_zip(tmp_path / "x.bin", {"c": np.zeros(2, np.complex64)})
