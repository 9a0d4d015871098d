"""decode_traffic_bound: the bytes a decoding step must move, checked by hand from shapes."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import decode_traffic_bound as bound  # noqa: E402
from mamba_jax.config import preset  # noqa: E402

BF16 = jnp.dtype(jnp.bfloat16)


def test_per_sequence_bytes_by_hand():
  # Mamba-2 130M: 24 layers, each an SSM state (24 heads x 64 x 128) and a conv state over
  # xBC (1536 + 2 * 128 channels, the last d_conv - 1 = 3 inputs), bf16; no attention.
  state, per_position = bound.per_sequence_bytes(preset("mamba2-130m"), BF16, BF16)
  assert per_position == 0
  assert state == 24 * (24 * 64 * 128 + 1792 * 3) * 2
  # Transformer++ 125M: 12 layers of keys and values (768 wide) per position, bf16; its only
  # constant part is each layer's int32 position counters (a scalar and one per row).
  state, per_position = bound.per_sequence_bytes(preset("transformerpp-125m"), BF16, BF16)
  assert (state, per_position) == (12 * 2 * 4, 12 * 2 * 768 * 2)


def test_step_bytes_and_bound():
  ssm, tpp = preset("mamba2-130m"), preset("transformerpp-125m")
  state, _ = bound.per_sequence_bytes(ssm, BF16, BF16)
  counters, kv = bound.per_sequence_bytes(tpp, BF16, BF16)
  # Prompt 10, gen 4: steps at contexts 10, 11, 12 read 11, 12, 13 positions (mean 12).
  assert bound.step_bytes(ssm, 1000, 3, 10, 4, BF16, BF16) == 1000 + 3 * 2 * state
  assert bound.step_bytes(tpp, 1000, 3, 10, 4, BF16, BF16) == 1000 + 3 * (2 * counters + kv * 12)
  with pytest.raises(ValueError, match="gen_len >= 2"):
    bound.step_bytes(ssm, 1000, 3, 10, 1, BF16, BF16)
  rows = [dict(model="mamba2-130m", batch=16, floor_ms_step=0.5),
          dict(model="transformerpp-125m", batch=16, floor_ms_step=2.0),
          dict(model="mamba2-1.3b", batch=16, floor_ms_step=1.0)]
  bound.add_bounds(rows)
  assert [r["bound_vs_transformer"] for r in rows] == [4.0, 1.0, None]


def test_annotate_measured(tmp_path):
  rows = [dict(model=m, batch=16, state_dtype=sd, prompt_len=2048, gen_len=128,
               decode_ms_step=ms, vs_transformer=v)
          for m, sd, ms, v in (("mamba2-130m", "bfloat16", 0.5, 2.0),
                               ("transformerpp-125m", "-", 1.0, 1.0))]
  rows.append(dict(model="mamba-130m", batch=16, state_dtype="bfloat16", error="OOM"))
  path = tmp_path / "gen.json"
  path.write_text(json.dumps(dict(dtype="bfloat16", rows=rows)))
  out = bound.annotate_measured(str(path))
  assert [r["model"] for r in out] == ["mamba2-130m", "transformerpp-125m"]
  floors = [r["floor_ms_step"] for r in out]
  assert out[0]["pct_of_floor"] == pytest.approx(100 * floors[0] / 0.5, abs=0.1)
  assert out[0]["bound_vs_transformer"] == pytest.approx(floors[1] / floors[0], abs=0.01)
  # The 2K-prompt bound at batch 16 (README's generation notes): below the 4x of PERF.md.
  assert 2.5 < out[0]["bound_vs_transformer"] < 2.8
