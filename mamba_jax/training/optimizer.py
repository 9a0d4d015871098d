"""The optimizer of the Mamba papers: AdamW, linear warmup, cosine decay, clipping, accumulation.

Recipe (Mamba, Appendix E.2; Mamba-2, Appendix D): AdamW with β = (0.9, 0.95), weight decay 0.1
applied to every weight but biases, norms, A_log, D and dt_bias (the model's
``weight_decay_mask``), gradients clipped to global norm 1.0, learning rate warmed up linearly
from 0 to its peak and decayed by a cosine to 1e-5. Gradient accumulation over k micro-batches
wraps the whole chain in ``optax.MultiSteps`` (the inner optimizer steps once per k calls).

Config fields (``config.optimizer``):
  learning_rate        peak learning rate
  schedule             "cosine" (warmup, then cosine to end_learning_rate) or "constant"
                       (warmup, then flat)
  warmup_steps         optimizer steps of linear warmup from 0
  end_learning_rate    final value of the cosine (1e-5 in the papers)
  b1, b2, eps          Adam moments
  weight_decay         decoupled weight decay (masked as above)
  grad_clip_norm       global-norm clip before Adam; 0 or None disables it
  grad_accum_steps     k micro-batches per optimizer step (1: no accumulation)
Schedules count optimizer steps; ``total_steps`` is the number of optimizer steps of the run.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections
import optax

WeightDecayMask = Any | Callable[[Any], Any]

_SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  if opt.schedule not in _SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {_SCHEDULES}, got {opt.schedule!r}")
  if opt.learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
  if opt.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warmup = min(opt.warmup_steps, total_steps)
  if opt.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(opt.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, warmup),
         optax.constant_schedule(opt.learning_rate)], [warmup])
  if not 0 <= opt.end_learning_rate <= opt.learning_rate:
    raise ValueError(f"optimizer.end_learning_rate must be in [0, learning_rate], got "
                     f"{opt.end_learning_rate}")
  # decay_steps counts the warmup too: the cosine ends exactly at total_steps.
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.end_learning_rate)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   weight_decay_mask: WeightDecayMask) -> optax.GradientTransformation:
  """clip → AdamW(schedule, masked weight decay), wrapped in MultiSteps when accumulating.

  Args:
    opt: the ``config.optimizer`` fields listed in the module docstring.
    total_steps: optimizer steps of the run (micro-batches / grad_accum_steps).
    weight_decay_mask: a pytree of bools shaped like the parameters (True: decayed), or a
      function of the parameters returning one.
  """
  if opt.grad_accum_steps < 1:
    raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {opt.grad_accum_steps}")
  if opt.weight_decay < 0:
    raise ValueError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
  schedule = learning_rate_schedule(opt, total_steps)
  chain = []
  if opt.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*chain)
  if opt.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps).gradient_transformation()
  return tx


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The papers' recipe; experiment configs override the learning rate and warmup."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=100, end_learning_rate=1e-5,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0, grad_accum_steps=1))
