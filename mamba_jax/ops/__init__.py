"""Pure-functional SSM ops: the math of the Mamba and Mamba-2 papers, no parameters.

Import each op from its module (``from mamba_jax.ops.ssd import ssd``) or from the package top
(``mamba_jax.ssd``). Each recurrence has a sequential ``lax.scan`` oracle, parallel forms with
the same signature (``impl=...``) and a one-step decode form:

  selective_scan (Mamba, S6)   sequential | associative | chunked      selective_state_update
  ssd (Mamba-2, SSD)           sequential | quadratic | chunked        ssd_state_update
  causal_conv1d                                                        causal_conv1d_update

and the language model's loss, ``softmax_cross_entropy_with_accuracy`` (xla | pallas).
"""
