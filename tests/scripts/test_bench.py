"""The pure pieces of the benchmark scripts: FLOP / byte counters, crossover, the report builder.

Timings are never asserted; the counters are checked against hand-computed values and against
PERF.md's anchors, and the report is built from a small hand-made results JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench_kernels  # noqa: E402
import bench_report  # noqa: E402
import bench_selective_scan  # noqa: E402
import bench_ssd  # noqa: E402
import bench_training  # noqa: E402


def test_ssd_cost_tiny_by_hand():
  # 2 tokens, N 1, Q 2, 1 head of dim 1, 1 group:
  #   FLOPs T.G.Q.N + T.H.(Q.P + 4.N.P) = 2.1.2.1 + 2.1.(2 + 4) = 4 + 12 = 16
  #   bytes: x and y 2.2 each, B and C 2.2 each, dt 2.4 -> forward 4 + 4 + 8 + 8 = 24
  #   backward: x, dy, dx (12), B, C, dB, dC (16), dt, ddt (16) -> 44 more
  cost = bench_kernels.ssd_cost(tokens=2, state=1, chunk=2, heads=1, head_dim=1, groups=1)
  assert cost == dict(fwd_flops=16, fwd_bwd_flops=48, fwd_bytes=24, fwd_bwd_bytes=68)


def test_ssd_floor_matches_perf_md_and_bench_ssd():
  # PERF.md: N = 128, 65,536 tokens, 32 x 64, chunk 256: 105 GFLOP, ~575 MB, floors 0.19 /
  # 0.48 ms; scripts/bench_ssd.py's floor_ms counts the same way.
  cost = bench_kernels.ssd_cost(65536, 128, 256)
  assert cost["fwd_flops"] == pytest.approx(105e9, rel=0.01)
  assert cost["fwd_bytes"] == pytest.approx(578e6, rel=0.01)
  fwd, fwd_bwd = bench_kernels.floor_ms(cost)
  assert fwd == pytest.approx(0.19, abs=0.005)
  assert fwd_bwd == pytest.approx(0.48, abs=0.01)
  assert (fwd, fwd_bwd) == pytest.approx(bench_ssd.floor_ms(65536, 128, 256))


def test_attention_cost_by_hand():
  # b 1, L 4, 1 head of dim 2, causal: Q.Kᵀ and P.V are 2.L.L.P = 64 FLOPs each, halved:
  # 64; backward 2.5x -> 224 in all. Tensors 4.2 bf16 = 16 bytes: q, k, v, o = 64;
  # backward q, k, v, o, do in, dq, dk, dv out = 128 more.
  cost = bench_kernels.attention_cost(1, 4, heads=1, head_dim=2)
  assert cost == dict(fwd_flops=64, fwd_bwd_flops=224, fwd_bytes=64, fwd_bwd_bytes=192)
  assert bench_kernels.attention_cost(1, 4, 1, 2, causal=False)["fwd_flops"] == 128


def test_selective_scan_floor_counts_exps():
  fl = bench_selective_scan.floor(tokens=4, d_inner=3, d_state=2, gate=False)
  # one exp per (token, channel, state); bytes u, delta, y (3.4.3.2) + B, C (2.4.2.2)
  assert fl["exps"] == 24
  assert fl["fwd_bytes"] == 3 * 4 * 3 * 2 + 4 * 2 * 2 * 2


def _row(op, impl, length, fwd_bwd, state=128):
  return dict(op=op, impl=impl, length=length, state=state if op == "ssd" else None,
              fwd_ms=fwd_bwd / 3, fwd_bwd_ms=fwd_bwd)


def test_crossover_is_the_start_of_the_last_winning_run():
  rows = [_row("attention", "cudnn", 512, 1.0), _row("attention", "cudnn", 1024, 2.0),
          _row("attention", "cudnn", 2048, 4.0), _row("attention", "cudnn", 4096, 8.0),
          _row("ssd", "x", 512, 0.5), _row("ssd", "x", 1024, 3.0),   # wins, then loses
          _row("ssd", "x", 2048, 3.0), _row("ssd", "x", 4096, 3.0),   # wins from 2048 on
          _row("ssd", "x", 2048, 0.1, state=64)]                        # other N: ignored
  assert bench_kernels.crossover(rows, "x") == 2048
  assert bench_kernels.crossover(rows, "missing") is None
  losing = [_row("attention", "cudnn", 512, 1.0), _row("ssd", "y", 512, 2.0)]
  assert bench_kernels.crossover(losing, "y") is None


def test_training_flops_per_token():
  # 6.N, plus 12 . layers . d . L for attention: 6.100 + 12.2.8.16 = 600 + 3072
  assert bench_training.train_flops_per_token(100, 2, 8, 16) == 3672
  assert bench_training.train_flops_per_token(100, 0, 0, 16) == 600
  row = bench_training.finish(dict(batch=2, step_ms=1000.0, flops_per_token=989e12 / 4,
                                   peak_bytes=2 ** 31), length=2)
  assert row["tokens_per_s"] == 4.0 and row["mfu"] == pytest.approx(1.0)
  assert row["peak_gib"] == 2.0


@pytest.mark.parametrize("fraction, inflate_plain, level", [
    (0.85, False, "plain"), (0.85, True, "chunked_loss"), (1e-9, False, "remat")])
def test_memory_auto_picks_the_first_level_that_fits(monkeypatch, fraction, inflate_plain,
                                                      level):
  """--memory auto: the plain step where XLA's estimate fits the device (a pretend 1 GiB
  limit on CPU), else the chunked loss where that fits, else remat + the chunked loss; the
  same first loss either way."""
  real = bench_training.compile_with_bytes
  calls = []

  def estimate(step_fn, *args):  # a plain step (the first compiled) of 1000x its size
    compiled, size = real(step_fn, *args)
    calls.append(size)
    return compiled, size * (1000 if inflate_plain and len(calls) == 1 else 1)

  monkeypatch.setattr(bench_training, "compile_with_bytes", estimate)
  monkeypatch.setattr(bench_training, "device_limit_bytes", lambda: 2 ** 30)
  monkeypatch.setattr(bench_training, "PLAIN_MEMORY_FRACTION", fraction)
  row = bench_training.jax_case("mamba2-130m", 32, 64, 1, 0, True, "float32", "auto", 16)
  assert row["remat"] is (level == "remat")
  assert row["loss_chunk"] == (0 if level == "plain" else 16)
  assert 0 < row["plain_estimate_gib"] < (1000 if inflate_plain else 1)
  assert (level == "plain") == ("chunked_loss_estimate_gib" not in row)
  np.testing.assert_allclose(row["loss_first"], np.log(256), rtol=0.05)


def test_auto_choices_reads_the_impl_log():
  log = ("I1122 impl.py:44] ssd: impl='auto' resolved to 'chunked' on gpu sm_90\n"
         "I1122 impl.py:44] ssd: impl='auto' resolved to 'chunked' on gpu sm_90\n")
  assert bench_training.auto_choices(log) == ["ssd=chunked (gpu sm_90)"]


FAKE = {
    "mode": "reduced",
    "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "cpu_count": 16,
            "date": "2026-11-22T10:00:00+00:00", "versions": {"jax": "0.11.2"}},
    "elapsed_s": 300.0,
    "sections": {
        "kernels": {"status": "ok", "wall_s": 100.0, "limit_s": 150.0, "data": {
            "device": "H100", "heads": 32, "head_dim": 64, "groups": 1,
            "args": {"tokens": 65536, "chunk": 256, "reps": 10, "inner": 2, "state": 128,
                     "states_length": 2048, "s6_tokens": 65536},
            "rows": [dict(_row("ssd", "pallas", 2048, 3.0), batch=32, fwd_floor_pct=10.0,
                          fwd_bwd_floor_pct=12.5),
                     dict(_row("ssd", "triton", 2048, 6.0), batch=32, fwd_floor_pct=5.0,
                          fwd_bwd_floor_pct=6.25),
                     dict(_row("attention", "cudnn", 2048, 7.5), batch=32,
                          fwd_floor_pct=20.0, fwd_bwd_floor_pct=30.0),
                     dict(_row("ssd", "pallas", 2048, 2.0, state=16), batch=32,
                          fwd_floor_pct=1.0, fwd_bwd_floor_pct=1.0),
                     dict(op="s6", impl="chunked", length=2048, batch=32, state=16,
                          d_inner=1536, fwd_ms=1.0, fwd_bwd_ms=4.0, fwd_floor_pct=40.0,
                          fwd_bwd_floor_pct=20.0)],
            "crossover": {"pallas": {"fwd": 2048, "fwd_bwd": 2048}},
            "errors": [], "skipped": ["ssd pallas L=32768 N=128"]}},
        "training": {"status": "ok", "wall_s": 90.0, "limit_s": 150.0, "data": {
            "rows": [dict(model="mamba2-130m", impl="jax", length=2048, batch=16,
                          params=129e6, step_ms=123.4, tokens_per_s=265555.0, mfu=0.21,
                          peak_gib=20.5, compile_s=30.0, jax_vs_torch=1.25,
                          ops_impl=["ssd=chunked (gpu sm_90)"]),
                     dict(model="mamba2-130m", impl="torch", length=2048, batch=16,
                          params=129e6, step_ms=154.3, tokens_per_s=212444.0, mfu=0.17,
                          peak_gib=30.9, compile_s=5.0)],
            "errors": [{"case": "mamba-130m:2048:jax", "error": "out of memory"}],
            "skipped": []}},
        "generation": {"status": "timeout", "wall_s": 80.0, "limit_s": 80.0,
                       "log_tail": "compiling\nkilled", "data": {
            "device": "H100", "dtype": "bfloat16",
            "args": {"prompt_len": 2048, "gen_len": 128, "reps": 2},
            "rows": [dict(model="mamba2-130m", params_m=128.9, batch=1, prefill_ms=10.0,
                          decode_ms_step=0.75, decode_tok_s=1333.0, e2e_tok_s=900.0,
                          vs_transformer=1.5, state_mib=18.1, decode_prog_mib=300.0,
                          peak_mib=1000.0),
                     dict(model="transformerpp-125m", batch=64, error="OOM")],
            "state_vs_context": [{"context": 2048, "mamba2-130m": 18.1,
                                  "mamba2-130m_measured": 18.2}]}},
        "long_context": {"status": "ok", "wall_s": 60.0, "limit_s": 100.0, "data": {
            "args": {"remat": True, "loss_chunk": 8192, "start": 262144,
                     "max_length": 262144, "min_length": 8192},
            "rows": [dict(model="mamba2-130m", mode="train", longest=262144,
                          capped_by="max_length", attempts=[dict(
                              length=262144, ok=True, step_s=3.5, peak_gib=41.0)]),
                     dict(model="transformerpp-125m", mode="train", longest=None,
                          capped_by="time budget", attempts=[])]}},
        "cpu": {"status": "skipped", "reason": "driver deadline"},
    },
}


def test_report_from_a_fake_results_json(tmp_path):
  written = bench_report.build(json.loads(json.dumps(FAKE)), str(tmp_path / "bench.md"),
                               str(tmp_path))
  md = (tmp_path / "bench.md").read_text()
  assert md.startswith(bench_report.TITLE)
  for text in ("NVIDIA H100 80GB HBM3", "| ssd | pallas | 2K | 32 | 1.00 | 3.00 | 10.00 | "
               "12.50 | 2.00 | 2.00 | 2.50 |",      # vs Triton 6/3, vs attention 7.5/3
               "pallas: fwd 2K, fwd+bwd 2K", "| mamba2-130m | jax | bfloat16 | plain | 2K | 16 | 129.00 |",
               "1.25", "mamba-130m:2048:jax: out of memory", "ssd pallas L=32768 N=128",
               "Status **timeout**", "killed", "transformerpp-125m batch 64: OOM",
               "≥ 256K (search capped by max_length)", "256K: ok, 3.50 s/step, 41.00 GiB",
               "| 2K | 18.10 | 18.20 |", "driver deadline"):
    assert text in md, text
  pngs = sorted(os.path.basename(p) for p in written if p.endswith(".png"))
  assert pngs == ["bench_generation.png", "bench_kernels.png", "bench_training.png"]
  assert "![kernels](bench_kernels.png)" in md


def test_report_cli_rebuilds_from_saved_json(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps({**FAKE, "sections": {"cpu": {
      "status": "ok", "wall_s": 20.0, "limit_s": 60.0, "data": {"env": {"cpu_count": 2},
      "rows": [dict(model="mamba-130m", params=1.2e6, batch=8, length=256, compile_s=9.5,
                    step_ms=250.0, tokens_per_s=8192.0)]}}}}))
  subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), "--json",
                  str(path), "--md", str(tmp_path / "out.md"), "--png_dir", str(tmp_path)],
                 check=True, capture_output=True)
  md = (tmp_path / "out.md").read_text()
  assert "| mamba-130m | 1.20 | 9.50 | 250.00 | 8,192.00 |" in md


@pytest.mark.slow
def test_bench_all_smoke_runs_every_section(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(REPO / "scripts" / "bench_all.py"), "--smoke", "--out",
                  str(tmp_path)], check=True, env=env, capture_output=True, timeout=900)
  results = json.loads((tmp_path / "bench_results.json").read_text())
  assert {n: s["status"] for n, s in results["sections"].items()} == dict.fromkeys(
      ("kernels", "training", "generation", "long_context", "cpu"), "ok")
  assert (tmp_path / "benchmarks.md").exists()


def test_merge_keeps_later_sections_and_the_gpu_env():
  gpu = {"mode": "full", "env": {"gpu": "H100"}, "elapsed_s": 10.0, "sections": {
      "kernels": {"status": "ok", "data": {"rows": [1]}},
      "cpu": {"status": "skipped"}}}
  cpu = {"mode": "full", "env": {"gpu": None}, "elapsed_s": 5.0, "sections": {
      "cpu": {"status": "ok", "data": {"rows": [2]}},
      "kernels": {"status": "skipped"}}}
  merged = bench_report.merge([cpu, gpu])
  assert merged["env"]["gpu"] == "H100" and merged["elapsed_s"] == 15.0
  assert merged["sections"]["kernels"]["data"] == {"rows": [1]}  # skipped does not replace
  assert merged["sections"]["cpu"]["data"] == {"rows": [2]}
  with pytest.raises(ValueError, match="no results"):
    bench_report.merge([])


def test_report_computes_the_crossover_of_a_section_cut_short(tmp_path):
  data = json.loads(json.dumps(FAKE["sections"]["kernels"]["data"]))
  del data["crossover"]  # the section was killed before it wrote it
  md = "\n".join(bench_report.kernels_md(data))
  assert "pallas: fwd 2K, fwd+bwd 2K" in md and "triton: fwd 2K, fwd+bwd 2K" in md


def test_chunked_loss_equals_the_full_cross_entropy():
  import jax
  import optax
  from flax import nnx

  import bench_long_context
  from mamba_jax.config import MambaConfig
  from mamba_jax.nn.lm import MambaLM
  from tests.numerics import assert_close

  config = MambaConfig.tiny("Mamba2")
  model = MambaLM(config, rngs=nnx.Rngs(0))
  hidden = jax.random.normal(jax.random.key(0), (1, 32, config.d_model))
  targets = jax.random.randint(jax.random.key(1), (1, 32), 0, config.vocab_size)
  logits = model.logits_from_hidden(hidden)[..., :config.vocab_size]
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  got = jax.jit(lambda h: bench_long_context.chunked_loss(model, h, targets, 8))(hidden)
  assert_close(got, want, rtol=1e-6, what="chunked loss")
  # a length that is not a multiple of the chunk: the padded positions are not scored
  short = optax.softmax_cross_entropy_with_integer_labels(logits[:, :10], targets[:, :10])
  assert_close(bench_long_context.chunked_loss(model, hidden[:, :10], targets[:, :10], 4),
               short.mean(), rtol=1e-6, what="chunked loss, padded")


@pytest.mark.slow  # four compilations of a hybrid model's gradient: about a minute on 2 cores
def test_long_context_loss_and_remat_match_the_model():
  import jax
  import optax
  from flax import nnx

  import bench_long_context
  from mamba_jax.config import MambaConfig
  from mamba_jax.nn.lm import MambaLM
  from tests.numerics import assert_close

  config = MambaConfig.tiny("hybrid")  # Mamba-2, attention, Mamba-2, with MLPs
  model = MambaLM(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = jax.random.randint(jax.random.key(1), (1, 33), 0, config.vocab_size)
  inputs, targets = ids[:, :-1], ids[:, 1:]

  def reference(p):
    logits = nnx.merge(graphdef, p, rest)(inputs)[..., :config.vocab_size]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def chunked(p, remat):
    m = nnx.merge(graphdef, p, rest)
    return bench_long_context.chunked_loss(m, m.hidden_states(inputs, remat=remat), targets,
                                           chunk=8)

  want, want_grads = jax.jit(jax.value_and_grad(reference))(params)
  for remat in (False, True, 2):
    got, grads = jax.jit(jax.value_and_grad(chunked), static_argnums=1)(params, remat)
    assert_close(got, want, rtol=1e-6, what=f"loss, remat={remat}")
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      assert_close(g, w, rtol=1e-5, what=f"gradient, remat={remat}")



def test_section_from_separate_runs_joins_rows_and_contexts(tmp_path):
  """--section: runs of one bench script (e.g. ~130M and --large generation) become one
  section; runs of different devices are refused."""
  def run(name, model, device="H100", reps=2):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(
        device=device, env={"gpu": device}, args={"reps": reps}, elapsed_s=10.0,
        rows=[{"model": model, "batch": 1}],
        state_vs_context=[{"context": 2048, model: 1.0}, {"context": 4096, model: 2.0}])))
    return str(path)
  section = bench_report.section_from_runs([run("a", "m130", reps=2), run("b", "m1p4", reps=1)])
  data = section["data"]
  assert [r["model"] for r in data["rows"]] == ["m130", "m1p4"]
  assert data["state_vs_context"][1] == {"context": 4096, "m130": 2.0, "m1p4": 2.0}
  assert data["args"]["reps"] == "1 / 2" and section["wall_s"] == 20.0
  with pytest.raises(ValueError, match="one device"):
    bench_report.section_from_runs([run("c", "x"), run("d", "y", device="H200")])


def test_joined_ssd_runs_name_their_run_and_keep_notes(tmp_path):
  """The ssd section of several bench_ssd.py runs: a `run` column, and each run's note."""
  rows = [dict(impl="triton", length=4096, state=128, batch=16, fwd_ms=1.5, fwd_bwd_ms=6.0,
               fwd_vs_triton=1.0, fwd_bwd_vs_triton=1.0)]
  paths = []
  for name, note in (("a", None), ("b", "copied from the log")):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(device="H100", jax="0.11.2", tokens=65536, chunk=256,
                                    rows=rows, **({"note": note} if note else {}))))
    paths.append(str(path))
  text = "\n".join(bench_report.ssd_md(bench_report.section_from_runs(paths)["data"]))
  assert "- b.json: copied from the log" in text and "a.json:" not in text
  assert "| run | impl |" in text and "| a.json | triton | 4K |" in text


