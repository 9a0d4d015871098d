"""Builds docs/benchmarks.md and the bench_*.png figures from a bench_all.py results JSON.

  python scripts/bench_report.py --json bench_results.json [more.json ...] \
      --md docs/benchmarks.md --png_dir docs

The report is a function of the JSON alone (every number in it comes from there), so it can
be rebuilt from saved results; figures need matplotlib (skipped with a note without it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable, Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels  # noqa: E402  (its counters; imports no jax)

TITLE = "# mamba_jax benchmarks"


def fmt(value: Any, digits: int = 2) -> str:
  """A table cell: '-' for None / NaN, ints as they are, floats to ``digits`` places."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  if isinstance(value, bool) or isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  return str(value)


def length_label(length: int) -> str:
  return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
  header = list(header)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |"
            for row in rows]
  return lines


def _ratio(a, b):
  ok = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0
  return b / a if ok(a) and ok(b) else None


def kernels_md(data: dict) -> list[str]:
  rows = data.get("rows", [])
  out = [f"{data.get('device', '?')}; {fmt(data['args'].get('tokens'))} tokens per case "
         f"(batch x length) for SSD and attention, {data.get('heads')} heads x "
         f"{data.get('head_dim')}, groups {data.get('groups')}, chunk "
         f"{data['args'].get('chunk')}, bf16; medians of {data['args'].get('reps')} x "
         f"{data['args'].get('inner')} calls after warm-up. % floor = the roofline floor "
         "(max(bytes / 3.0 TB/s, FLOPs / 740 TFLOP/s), fewest bytes, FLOPs as in "
         "scripts/bench_kernels.py) over the time. Speedups are baseline ms / ms.", ""]
  ssd = [r for r in rows if r["op"] in ("ssd", "attention")]
  state = data["args"].get("state")
  lengths = sorted({r["length"] for r in ssd if r["op"] == "attention" or r["state"] == state})

  def find(op, impl, length, n=None):
    hit = [r for r in rows if r["op"] == op and r["impl"] == impl and r["length"] == length
           and (n is None or r.get("state") == n)]
    return hit[0] if hit else None

  body = []
  for length in lengths:
    att = find("attention", "cudnn", length)
    for r in [r for r in ssd if r["length"] == length and (r["op"] == "attention"
                                                           or r["state"] == state)]:
      tri = find("ssd", "triton", length, r.get("state")) if r["op"] == "ssd" else None
      body.append([r["op"], r["impl"], length_label(length), r["batch"], r["fwd_ms"],
                   r["fwd_bwd_ms"], r["fwd_floor_pct"], r["fwd_bwd_floor_pct"],
                   _ratio(r["fwd_ms"], tri and tri["fwd_ms"]),
                   _ratio(r["fwd_bwd_ms"], tri and tri["fwd_bwd_ms"]),
                   _ratio(r["fwd_bwd_ms"], att and att["fwd_bwd_ms"])
                   if r["op"] == "ssd" else None])
  if body:
    out += [f"### SSD (N = {state}) and causal attention against sequence length", ""]
    out += table(["op", "impl", "L", "batch", "fwd ms", "fwd+bwd ms", "fwd % floor",
                  "fwd+bwd % floor", "fwd vs Triton", "fwd+bwd vs Triton",
                  "fwd+bwd vs cuDNN attention"], body)
  cross = data.get("crossover") or bench_kernels.crossovers(
      rows, sorted({r["impl"] for r in rows if r["op"] == "ssd"}), state)
  if cross and any(r["op"] == "attention" for r in rows):
    out += ["", "Crossover (the shortest measured length from which SSD is faster than cuDNN "
            "attention at every longer one): " + "; ".join(
                f"{impl}: fwd {length_label(c['fwd']) if c['fwd'] else 'none'}, fwd+bwd "
                f"{length_label(c['fwd_bwd']) if c['fwd_bwd'] else 'none'}"
                for impl, c in cross.items()) + "."]
  sweep_len = data["args"].get("states_length")
  sweep = sorted((r for r in rows if r["op"] == "ssd" and r["length"] == sweep_len),
                 key=lambda r: (r["impl"], r["state"]))
  if len({r["state"] for r in sweep}) > 1:
    out += ["", f"### SSD against state size N (L = {length_label(sweep_len)})", ""]
    out += table(["impl", "N", "fwd ms", "fwd+bwd ms", "fwd % floor", "fwd+bwd % floor"],
                 [[r["impl"], r["state"], r["fwd_ms"], r["fwd_bwd_ms"], r["fwd_floor_pct"],
                   r["fwd_bwd_floor_pct"]] for r in sweep])
  s6 = [r for r in rows if r["op"] == "s6"]
  if s6:
    out += ["", f"### Mamba-1 selective scan (S6), d_inner {s6[0].get('d_inner')}, d_state "
            f"{s6[0].get('state')}, {fmt(data['args'].get('s6_tokens'))} tokens (floor: "
            "bytes / 3.0 TB/s or one exp per (token, channel, state) at the special-function "
            "rate)", ""]
    out += table(["impl", "L", "batch", "fwd ms", "fwd+bwd ms", "fwd % floor",
                  "fwd+bwd % floor"],
                 [[r["impl"], length_label(r["length"]), r["batch"], r["fwd_ms"],
                   r["fwd_bwd_ms"], r["fwd_floor_pct"], r["fwd_bwd_floor_pct"]] for r in s6])
  return out + _problems(data)


