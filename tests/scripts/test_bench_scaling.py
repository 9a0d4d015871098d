"""scripts/bench_scaling.py's pieces: its scanned training loss equals the model's, its
chunked cross-entropy equals the plain one, and the report's efficiencies / longest lengths
are computed as documented (hand-made records; timings are never asserted)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.nn.lm import MambaLM
from tests.numerics import relative_error

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench_scaling  # noqa: E402


def _reference_loss(config, params_state, graphdef, ids):
  model = nnx.merge(graphdef, params_state)
  logits = model(ids[:, :-1])[..., :config.vocab_size]
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


# (loss, gradients) relative tolerances, float64 models: the attention layers take their
# softmax in float32 (nn/attention.py), which jit and remat may round differently.
TOLERANCES = {"Mamba2": (1e-13, 1e-11), "attention": (1e-6, 1e-5)}


@pytest.mark.parametrize("layer", ["Mamba2", "attention"])
def test_scanned_loss_and_grads_equal_the_model(layer):
  config = MambaConfig.tiny(layer=layer).replace(n_layer=3)
  if layer == "attention":
    config = config.replace(attn_layer_idx=(0, 1, 2))
  model = MambaLM(config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
  lm = bench_scaling.ScannedLM(config, jnp.float64, loss_chunk=8)  # 4 slices of 8 tokens
  stacked = lm.stack(nnx.state(model, nnx.Param))
  assert stacked["layers"]["norm"]["weight"][...].shape == (3, config.d_model)

  ref, ref_grads = jax.value_and_grad(
      lambda s: _reference_loss(config, s, graphdef, ids))(state)
  loss, grads = jax.jit(jax.value_and_grad(lm.loss))(stacked, ids[:, :-1], ids[:, 1:])
  loss_tol, grad_tol = TOLERANCES[layer]
  assert relative_error(loss, ref) < loss_tol
  ref_grads = lm.stack(ref_grads)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert relative_error(got, want) < grad_tol


def test_chunked_cross_entropy_masks_padding_and_matches_plain():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (2, 12, 5), jnp.float64)
  w = jax.random.normal(k2, (8, 5), jnp.float64)       # vocabulary 7 padded to 8
  targets = jax.random.randint(k3, (2, 12), 0, 7)
  plain = optax.softmax_cross_entropy_with_integer_labels(
      jnp.einsum("bld,vd->blv", x, w)[..., :7], targets).mean()
  for chunk in (12, 4, 3, 1):
    got = bench_scaling.chunked_cross_entropy(x, w, targets, 7, chunk)
    assert relative_error(got, plain) < 1e-12, chunk
  with pytest.raises(ValueError, match="loss_chunk"):  # 10 // 3 = 3 slices, 3 ∤ 10
    bench_scaling.chunked_cross_entropy(x[:, :10], w, targets[:, :10], 7, 3)


def test_summary_efficiency_and_longest():
  ok = lambda mesh, seq, rate, devices, batch, peak: dict(
      event="ok", model="mamba2", preset="p", mesh=mesh, seq=seq, devices=devices,
      batch=batch, tokens_per_s=rate, step_s=1.0, compile_s=2.0,
      peak_gib_per_device=[peak] * devices, timed=True)
  records = [
      ok("1x1x1", 8, 100.0, 1, 1, 3.0),
      ok("2x1x1", 8, 180.0, 2, 2, 3.0),     # 180 / (2 · 100) = 0.9
      ok("1x1x2", 8, 150.0, 2, 1, 2.0),     # 150 / (2 · 100) = 0.75
      dict(ok("1x1x2", 16, None, 2, 1, 3.5), timed=False),  # a search step: no rate
      dict(event="oom", model="mamba2", mesh="1x1x2", seq=32),
      dict(event="oom", model="mamba2", mesh="1x1x1", seq=16),
      dict(event="not_applicable", model="transformerpp", mesh="1x1x2", reason="attention"),
  ]
  summary = bench_scaling.summarize(records, ["1x1x1", "2x1x1", "1x1x2"],
                                    ["mamba2", "transformerpp"], cap=8)
  eff = {r["mesh"]: r["efficiency"] for r in summary["rows"]}
  assert eff == {"1x1x1": 1.0, "2x1x1": 0.9, "1x1x2": 0.75}
  per_device = {r["mesh"]: r["tokens_per_s_per_device"] for r in summary["rows"]}
  assert per_device["2x1x1"] == 90.0
  longest = {(r["model"], r["mesh"]): (r["longest"], r["stopped_by"], r["stopped_at"],
                                       r["peak_gib"]) for r in summary["longest"]}
  assert longest == {("mamba2", "1x1x1"): (8, "oom", 16, 3.0),
                     ("mamba2", "2x1x1"): (8, "cap", None, 3.0),  # reached cap = 8
                     ("mamba2", "1x1x2"): (16, "oom", 32, 3.5),
                     ("transformerpp", "1x1x2"): (None, "n/a: attention", None, None)}
  table = bench_scaling.markdown(summary, "test")
  assert "| mamba2 | 1x1x2 | 8 | 150 | 75 | 0.75 |" in table


def test_parse_mesh_rejects_bad_text():
  assert bench_scaling.parse_mesh("2x1x4") == (2, 1, 4)
  for bad in ("2x2", "0x1x1", "axbxc"):
    with pytest.raises(ValueError, match="DxTxS"):
      bench_scaling.parse_mesh(bad)


@pytest.mark.slow
def test_smoke_run_on_cpu_devices(tmp_path):
  """The whole script (--smoke) on 4 host CPU devices: every mesh trains, the report has a
  row per (mesh, length) and the search reaches its cap or an explained stop."""
  import json
  import os
  import subprocess
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "bench_scaling.py"), "--smoke", "--meshes",
       "1x1x1,1x2x2", "--max_seq", "256", "--search_meshes", "1x2x2", "--budget_s", "900",
       "--out_dir", str(tmp_path), "--tag", "smoke"],
      env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "smoke.json").read_text())
  rows = {(r["model"], r["mesh"], r["seq"]): r for r in result["rows"]}
  assert rows[("mamba2", "1x1x1", 64)]["efficiency"] == 1.0
  assert ("mamba2", "1x2x2", 64) in rows and ("transformerpp", "1x1x1", 64) in rows
  longest = {(r["model"], r["mesh"]): r for r in result["longest"]}
  assert longest[("mamba2", "1x2x2")]["longest"] >= 64
  assert (tmp_path / "smoke.md").exists()


def test_merge_takes_efficiencies_from_the_other_runs_baseline(tmp_path):
  """--merge: a mesh run beside a one-device run on other GPUs gets its efficiency from that
  run's 1x1x1 row; runs of different sizes are refused."""
  import json
  device = dict(count=2, kind="H", platform="gpu", versions=dict(jax="0"))
  def run(name, mesh, devices, tok_s, size="370m"):
    record = dict(model="mamba2", preset="p", mesh=mesh, devices=devices, batch=1, seq=8,
                  event="ok", tokens_per_s=tok_s, step_s=1.0, compile_s=1.0,
                  peak_gib_per_device=None)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(date="2026-01-01T00:00:00", device=device, size=size,
                                    meshes=[mesh], seqs=[8], search=[], records=[record])))
    return str(path)
  one, two = run("one", "1x1x1", 1, 100.0), run("two", "1x1x2", 2, 150.0)
  assert bench_scaling.merge([one, two], str(tmp_path), "merged") == 0
  rows = {r["mesh"]: r for r in json.loads((tmp_path / "merged.json").read_text())["rows"]}
  assert rows["1x1x2"]["efficiency"] == 0.75 and rows["1x1x1"]["efficiency"] == 1.0
  with pytest.raises(ValueError, match="one --size"):
    bench_scaling.merge([one, run("big", "1x1x2", 2, 1.0, size="1.4b")], str(tmp_path), "x")