def test_joined_training_rows_name_their_run():
  """A --section of several runs gets a leading `run` column; one run's section does not."""
  row = dict(model="m", impl="jax", length=2048, batch=16, params=1e8, step_ms=100.0,
             tokens_per_s=1e5, mfu=0.1, compile_s=5.0)
  joined = "\n".join(bench_report.training_md({"rows": [dict(row, run="a.json")]}))
  assert "| run | model |" in joined and "| a.json | m |" in joined
  assert "| run |" not in "\n".join(bench_report.training_md({"rows": [row]}))


def test_a_rerun_case_replaces_its_earlier_row():
  """Training rows of the same case (model, length, impl, batch, memory) from a later run
  replace the earlier ones, in their place; other cases stay; a remat fraction is labelled."""
  row = dict(model="m", impl="jax", length=2048, batch=16, params=1e8, step_ms=100.0,
             tokens_per_s=1e5, mfu=0.1, compile_s=5.0, remat=False, loss_chunk=0)
  rows = [dict(row, run="old.json"), dict(row, model="t", run="old.json"),
          dict(row, tokens_per_s=2e5, run="new.json"),
          dict(row, remat=0.5, loss_chunk=8192, run="new.json")]
  md = "\n".join(bench_report.training_md({"rows": rows}))
  lines = [ln for ln in md.splitlines() if ln.startswith("| new.json") or
           ln.startswith("| old.json")]
  assert [ln.split(" | ")[:2] for ln in lines] == [["| new.json", "m"], ["| old.json", "t"],
                                                  ["| new.json", "m"]]
  assert "200,000.00" in lines[0] and "remat 50 % (asked), loss in 8192" in lines[2]


