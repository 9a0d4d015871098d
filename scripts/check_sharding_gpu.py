"""Sharded == one device, on the real accelerators of one process (NCCL on a GPU host).

For every strategy whose mesh fills the N devices used (N = 2: dp, fsdp, tp, sp of a
Mamba-2, tp and sp of a Mamba-1, tp and fsdp of a Transformer++; N = 4: the same 4-way,
and dp×tp, tp×sp, dp×sp, fsdp×tp, Mamba-1 tp×sp, Transformer++ dp×tp; N = 8: 8-way, and
dp×tp×sp, fsdp×tp×sp, tp4×sp2; ``--all_fitting`` adds the smaller meshes), a small
model is run on a mesh of the devices and on one device, and the script reports the norm-relative error (max over parameter leaves for trees) of:

  loss, logits      the forward of a next-token cross-entropy;
  grads             every parameter gradient of that loss;
  params            the parameters after 3 AdamW steps (b = (0.9, 0.95), weight decay 0.1);
  restored          a train state saved with orbax from the mesh and restored onto another
                    mesh (``shard.abstract_tree``): bit-exact values, the target layout.

Mamba-2 / Mamba-1 run through ``parallelize`` (the tensor/sequence-parallel mixers: explicit
``shard_map`` collectives over NCCL); the Transformer++ runs the model's own forward,
partitioned by XLA from the parameter shardings.

Tolerances (float32). Matmuls run at ``jax_default_matmul_precision = "highest"`` (true
float32; the default allows TF32 on Ampere and later, a 1e-3 error that would hide any
bug). A sharded float32 result and the one-device float32 result are two roundings of the
same exact value, differing in the order of their sums (partial sums per device, NCCL
all-reduce, the cross-device state scan of sequence parallelism). So the tolerance of each
quantity is *measured*: e_ref = the relative error of the one-device float32 result
against the one-device float64 result (the same parameters cast up), and

  tolerance = max(4 · e_ref, 1e-6)

(each float32 result is within about e_ref of the exact one, so they differ by about
2 · e_ref; a factor 2 of headroom; 1e-6 ≈ 17 float32 ulps is the floor under which
reordered sums are indistinguishable from rounding). With ``--float64`` (the default) the
sharded run is also done in float64 and must match the one-device float64 run to 1e-10:
this checks that the parallel algorithms are exact, independently of float32 rounding
(1e-6 for the Transformer++: its attention softmax is float32 even for float64 inputs).
Restored checkpoints must be bit-identical.

NCCL's NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` are set in
``os.environ`` below, before jax is imported.

Usage (repository root; all visible devices, or ``CUDA_VISIBLE_DEVICES=0,1``):
  PYTHONPATH=. python scripts/check_sharding_gpu.py --out $OUT/sharding_check_2gpu.json
Prints a markdown table, writes JSON (device, versions, date, every error and tolerance).
Exit status 1 when a check fails. On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
gives the same checks on host devices.
"""

from __future__ import annotations

import os

# NVLink multicast off, before jax (and NCCL) are loaded.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mamba_jax.config import MambaConfig  # noqa: E402
from mamba_jax.nn.lm import MambaLM, weight_decay_mask  # noqa: E402
from mamba_jax.sharding.mesh import MeshConfig, make_mesh, validate_mesh  # noqa: E402
from mamba_jax.sharding.parallel_mixers import parallelize  # noqa: E402
from mamba_jax.sharding.shard import (abstract_tree, batch_sharding, shard,  # noqa: E402
                                      tree_shardings)

FLOOR = 1e-6
HEADROOM = 4.0
F64_TOL = 1e-10
# The attention layers take their softmax in float32 even for float64 inputs
# (nn/attention.py), so a float64 Transformer++ is exact only to float32 rounding there.
F64_TOL_ATTENTION = 1e-6
BATCH, LENGTH, STEPS = 4, 256, 3