def _with_run(rows: list[dict], headers: list[str], cells: list[list]
              ) -> tuple[list[str], list[list]]:
  """(headers, cells) with a first "run" column (the JSON a row came from) when the section
  joins several runs (``--section``), unchanged otherwise."""
  if not any("run" in r for r in rows):
    return headers, cells
  return ["run", *headers], [[r.get("run", "-"), *c] for r, c in zip(rows, cells)]


def latest_rows(rows: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
  """``rows`` less those measured again later (in order) with the same ``key``: a case rerun
  after a change replaces its earlier row, in the earlier row's place (runs with other
  ``--auto_as`` choices are other cases)."""
  last = {key(r): r for r in rows}
  seen, out = set(), []
  for r in rows:
    if key(r) not in seen:
      seen.add(key(r))
      out.append(last[key(r)])
  return out


def training_md(data: dict) -> list[str]:
  rows = latest_rows(data.get("rows", []), lambda r: (
      r["model"], r["length"], r["impl"], r.get("batch"), r.get("remat"), r.get("loss_chunk"),
      r.get("auto_as")))
  out = ["Random tokens, float32 parameters, `compute` dtype activations, AdamW (β 0.9 / 0.95, weight decay "
         "0.1, clip 1.0); median step of the timed steps after warm-up (the first step, "
         "compile included, is `compile s`). MFU = tokens/s · (6 · params + 12 · attention "
         "layers · d · L) / 989 TFLOP/s (dense bf16 H100 SXM). `torch` = mamba_ssm "
         "2.3.2.post1's MambaLMHeadModel (bf16 autocast, fused AdamW, Triton SSD; torch "
         "conv1d: no causal_conv1d extension, so not its fused mem-efficient path). Peak: "
         "`peak_bytes_in_use` (JAX) / `max_memory_allocated` (torch), each case in its own "
         "process. `memory`: `loss in N` = the LM head and loss taken N positions at a time "
         "(where XLA's memory estimate of the plain step exceeded 85 % of the device); `remat` "
         "= also each block rematerialized in the backward (where the chunked-loss step's "
         "estimate exceeded it too, or a step ran out of memory; `(asked)`: the run asked for "
         "it, without estimates; `remat 50 %`: that fraction of the blocks, spread evenly, "
         "asked). A case measured again in a later run (later in the report's command) "
         "replaces its earlier row.", ""]
  asked = lambda r: "" if r.get("plain_estimate_gib") is not None else " (asked)"
  share = lambda r: (f" {100 * r['remat']:.0f} %" if isinstance(r.get("remat"), float)
                     else "")
  memory = lambda r: (f"remat{share(r)}{asked(r)}, loss in {r['loss_chunk']}"
                      if r.get("remat")
                      else f"loss in {r['loss_chunk']}" if r.get("loss_chunk")
                      else "plain" if r["impl"] == "jax" else "-")
  out += table(*_with_run(
      rows, ["model", "impl", "compute", "memory", "L", "batch", "params (M)", "step ms",
             "tokens/s", "MFU %", "peak GiB", "compile s", "vs mamba_ssm",
             "SSM / attention path"],
      [[r["model"], r["impl"], r.get("dtype", "bfloat16"), memory(r),
        length_label(r["length"]), r["batch"],
        r["params"] / 1e6, r["step_ms"], r["tokens_per_s"], 100 * r["mfu"],
        r.get("peak_gib"), r["compile_s"], r.get("jax_vs_torch"),
        ", ".join((r.get("ops_impl") or [])
                  + ([f"auto as {r['auto_as']}"] if r.get("auto_as") else []))
        or (r.get("attention") or "-")]
       for r in rows]))
  return out + _problems(data)


def cpu_md(data: dict) -> list[str]:
  rows = data.get("rows", [])
  env = data.get("env", {})
  first = rows[0] if rows else {}
  out = [f"Tiny models of each family (d_model 256, 4 layers, vocabulary 256), "
         f"{fmt(first.get('batch'))} sequences of {fmt(first.get('length'))} tokens, float32 "
         f"parameters, {first.get('dtype', 'bfloat16')} compute, AdamW, on the CPU (host with "
         f"{env.get('cpu_count')} cores, pinned to 2 when it has more; load average "
         f"{env.get('load_average')} when it started, {env.get('date')}): the first step "
         "(tracing + XLA compilation + one step) and the median step after it.", ""]
  out += table(["model", "params (M)", "first step (compile) s", "step ms", "tokens/s"],
               [[r["model"], r["params"] / 1e6, r["compile_s"], r["step_ms"],
                 r["tokens_per_s"]] for r in rows])
  return out + _problems(data)


def generation_md(data: dict) -> list[str]:
  rows = [r for r in data.get("rows", []) if "error" not in r]
  a = data.get("args", {})
  out = [f"{data.get('device', '?')}; {data.get('dtype')} weights, random; prompt "
         f"{a.get('prompt_len')} tokens prefilled in parallel, then {a.get('gen_len')} tokens "
         "decoded greedily in one compiled `while_loop` (donated cache); medians of "
         f"{a.get('reps')} runs. ms/token = decode time / (new tokens − 1); tokens/s = batch · "
         "new tokens / decode time; `vs Transformer++` = decode tokens/s over Transformer++'s "
         "at the same batch. SSM state: the SSM states' storage dtype (float32 exact, "
         "bfloat16 as mamba_ssm; updates in float32 either way). Peak memory is process-wide "
         "(monotone over the rows).", ""]
  out += table(*_with_run(
      rows, ["model", "params (M)", "batch", "SSM state", "prefill ms", "ms/token",
             "decode tokens/s", "end-to-end tokens/s", "vs Transformer++", "state MiB",
             "decode program MiB", "peak MiB"],
      [[r["model"], r["params_m"], r["batch"], r.get("state_dtype", "-"),
        r["prefill_ms"], r["decode_ms_step"], r["decode_tok_s"], r["e2e_tok_s"],
        r.get("vs_transformer"), r["state_mib"], r.get("decode_prog_mib"),
        r.get("peak_mib")] for r in rows]))
  ctx = data.get("state_vs_context") or []
  if ctx:
    names = [k for k in ctx[0] if k != "context"]
    out += ["", "Decoding state (MiB) at batch 1 against context length: from the cache "
            "pytree's shapes, and `_measured`: the device memory an empty cache of that length "
            "takes (`bytes_in_use` growth; '-' on CPU).", ""]
    out += table(["context", *names], [[length_label(c["context"]), *(c[n] for n in names)]
                                       for c in ctx])
  errors = [r for r in data.get("rows", []) if "error" in r]
  if errors:
    state = lambda r: "" if r.get("state_dtype", "-") == "-" else f" {r['state_dtype']} state"
    run = lambda r: f" ({r['run']})" if "run" in r else ""
    out += ["", "Failed rows: " + "; ".join(f"{r['model']} batch {r['batch']}{state(r)}"
                                            f"{run(r)}: {r['error']}" for r in errors)]
  return out + _problems(data, errors=False)


def long_context_md(data: dict) -> list[str]:
  a = data.get("args", {})
  group = a.get("remat_group", 1) if a.get("remat", True) else 0
  remat = {0: "no rematerialization", 1: "per-block rematerialization"}.get(
      group, f"rematerialization in groups of {group} blocks")
  out = [f"Batch 1, float32 parameters, bf16 compute; train = loss + gradient + AdamW update "
         f"with {remat} and the LM-head loss in "
         f"{fmt(a.get('loss_chunk'))}-token chunks; forward = all L tokens through the "
         "backbone, logits of the last one. The search starts at "
         f"{length_label(a.get('start', 0))} and doubles (halves) up to "
         f"{length_label(a.get('max_length', 0))} (down to {length_label(a.get('min_length', 0))}"
         "); each attempt in its own process.", ""]
  body = []
  for r in data.get("rows", []):
    tried = "; ".join(
        f"{length_label(t['length'])}: " + (
            f"ok, {fmt(t.get('step_s'))} s/step, {fmt(t.get('peak_gib'))} GiB" if t["ok"]
            else t.get("error", "failed")) for t in r["attempts"])
    longest = length_label(r["longest"]) if r["longest"] else "none tried fit"
    if r.get("capped_by"):
      longest = f"≥ {longest} (search capped by {r['capped_by']})" if r["longest"] else longest
    remat = r.get("remat", True)
    remat = ("none" if remat is False or remat == 0 else "per block" if remat in (True, 1)
             else f"groups of {remat}")
    body.append([r["model"], r["mode"], remat if r["mode"] == "train" else "-", longest, tried])
  return out + table(["model", "mode", "remat", "longest length", "attempts"], body)


def _problems(data: dict, errors: bool = True) -> list[str]:
  out = []
  if errors and data.get("errors"):
    out += ["", "Errors: " + "; ".join(e if isinstance(e, str) else
                                      f"{e.get('case')}: {e.get('error')}"
                                      for e in data["errors"])]
  if data.get("skipped"):
    out += ["", "Not run (time budget): " + ", ".join(map(str, data["skipped"]))]
  return out


def s6_md(data: dict) -> list[str]:
  """scripts/bench_selective_scan.py's rows: every implementation at each (d_inner, length)."""
  rows = data.get("rows", [])
  impls = {r["impl"] for r in rows}
  out = [f"{data.get('device', '?')}; {fmt(data.get('tokens'))} tokens as batch × length, "
         f"d_state {data.get('d_state')}, bf16 u / delta / B / C, float32 A / D / delta_bias, "
         f"delta_softplus{', z gate' if data.get('gate') else ''}; medians of repeated calls "
         "after warm-up, every implementation of a row group in one process. `cuda` = mamba_ssm "
         "2.3.2.post1's `selective_scan_cuda` (built for sm_90 on the machine); "
         "`pallas_mosaic` = ours on Hopper (the Mosaic GPU forward and backward that "
         "`impl=\"pallas\"` / `\"auto\"` run there); `pallas` = the Triton-lowered Pallas "
         "kernels (other GPUs); `chunked` = the XLA chunked form. × = the CUDA kernel's ms / "
         "this row's (forward, forward+backward). Floor: bytes / 3.0 TB/s or one exp per "
         "(token, channel, state) at the special-function rate.", ""]
  vs = "cuda" in impls
  out += table(["impl", "d_inner", "L", "batch", "fwd ms", "fwd+bwd ms",
                *(["× fwd", "× fwd+bwd"] if vs else []), "fwd % floor", "fwd+bwd % floor"],
               [[r["impl"], r["d_inner"], length_label(r["length"]), r["batch"], r["fwd_ms"],
                 r["fwd_bwd_ms"],
                 *([r.get("fwd_speedup_vs_cuda"), r.get("fwd_bwd_speedup_vs_cuda")] if vs
                   else []),
                 r["fwd_floor_pct"], r["fwd_bwd_floor_pct"]] for r in rows])
  return out


def ssd_md(data: dict) -> list[str]:
  """scripts/bench_ssd.py's rows: our SSD kernels against mamba_ssm's Triton SSD."""
  out = [f"{data.get('device', '?')}; jax {data.get('jax')}; {fmt(data.get('tokens'))} tokens "
         f"as batch × length, chunk {data.get('chunk')}, 32 heads × 64, groups 1, bf16; "
         "medians of repeated calls after warm-up, every implementation of a run in one "
         "process. `pallas_mgpu` = ours on Hopper (Mosaic GPU forward, Triton-lowered backward "
         "with per-head dB / dC kernels, `bwd=\"per_head\"`), `pallas_mgpu_shared_w` = the same "
         "with the shared-W dB / dC backward (what `impl=\"auto\"` runs there since "
         "2026-11-23), `pallas` = the Triton-lowered kernels, `triton` = mamba_ssm 2.3.2's "
         "`mamba_chunk_scan_combined`, `cudnn` = causal attention of the same width; × = "
         "Triton's ms / this row's, within a run.", ""]
  for note in data.get("notes", []):
    out += [f"- {note}"]
  if data.get("notes"):
    out.append("")
  rows = data.get("rows", [])
  return out + table(*_with_run(rows, [
      "impl", "L", "N", "batch", "fwd ms", "fwd+bwd ms", "× fwd", "× fwd+bwd", "fwd % floor",
      "fwd+bwd % floor"],
      [[r["impl"], length_label(r["length"]), r["state"], r["batch"], r["fwd_ms"],
        r["fwd_bwd_ms"], r.get("fwd_vs_triton"), r.get("fwd_bwd_vs_triton"),
        r.get("fwd_floor_pct"), r.get("fwd_bwd_floor_pct")] for r in rows]))


def decode_profile_md(data: dict) -> list[str]:
  """scripts/profile_decode.py's rows: the compiled decoding loop with the decoding ops as
  impl="auto" picks them and in their XLA forms."""
  a = data.get("args", {})
  out = [f"{data.get('device', '?')}; random weights in {a.get('dtype')}, SSM state in the "
         f"`state` dtype, prompt {fmt(a.get('prompt_len'))} prefilled, then {a.get('gen_len')} "
         "tokens "
         "decoded greedily in the compiled loop; wall time per token, the GPU's busy time per "
         "token and the kernels it ran per token (a profiler trace). Earlier runs first (before "
         "and after `mamba_jax.nn.linear`'s two-row products; `Linear pads from` = its "
         "MIN_PADDED_WEIGHT where a run varied it). step `auto` = the "
         "decoding ops as `impl=\"auto\"` picks them: on a GPU, Mamba-1's conv and SSM step "
         "kernels and Mamba-2's fused conv + SSD kernel `ssd_decode_step` up to batch 16, and "
         "since the runs `decode_profile_mamba1_b1_conv_in_place` and "
         "`decode_profile_mamba2_b128_bf16` (2026-11-23) Mamba-1's at every batch and "
         "Mamba-2's also at larger batches with a bf16 state; `xla` = their XLA forms; "
         "`pallas` = every decoding kernel. The rows of a "
         "run (`run`: its JSON in docs/results) come from one process; runs of different code "
         "states are compared only within themselves.", ""]
  options = lambda r: ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
  return out + table(["run", "model", "batch", "state", "step", "XLA options",
                      "Linear pads from", "wall ms / token", "GPU busy ms / token",
                      "kernels / token"],
                     [[r.get("run", "-"), r["model"], r["batch"], r.get("state_dtype", "float32"),
                       r.get("step_impl", "auto"), options(r) or "-",
                       r.get("min_padded_weight") or "-", r["wall_ms_per_token"],
                       r.get("busy_ms_per_token"), r.get("kernels_per_token")]
                      for r in data.get("rows", [])])


def decode_step_md(data: dict) -> list[str]:
  """scripts/bench_decode_step.py's rows: the fused Mamba-2 step against its XLA form."""
  a = data.get("args", {})
  out = [f"{data.get('device', '?')}; `ops.ssd_decode_step` (conv step + SSD state update of "
         f"one Mamba-2 layer) at the presets' sizes, {a.get('steps')} steps in one compiled "
         "`fori_loop` (state carried, updated in place), the state in the row's dtype; µs per "
         "step (the loop's own per-iteration cost included: at batch 1 it dominates), the "
         "state traffic (read + write) against the 3.0 TB/s copy ceiling, and the XLA form's "
         "time over the row's.", ""]
  return out + table(["model", "batch", "state", "impl", "block_p", "warps", "µs / step",
                      "copy ceiling", "xla / this"],
                     [[r["model"], r["batch"], r.get("state_dtype", "-"), r["impl"],
                       r.get("block_p") or "-",
                       r.get("num_warps") or "-", r["us_per_step"],
                       f"{r['copy_fraction']:.0%}", r.get("xla_over_this")]
                      for r in data.get("rows", [])])


# profile_training.py's kernel kinds, in the report's column order.
PROFILE_KINDS = ("matmul", "custom", "elementwise", "reduce", "transpose", "attention")


def training_profile_md(data: dict) -> list[str]:
  """scripts/profile_training.py's rows: one training step's GPU time by kernel kind."""
  out = [f"{data.get('device', '?')}; one training step as `bench_training.py` runs it "
         "(random tokens, float32 parameters, bf16 compute, AdamW), traced once after "
         "warm-up: wall ms per step (median of the timed steps), the GPU's busy ms and kernels "
         "in the traced step, and the busy ms by kernel kind (`custom` = our Pallas / Mosaic "
         "GPU kernels; `transpose`, `reduce`, `elementwise` = XLA fusions by their names). "
         "Earlier runs first: before and after the SSD wrapper's pinned dt transpose and the "
         "LM head's compute-dtype backward, then with the conv and gated-norm kernels "
         "reading and writing in_proj's output in place (`ops.mamba2_inner`) and the loss "
         "masking the vocabulary padding (2026-11-23), then Mamba-2 370M (chunked loss, no "
         "block rematerialized) and 130M with the fused cross-entropy and the shared-W SSD "
         "backward (`training_profile_370m`, 2026-11-23); each run is one process.", ""]
  return out + table(
      ["run", "model", "L", "memory", "wall ms", "GPU busy ms", "kernels",
       *[f"{k} ms" for k in PROFILE_KINDS]],
      [[r.get("run", "-"), r["model"], length_label(r["length"]), r["memory"],
        r["wall_ms_per_step"], r.get("busy_ms_per_step"), r.get("kernels_per_step"),
        *[(r.get("kinds_ms") or {}).get(k, 0.0) for k in PROFILE_KINDS]]
       for r in data.get("rows", [])])


def mixer_ops_md(data: dict) -> list[str]:
  """scripts/bench_mixer_ops.py's rows: the mixers' conv and gated norm, XLA and kernels."""
  out = [f"{data.get('device', '?')}; bf16 activations, float32 parameters, "
         f"{(data.get('rows') or [{}])[0].get('tokens', '?')} tokens; forward and "
         "forward+backward (`jax.vjp`, every gradient) median ms of each op alone, "
         "`% floor` = fewest bytes / 3.0 TB/s / measured, speed-up of forward+backward over "
         "XLA's form in the same process.", ""]
  return out + table(
      ["model", "op", "channels", "impl", "fwd ms", "fwd % floor", "fwd+bwd ms",
       "fwd+bwd % floor", "fwd+bwd speed-up"],
      [[r["model"], r["op"], r["channels"], r["impl"], r["fwd_ms"], r["fwd_floor_pct"],
        r["fwd_bwd_ms"], r["fwd_bwd_floor_pct"], r["fwd_bwd_speedup"]]
       for r in data.get("rows", [])])


def decode_bound_md(data: dict) -> list[str]:
  """scripts/decode_traffic_bound.py: each decoding step's memory-traffic floor, the
  Mamba / Transformer++ ratio it allows, and the measured generation rows against it."""
  args = data.get("args") or {}
  out = [f"From shapes alone (no device): a decoding step reads every weight once and, per "
         f"sequence, reads and writes the SSM state or reads the KV cache so far (prompt "
         f"{args.get('prompt_len')} + {args.get('gen_len')} generated, averaged over the "
         f"generation; weights {args.get('dtype')}, SSM states {args.get('state_dtype')}); "
         f"floor = bytes / {fmt(data.get('copy_bytes_per_s', 0) / 1e12, 1)} TB/s; bound = "
         "the same-size Transformer++'s floor / the model's: the largest throughput ratio "
         "equally efficient implementations can show.", ""]
  out += table(["model", "batch", "MiB per step", "floor ms", "bound × Transformer++"],
               [[r["model"], r["batch"], r["step_mib"], r["floor_ms_step"],
                 r["bound_vs_transformer"]] for r in data.get("rows", [])])
  measured = data.get("measured") or []
  if measured:
    out += ["", "The measured generation rows (section generation) against their floors:", ""]
    out += table(["run", "model", "batch", "state", "ms / step", "floor ms", "% of floor",
                  "measured × Transformer++", "bound"],
                 [[r["source"], r["model"], r["batch"], r["state_dtype"], r["decode_ms_step"],
                   r["floor_ms_step"], r["pct_of_floor"], r["vs_transformer"],
                   r["bound_vs_transformer"]] for r in measured])
  return out


SECTION_MD = {
    "kernels": ("Kernels: SSD and S6 against attention (Mamba Fig. 8 left, Mamba-2 Fig. 10)",
                kernels_md),
    "s6": ("Mamba-1 selective scan (S6) against mamba_ssm's CUDA kernel", s6_md),
    "ssd": ("Mamba-2 SSD kernels against mamba_ssm's Triton SSD", ssd_md),
    "training": ("Training step: throughput, MFU, memory (Mamba Fig. 8 right)", training_md),
    "generation": ("Generation: Mamba against Transformer++ of the same size", generation_md),
    "generation_large": ("Generation at 1.4B / 1.3B", generation_md),
    "decode_bound": ("Decoding's memory-traffic floor and the speed-up it allows",
                     decode_bound_md),
    "long_context": ("Long context: the longest sequence on one device", long_context_md),
    "decode_profile": ("Decoding loop profiles: time and kernels per token",
                       decode_profile_md),
    "decode_step": ("Mamba-2's decoding step alone: kernel blocks against the XLA form",
                    decode_step_md),
    "training_profile": ("Where a training step's GPU time goes", training_profile_md),
    "mixer_ops": ("The mixers' conv and gated norm: XLA against the Pallas kernels",
                  mixer_ops_md),
    "cpu": ("CPU: a tiny model for notebook users", cpu_md),
}


def markdown(results: dict, figures: dict[str, str]) -> str:
  env = results.get("env", {})
  versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
  sections = "".join(f" --section {s}" for s in results.get("section_specs", []))
  jsons = " ".join(results.get("json_paths") or ["docs/bench_results_gpu.json",
                                                 "docs/bench_results_cpu.json"])
  lines = [TITLE, "",
           "Generated by `scripts/bench_report.py` from the saved results of "
           "`scripts/bench_all.py` and of single bench scripts (regenerate: `python "
           f"scripts/bench_report.py --json {jsons}{sections} --md docs/benchmarks.md "
           "--png_dir docs`). "
           "Every number below comes from those runs; the sections table says which run "
           "(machine, date) each section is from.", "",
           f"- device: {env.get('gpu') or 'CPU only'}; driver {env.get('driver') or '-'}; "
           f"{env.get('cpu_count')} CPU cores",
           f"- date (UTC): {env.get('date')}", f"- software: {versions}",
           f"- mode: {results.get('mode')}, {fmt(results.get('elapsed_s'), 0)} s in all", "",
           "## Sections", ""]
  secs = results.get("sections", {})

  def run_of(section):
    e = section.get("from_env") or env
    return f"{e.get('gpu') or 'CPU'} ({e.get('cpu_count')} cores), {e.get('date')}"

  lines += table(["section", "status", "wall s", "limit s", "run"],
                 [[n, s["status"], s.get("wall_s"), s.get("limit_s"), run_of(s)]
                  for n, s in secs.items()])
  for name, sec in secs.items():
    base = next((k for k in SECTION_MD if name == k), None) or next(
        (k for k in SECTION_MD if name.startswith(k + "_")), None)
    title, render = SECTION_MD[base] if base else (name, None)
    if base and base != name:
      title = f"{title} [{name}]"
    lines += ["", f"## {title}", ""]
    if name in figures:
      lines += [f"![{name}]({figures[name]})", ""]
    if sec.get("data") and render is not None:
      try:
        lines += render(sec["data"])
      except (KeyError, TypeError, ValueError) as e:  # a malformed section must not hide others
        lines += [f"(could not render this section's data: {type(e).__name__}: {e})"]
    if sec["status"] != "ok":
      tail = (sec.get("log_tail") or sec.get("reason") or "").strip().splitlines()[-6:]
      lines += ["", f"Status **{sec['status']}**" + (": last lines of its log:" if tail else ""),
                ""]
      if tail:
        lines += ["```", *tail, "```"]
  return "\n".join(lines) + "\n"


def figures(results: dict, png_dir: str) -> dict[str, str]:
  """Writes bench_<section>.png for the sections with plottable data; {section: file name}."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no figures")
    return {}
  made = {}
  secs = {n: s.get("data") for n, s in results.get("sections", {}).items() if s.get("data")}
  device = (results.get("env") or {}).get("gpu") or "CPU"
  kernel_secs = [d for n, d in secs.items() if n == "kernels" or n.startswith("kernels_")]
  if any(d.get("rows") for d in kernel_secs):
    d = kernel_secs[0]
    rows, state = [r for k in kernel_secs for r in k.get("rows", [])], d["args"].get("state")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes[:2], ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward+backward")):
      for op, impl in sorted({(r["op"], r["impl"]) for r in rows if r["op"] != "s6"}):
        pts = sorted((r["length"], r[key]) for r in rows if r["op"] == op and r["impl"] == impl
                     and (op == "attention" or r["state"] == state) and r[key] == r[key])
        if pts:
          ax.plot(*zip(*pts), marker="o", label=f"{op} {impl}")
      ax.set_xscale("log", base=2)
      ax.set(yscale="log", xlabel=f"sequence length ({d['args']['tokens']} tokens per case)",
             ylabel="ms", title=f"{title}, N = {state}")
      ax.legend(fontsize=8)
    sweep = [r for r in rows if r["op"] == "ssd" and r["length"] == d["args"].get("states_length")]
    for impl in sorted({r["impl"] for r in sweep}):
      pts = sorted((r["state"], r["fwd_bwd_ms"]) for r in sweep if r["impl"] == impl)
      axes[2].plot(*zip(*pts), marker="o", label=f"ssd {impl}")
    axes[2].set_xscale("log", base=2)
    axes[2].set(yscale="log", xlabel="state size N", ylabel="fwd+bwd ms",
                title=f"SSD vs N, L = {d['args'].get('states_length')}")
    axes[2].legend(fontsize=8)
    fig.suptitle(device)
    made["kernels"] = _save(fig, png_dir, "bench_kernels.png")
  s6 = (secs.get("s6") or {}).get("rows")
  if s6:
    d = secs["s6"]
    widths = sorted({r["d_inner"] for r in s6})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward+backward")):
      for impl, width in sorted({(r["impl"], r["d_inner"]) for r in s6}):
        pts = sorted((r["length"], r[key]) for r in s6
                     if r["impl"] == impl and r["d_inner"] == width and r[key] == r[key])
        if pts:
          ax.plot(*zip(*pts), marker="o", linestyle="-" if width == widths[0] else "--",
                  label=f"{impl}, d_inner {width}")
      ax.set_xscale("log", base=2)
      ax.set(yscale="log", xlabel=f"sequence length ({d.get('tokens')} tokens per case)",
             ylabel="ms", title=f"S6 {title}, N = {d.get('d_state')}")
      ax.legend(fontsize=7)
    fig.suptitle(d.get("device") or device)
    made["s6"] = _save(fig, png_dir, "bench_s6.png")
  rows = latest_rows(
      [r for n, d in secs.items()
       if (n == "training" or n.startswith("training_")) and n != "training_profile"
       for r in d.get("rows", [])],
      lambda r: (r["model"], r["length"], r["impl"], r.get("batch"), r.get("remat"),
                 r.get("loss_chunk"), r.get("auto_as")))
  if rows:
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    labels = [f"{r['model']}\n{r['impl']} L={length_label(r['length'])}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
           color=["tab:orange" if r["impl"] == "torch" else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="training tokens/s", title=f"{device}: train step (blue ours, orange mamba_ssm)")
    made["training"] = _save(fig, png_dir, "bench_training.png")
  if secs.get("generation", {}).get("rows"):
    d = secs["generation"]
    rows = [r for r in d["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    variant = lambda r: (r["model"], r.get("state_dtype", "-"))
    for model, state in sorted({variant(r) for r in rows}):
      pts = sorted((r["batch"], r["decode_tok_s"]) for r in rows
                   if variant(r) == (model, state))
      axes[0].plot(*zip(*pts), marker="o",
                   label=model if state == "-" else f"{model} ({state} state)")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
                title="generation throughput")
    axes[0].legend(fontsize=8)
    ctx = d.get("state_vs_context") or []
    for name in [k for k in (ctx[0] if ctx else {}) if k != "context"]:
      pts = [(c["context"], c[name]) for c in ctx if c[name] is not None]
      if pts:
        axes[1].plot(*zip(*pts), marker="o", label=name, linestyle="--" if "measured" in name
                     else "-")
    axes[1].set(xscale="log", yscale="log", xlabel="context length", ylabel="MiB (batch 1)",
                title="decoding state")
    axes[1].legend(fontsize=7)
    fig.suptitle(device)
    made["generation"] = _save(fig, png_dir, "bench_generation.png")
  return made


def _save(fig, png_dir: str, name: str) -> str:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(os.path.join(png_dir, name), dpi=110)
  plt.close(fig)
  return name


def build(results: dict, md_path: str, png_dir: str) -> list[str]:
  """Writes the markdown report and the figures; returns the paths written."""
  os.makedirs(png_dir, exist_ok=True)
  made = figures(results, png_dir)
  rel = os.path.relpath(png_dir, os.path.dirname(os.path.abspath(md_path)) or ".")
  links = {k: (v if rel == "." else os.path.join(rel, v)) for k, v in made.items()}
  with open(md_path, "w") as f:
    f.write(markdown(results, links))
  return [md_path] + [os.path.join(png_dir, v) for v in made.values()]


def merge(parts: list[dict]) -> dict:
  """Results of several bench_all.py calls as one: sections of later parts replace earlier
  ones of the same name; the top-level env / mode are the first GPU run's (else the first's),
  and each section keeps its own env in its data."""
  if not parts:
    raise ValueError("merge: no results given")
  base = next((p for p in parts if (p.get("env") or {}).get("gpu")), parts[0])
  merged = {**base, "sections": {}, "elapsed_s": sum(p.get("elapsed_s") or 0 for p in parts)}
  for part in parts:
    for name, section in part.get("sections", {}).items():
      if section.get("status") != "skipped" or name not in merged["sections"]:
        merged["sections"][name] = {**section, "from_env": part.get("env")}
  return merged


def section_from_runs(paths: list[str]) -> dict:
  """A bench_all.py-style section from the JSONs one bench script wrote in separate runs
  (e.g. ``bench_generation.py`` at ~130M and with ``--large``): rows concatenated in order,
  the per-context state tables joined by context, each run's arguments kept under
  ``runs``."""
  datas = []
  for path in paths:
    with open(path) as f:
      datas.append(json.load(f))
  devices = {d.get("device") for d in datas}
  if len(devices) != 1:
    raise ValueError(f"--section joins runs of one device, got {sorted(map(str, devices))}")
  data = dict(datas[0])
  data["rows"] = [{**r, "run": os.path.basename(p)} for p, d in zip(paths, datas)
                  for r in d.get("rows", [])]
  data["notes"] = [f"{os.path.basename(p)}: {d['note']}" for p, d in zip(paths, datas)
                   if d.get("note")]
  data["errors"] = [{**e, "case": f"{os.path.basename(p)}: {e.get('case')}"}
                    if isinstance(e, dict) else f"{os.path.basename(p)}: {e}"
                    for p, d in zip(paths, datas) for e in d.get("errors") or []]
  data["skipped"] = [s for d in datas for s in d.get("skipped") or []]
  contexts: dict[int, dict] = {}
  for d in datas:
    for c in d.get("state_vs_context") or []:
      contexts.setdefault(c["context"], {}).update(c)
  data["state_vs_context"] = [contexts[k] for k in sorted(contexts)]
  reps = sorted({d.get("args", {}).get("reps") for d in datas} - {None})
  data["args"] = {**data.get("args", {}), "reps": " / ".join(map(str, reps))}
  data["runs"] = [{"file": os.path.basename(p), "args": d.get("args"),
                   "elapsed_s": d.get("elapsed_s")} for p, d in zip(paths, datas)]
  return {"status": "ok", "data": data, "from_env": data.get("env"),
          "wall_s": round(sum(d.get("elapsed_s") or 0 for d in datas), 1), "limit_s": None,
          "command": "saved runs: " + ", ".join(os.path.basename(p) for p in paths)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", required=True, nargs="+",
                      help="bench_all.py results JSON(s); several (e.g. one per --only call, "
                           "the CPU numbers from another machine) are merged in order")
  parser.add_argument("--md", default="docs/benchmarks.md")
  parser.add_argument("--section", action="append", default=[], metavar="NAME=JSON[,JSON...]",
                      help="a section from a bench script's own JSON(s) instead of a "
                           "bench_all.py run's, e.g. generation=gen_130m.json,gen_1p4b.json "
                           "(several runs of one device joined); replaces that section")
  parser.add_argument("--png_dir", default="docs")
  args = parser.parse_args()
  parts = []
  for path in args.json:
    with open(path) as f:
      parts.append(json.load(f))
  results = merge(parts)
  results["json_paths"] = list(args.json)
  for spec in args.section:
    name, _, paths = spec.partition("=")
    if not name or not paths:
      raise ValueError(f"--section wants NAME=JSON[,JSON...], got {spec!r}")
    results["sections"][name] = section_from_runs(paths.split(","))
    results.setdefault("section_specs", []).append(spec)
  print("wrote", ", ".join(build(results, args.md, args.png_dir)))


if __name__ == "__main__":
  main()
