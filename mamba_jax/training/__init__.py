"""Training: optax optimizer, orbax checkpoints, metrics, the jitted step and the loop."""