def model_config(name: str) -> MambaConfig:
  """The small models of the checks (fast to compile, every axis divisible by 8)."""
  if name == "mamba2":  # d_inner 256: 16 heads of 16, 8 groups (tensor up to 8), chunk 16
    return MambaConfig(d_model=128, n_layer=2, vocab_size=250, pad_vocab_size_multiple=8,
                       ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, ngroups=8,
                                    chunk_size=16))
  if name == "mamba1":  # d_inner 128
    return MambaConfig(d_model=64, n_layer=2, vocab_size=250, pad_vocab_size_multiple=8,
                       ssm_cfg=dict(layer="Mamba1", d_state=8))
  if name == "transformerpp":  # 8 heads of 16, rotary, SwiGLU MLP, no biases
    return MambaConfig(d_model=128, n_layer=2, vocab_size=250, pad_vocab_size_multiple=8,
                       d_intermediate=256, attn_layer_idx=(0, 1),
                       attn_cfg=dict(num_heads=8, rotary_emb_dim=16, qkv_proj_bias=False,
                                     out_proj_bias=False, causal=True))
  raise ValueError(f"model {name!r} is not one of ('mamba2', 'mamba1', 'transformerpp')")


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  model: str
  mesh: str          # MeshConfig.from_string text
  parallel: str      # "mixers" (parallelize) or "gspmd" (the model's own forward)

  @property
  def devices(self) -> int:
    return math.prod(MeshConfig.from_string(self.mesh).sizes)


def strategies(n: int, all_fitting: bool = False) -> list[Strategy]:
  """The strategies whose mesh fills ``n`` devices (all that fit with ``all_fitting``),
  most important first: Mamba-2 single and mixed axes, then Mamba-1, then Transformer++."""
  sizes = [k for k in (2, 4, 8) if k <= n and (all_fitting or k == n)]
  mamba2, mamba1, tpp = [], [], []
  for k in sizes:
    mamba2 += [Strategy(f"dp{k}", "mamba2", f"data={k}", "mixers"),
               Strategy(f"fsdp{k}", "mamba2", f"fsdp={k}", "mixers"),
               Strategy(f"tp{k}", "mamba2", f"tensor={k}", "mixers"),
               Strategy(f"sp{k}", "mamba2", f"sequence={k}", "mixers")]
    mamba1 += [Strategy(f"mamba1_tp{k}", "mamba1", f"tensor={k}", "mixers"),
               Strategy(f"mamba1_sp{k}", "mamba1", f"sequence={k}", "mixers")]
    tpp += [Strategy(f"transformerpp_tp{k}", "transformerpp", f"tensor={k}", "gspmd"),
            Strategy(f"transformerpp_fsdp{k}", "transformerpp", f"fsdp={k}", "gspmd")]
    if k == 4:
      mamba2 += [Strategy("dp2_tp2", "mamba2", "data=2,tensor=2", "mixers"),
                 Strategy("tp2_sp2", "mamba2", "tensor=2,sequence=2", "mixers"),
                 Strategy("dp2_sp2", "mamba2", "data=2,sequence=2", "mixers"),
                 Strategy("fsdp2_tp2", "mamba2", "fsdp=2,tensor=2", "mixers")]
      mamba1 += [Strategy("mamba1_tp2_sp2", "mamba1", "tensor=2,sequence=2", "mixers")]
      tpp += [Strategy("transformerpp_dp2_tp2", "transformerpp", "data=2,tensor=2", "gspmd")]
    if k == 8:
      mamba2 += [Strategy("dp2_tp2_sp2", "mamba2", "data=2,tensor=2,sequence=2", "mixers"),
                 Strategy("fsdp2_tp2_sp2", "mamba2", "fsdp=2,tensor=2,sequence=2", "mixers"),
                 Strategy("tp4_sp2", "mamba2", "tensor=4,sequence=2", "mixers")]
  return mamba2 + mamba1 + tpp


def checkpoint_pairs(n: int) -> list[tuple[str, str]]:
  """(save mesh, restore mesh) of the checkpoint checks."""
  if n >= 4:
    return [("data=2,tensor=2", "fsdp=4"), ("fsdp=2,tensor=2", "tensor=4")]
  if n >= 2:
    return [("tensor=2", "fsdp=2"), ("fsdp=2", "data=2")]
  return []


# Errors.

def rel(a: Any, b: Any) -> float:
  """‖a − b‖ / ‖b‖ in float64 (‖a‖ when b is zero)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denom = np.linalg.norm(b.ravel())
  diff = np.linalg.norm((a - b).ravel())
  return float(diff / denom) if denom else float(diff)


def tree_rel(a: Any, b: Any) -> float:
  """The largest :func:`rel` over matching leaves."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb):
    raise ValueError(f"trees differ: {len(la)} vs {len(lb)} leaves")
  return max(rel(x, y) for x, y in zip(la, lb))