def test_bench_mixer_ops_smoke(tmp_path):
  """The script end to end on CPU (tiny shapes, kernels interpreted): a row per op and impl."""
  out = tmp_path / "mixer_ops.json"
  subprocess.run([sys.executable, str(REPO / "scripts" / "bench_mixer_ops.py"), "--smoke",
                  "--models", "mamba2-130m", "--out", str(out)], check=True, cwd=REPO,
                 env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["op"], r["impl"]) for r in rows] == [
      ("conv", "xla"), ("conv", "pallas_interpret"), ("norm", "xla"),
      ("norm", "pallas_interpret")]
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)


def test_mixer_ops_section_renders_its_rows():
  rows = [dict(model="mamba2-130m", op="conv", channels=1792, impl=impl, tokens=32768,
               fwd_ms=0.2, fwd_bwd_ms=ms, fwd_floor_pct=37.0, fwd_bwd_floor_pct=20.0,
               fwd_bwd_speedup=0.96 / ms) for impl, ms in (("xla", 0.96), ("pallas", 0.53))]
  md = "\n".join(bench_report.mixer_ops_md({"device": "H100", "rows": rows}))
  assert "32768 tokens" in md and "| mamba2-130m | conv | 1792 | pallas |" in md


def test_s6_section_renders_bench_selective_scan_rows(tmp_path):
  """--section s6=...: bench_selective_scan.py's JSON (no bench_all env) becomes a table with
  the ratios to the CUDA kernel that the script computed."""
  rows = [dict(impl="cuda", d_inner=2048, length=1024, batch=64, fwd_ms=2.0, fwd_bwd_ms=10.0,
               fwd_floor_pct=25.0, fwd_bwd_floor_pct=9.0, fwd_speedup_vs_cuda=1.0,
               fwd_bwd_speedup_vs_cuda=1.0),
          dict(impl="pallas_mosaic", d_inner=2048, length=1024, batch=64, fwd_ms=1.0,
               fwd_bwd_ms=8.0, fwd_floor_pct=50.0, fwd_bwd_floor_pct=11.25,
               fwd_speedup_vs_cuda=2.0, fwd_bwd_speedup_vs_cuda=1.25)]
  path = tmp_path / "s6.json"
  path.write_text(json.dumps(dict(device="H100", tokens=65536, d_state=16, gate=False,
                                  interpret=False, rows=rows)))
  results = {**json.loads(json.dumps(FAKE)), "sections": {
      "s6": bench_report.section_from_runs([str(path)])}}
  written = bench_report.build(results, str(tmp_path / "bench.md"), str(tmp_path))
  md = (tmp_path / "bench.md").read_text()
  assert "## Mamba-1 selective scan (S6) against mamba_ssm's CUDA kernel" in md
  assert "![s6](bench_s6.png)" in md and str(tmp_path / "bench_s6.png") in written
  assert "| pallas_mosaic | 2048 | 1K | 64 | 1.00 | 8.00 | 2.00 | 1.25 | 50.00 | 11.25 |" in md


