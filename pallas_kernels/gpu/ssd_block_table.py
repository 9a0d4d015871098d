"""Tuned block sizes of the Pallas GPU SSD kernels, per device generation.

Written by ``scripts/sweep_ssd_blocks.py`` from timings on the device; do not edit by hand.
Keys: (device, state size n, head dim p, chunk size q); values: ``SSDBlockSizes`` fields.
"""

TABLE: dict[tuple[str, int, int, int], dict[str, int]] = {}