def host(tree: Any) -> Any:
  """Every leaf as a numpy array (gathered from all devices)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# The computation.

@dataclasses.dataclass
class Problem:
  """A model's graph, float32 parameters (float64 copies), batch and optimizer."""
  config: MambaConfig
  graphdef: Any
  rest: Any
  params: Any        # float32 nnx.State on the default device
  graphdef64: Any
  rest64: Any
  params64: Any      # the same values in float64
  ids: np.ndarray    # (b, l + 1) int32
  tx: optax.GradientTransformation


def make_problem(name: str) -> Problem:
  config = model_config(name)
  model = MambaLM(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model64 = MambaLM(config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  graphdef64, _, rest64 = nnx.split(model64, nnx.Param, ...)
  params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  ids = np.asarray(jax.random.randint(jax.random.key(1), (BATCH, LENGTH + 1), 0,
                                      config.vocab_size), np.int32)
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1, mask=weight_decay_mask(model))
  return Problem(config, graphdef, rest, params, graphdef64, rest64, params64, ids, tx)


def step_fn(problem: Problem, parallel: str, mesh, f64: bool):
  """(params, opt_state, inputs, targets) -> (loss, logits, grads, params, opt_state)."""
  graphdef = problem.graphdef64 if f64 else problem.graphdef
  rest = problem.rest64 if f64 else problem.rest
  vocab = problem.config.vocab_size

  def loss_fn(params, inputs, targets):
    model = nnx.merge(graphdef, params, rest)
    if mesh is not None and parallel == "mixers":
      parallelize(model, mesh, ssd_impl="chunked")  # the sharding algebra, in float32/64
    logits = model(inputs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[..., :vocab], targets)
    return loss.mean(), logits

  def step(params, opt_state, inputs, targets):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, targets)
    updates, opt_state = problem.tx.update(grads, opt_state, params)
    return loss, logits, grads, optax.apply_updates(params, updates), opt_state

  return step


def run(problem: Problem, parallel: str, mesh, f64: bool, devices) -> dict[str, Any]:
  """Loss, logits, grads of step 1 and the state after STEPS steps, on ``mesh`` (or on
  ``devices[0]`` when mesh is None)."""
  params = problem.params64 if f64 else problem.params
  opt_state = problem.tx.init(params)
  inputs, targets = problem.ids[:, :-1], problem.ids[:, 1:]
  state = {"params": params, "opt_state": opt_state}
  if mesh is None:
    put = lambda x: jax.device_put(x, devices[0])
    state, inputs, targets = put(state), put(inputs), put(targets)
  else:
    validate_mesh(mesh, problem.config, batch=BATCH, length=LENGTH)
    state = shard(state, problem.config, mesh)
    inputs = jax.device_put(inputs, batch_sharding(mesh))
    targets = jax.device_put(targets, batch_sharding(mesh))
  step = jax.jit(step_fn(problem, parallel, mesh, f64))
  out: dict[str, Any] = {}
  params, opt_state = state["params"], state["opt_state"]
  for i in range(STEPS):
    loss, logits, grads, params, opt_state = step(params, opt_state, inputs, targets)
    if i == 0:
      out.update(loss=host(loss), logits=host(logits), grads=host(grads))
  out["params"] = host(params)
  out["state"] = {"params": params, "opt_state": opt_state}
  return out


QUANTITIES = ("loss", "logits", "grads", "params")


def compare(sharded: dict, ref32: dict, ref64: dict, sharded64: Optional[dict],
            tol64: float = F64_TOL) -> dict:
  row: dict[str, Any] = {}
  for q in QUANTITIES:
    e_ref = tree_rel(ref32[q], ref64[q])
    tol = max(HEADROOM * e_ref, FLOOR)
    err = tree_rel(sharded[q], ref32[q])
    row[q] = dict(err=err, tol=tol, ref32_vs_64=e_ref, ok=bool(err <= tol))
    if sharded64 is not None:
      err64 = tree_rel(sharded64[q], ref64[q])
      row[q].update(err64=err64, tol64=tol64, ok=bool(err <= tol and err64 <= tol64))
  return row


