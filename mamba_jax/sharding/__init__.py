"""Sharding: the mesh, logical axis names, rules tables, sequence parallelism, placement."""