def test_parse_auto_as():
  import bench_timing
  assert bench_timing.parse_auto_as("") == {}
  assert bench_timing.parse_auto_as("ssd_gpu_bwd=shared_w,causal_conv1d=xla") == {
      "ssd_gpu_bwd": "shared_w", "causal_conv1d": "xla"}
  with pytest.raises(ValueError, match="op=impl pairs"):
    bench_timing.parse_auto_as("ssd_gpu_bwd")


def test_decode_bound_section():
  data = {"args": {"prompt_len": 2048, "gen_len": 128, "dtype": "bfloat16",
                   "state_dtype": "bfloat16"}, "copy_bytes_per_s": 3.0e12,
          "rows": [dict(model="mamba2-130m", batch=16, step_mib=541.9, floor_ms_step=0.1894,
                        bound_vs_transformer=2.63)],
          "measured": [dict(source="gen.json", model="mamba2-130m", batch=16,
                            state_dtype="bfloat16", decode_ms_step=0.6867, floor_ms_step=0.1894,
                            pct_of_floor=27.6, vs_transformer=1.75, bound_vs_transformer=2.63)]}
  md = "\n".join(bench_report.decode_bound_md(data))
  assert "3.0 TB/s" in md and "| mamba2-130m | 16 | 541.90 | 0.19 | 2.63 |" in md
  assert "| gen.json | mamba2-130m | 16 | bfloat16 | 0.69 | 0.19 | 27.60 | 1.75 | 2.63 |" in md