def check_checkpoint(problem: Problem, save_spec: str, restore_spec: str, devices,
                     directory: str) -> dict[str, Any]:
  """Train on ``save_spec``, save, restore onto ``restore_spec``: values and layout."""
  import orbax.checkpoint as ocp
  mesh = make_mesh(MeshConfig.from_string(save_spec), devices[:_count(save_spec)])
  state = run(problem, "mixers", mesh, False, devices)["state"]
  path = os.path.join(directory, save_spec.replace(",", "_").replace("=", ""))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  target_mesh = make_mesh(MeshConfig.from_string(restore_spec),
                          devices[:_count(restore_spec)])
  target = abstract_tree(state, problem.config, target_mesh)
  restored = checkpointer.restore(path, target)
  err = tree_rel(host(restored), host(state))
  want = tree_shardings(state, problem.config, target_mesh)
  layout_ok = all(r.sharding.is_equivalent_to(w, r.ndim) for r, w in
                  zip(jax.tree.leaves(restored), jax.tree.leaves(want)))
  kernel = restored["params"]["backbone"]["layers"][0]["mixer"]["out_proj"]["kernel"]
  return dict(save=save_spec, restore=restore_spec, err=err, layout_ok=bool(layout_ok),
              out_proj_spec=str(kernel[...].sharding.spec),
              ok=bool(err == 0.0 and layout_ok))


def _count(spec: str) -> int:
  return math.prod(MeshConfig.from_string(spec).sizes)


def versions() -> dict[str, str]:
  import flax
  out = dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
             optax=optax.__version__, numpy=np.__version__)
  try:
    import jaxlib
    out["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  return out


def markdown(rows: list[dict], ckpts: list[dict], f64: bool) -> str:
  head = ["strategy", "model", "mesh", "path"] + [f"{q} err / tol" for q in QUANTITIES]
  if f64:
    head.append("max float64 err")
  head.append("ok")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | {r['model']} | {r['mesh']} | {r['parallel']} | "
                   f"{r['error'][:60]} |" + " |" * (len(head) - 5))
      continue
    cells = [r["name"], r["model"], r["mesh"], r["parallel"]]
    cells += [f"{r[q]['err']:.1e} / {r[q]['tol']:.0e}" for q in QUANTITIES]
    if f64:
      cells.append(f"{max(r[q]['err64'] for q in QUANTITIES):.1e}")
    cells.append("yes" if r["ok"] else "**NO**")
    lines.append("| " + " | ".join(cells) + " |")
  if ckpts:
    lines += ["", "| checkpoint saved on | restored on | max rel diff | layout | ok |",
              "|---|---|---|---|---|"]
    for c in ckpts:
      if "error" in c:
        lines.append(f"| {c['save']} | {c['restore']} | {c['error'][:60]} | | **NO** |")
        continue
      lines.append(f"| {c['save']} | {c['restore']} | {c['err']:.1e} | "
                   f"{'as target' if c['layout_ok'] else 'WRONG'} (out_proj "
                   f"{c['out_proj_spec']}) | {'yes' if c['ok'] else '**NO**'} |")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                     "sharding_check.json"))
  parser.add_argument("--num_devices", type=int, default=0,
                      help="devices to use (default: all visible)")
  parser.add_argument("--float64", action=argparse.BooleanOptionalAction, default=True,
                      help="also run every strategy in float64 (exactness, tolerance 1e-10)")
  parser.add_argument("--budget_s", type=float, default=0.0,
                      help="no strategy is started after this many seconds (0: no limit); "
                           "the JSON is rewritten after every strategy")
  parser.add_argument("--all_fitting", action="store_true",
                      help="also the strategies of fewer devices than --num_devices")
  parser.add_argument("--only", default="",
                      help="comma-separated strategy names to run (default: all that fit)")
  args = parser.parse_args(argv)

  devices = jax.devices()
  n = args.num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"--num_devices={n} but only {len(devices)} devices are visible")
  devices = devices[:n]
  chosen = strategies(n, args.all_fitting)
  if args.only:
    names = set(args.only.split(","))
    unknown = names - {s.name for s in chosen}
    if unknown:
      raise ValueError(f"--only names {sorted(unknown)} unknown or not fitting {n} devices; "
                       f"expected some of {[s.name for s in chosen]}")
    chosen = [s for s in chosen if s.name in names]
  kind = devices[0].device_kind
  print(f"{n} x {kind} ({devices[0].platform}); jax {jax.__version__}; "
        f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}", flush=True)

  problems: dict[str, Problem] = {}
  refs: dict[tuple[str, bool], dict] = {}
  rows = []
  start = time.time()
  skipped: list[str] = []

  def write(ckpts: list[dict], done: bool) -> dict:
    table = markdown(rows, ckpts, args.float64)
    ok = (all(r["ok"] for r in rows) and all(c["ok"] for c in ckpts) and not skipped
          and done)
    result = dict(
        script="scripts/check_sharding_gpu.py", date=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dict(kind=kind, platform=devices[0].platform, count=n),
        versions=versions(), env={k: os.environ.get(k) for k in (
            "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
            "CUDA_VISIBLE_DEVICES")},
        matmul_precision="highest", batch=BATCH, length=LENGTH, steps=STEPS,
        tolerance=dict(rule=f"max({HEADROOM} * err(one-device float32 vs float64), {FLOOR})",
                       float64=F64_TOL, float64_attention=F64_TOL_ATTENTION,
                     checkpoint="bit-identical"),
        strategies=rows, checkpoints=ckpts, not_run=skipped, complete=done, all_ok=ok,
        seconds=round(time.time() - start, 1), table=table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1, default=str)
    return result

  for s in chosen:
    if args.budget_s and time.time() - start > args.budget_s:
      skipped.append(s.name)
      print(f"{s.name:24s} not run: --budget_s {args.budget_s:.0f} s spent", flush=True)
      continue
    t0 = time.time()
    row: dict[str, Any] = dict(name=s.name, model=s.model, mesh=s.mesh, parallel=s.parallel)
    try:
      if s.model not in problems:
        problems[s.model] = make_problem(s.model)
        for f64 in (False, True):
          refs[(s.model, f64)] = run(problems[s.model], s.parallel, None, f64, devices)
      problem = problems[s.model]
      mesh = make_mesh(MeshConfig.from_string(s.mesh), devices[:s.devices])
      sharded = run(problem, s.parallel, mesh, False, devices)
      sharded64 = run(problem, s.parallel, mesh, True, devices) if args.float64 else None
      tol64 = F64_TOL_ATTENTION if problem.config.attn_layer_idx else F64_TOL
      row.update(compare(sharded, refs[(s.model, False)], refs[(s.model, True)], sharded64,
                         tol64))
      row["ok"] = all(row[q]["ok"] for q in QUANTITIES)
    except Exception as e:  # one strategy's failure is reported, the others still run
      row.update(error=f"{type(e).__name__}: {e}", ok=False)
    row["seconds"] = round(time.time() - t0, 1)
    rows.append(row)
    # The line alone says whether the strategy passed (float32 and float64), so a run cut off
    # before its JSON and table are written still reports every finished strategy.
    f64 = [row[q]["err64"] for q in QUANTITIES if "error" not in row and
           row[q].get("err64") is not None]
    summary = ("FAILED " + row["error"][:300] if "error" in row else
               " ".join(f"{q}={row[q]['err']:.1e}/{row[q]['tol']:.0e}" for q in QUANTITIES)
               + (f" float64={max(f64):.1e}" if f64 else "")
               + ("  ok" if row["ok"] else "  FAILED"))
    print(f"{s.name:24s} {s.mesh:28s} {summary}  ({row['seconds']} s)", flush=True)
    write([], False)

  ckpts = []
  with tempfile.TemporaryDirectory() as directory:
    for save_spec, restore_spec in checkpoint_pairs(n):
      try:
        problem = problems.get("mamba2") or make_problem("mamba2")
        ckpts.append(check_checkpoint(problem, save_spec, restore_spec, devices, directory))
      except Exception as e:
        ckpts.append(dict(save=save_spec, restore=restore_spec,
                          error=f"{type(e).__name__}: {e}", ok=False))
      print(f"checkpoint {save_spec} -> {restore_spec}: {ckpts[-1]}", flush=True)

  result = write(ckpts, True)
  print("\n" + result["table"])
  if skipped:
    print(f"not run (time budget): {', '.join(skipped)}")
  ok = result["all_ok"]
  failed = [r["name"] for r in rows if not r["ok"]] + [
      f"checkpoint {c['save']} -> {c['restore']}" for c in ckpts if not c["ok"]]
  verdict = ("ALL OK" if ok else f"FAILED: {', '.join(failed)}" if failed
             else f"all run checks OK, {len(skipped)} not run")
  print(f"\n{verdict}; wrote {args.out} ({result['seconds']} s)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
