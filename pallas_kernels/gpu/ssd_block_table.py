"""Tuned block sizes of the Pallas GPU SSD kernels, per device generation.

Written by ``scripts/sweep_ssd_blocks.py`` from timings on the device; do not edit by hand.
Keys: (device, state size n, head dim p, chunk size q); values: ``SSDBlockSizes`` fields.
Measured: sm90 n=128: fwd 1.357 ms, fwd+bwd 4.435 ms (L=4096, 65536 tokens, 12 configs); sm90 n=256: fwd 2.302 ms, fwd+bwd 8.714 ms (L=4096, 65536 tokens, 8 configs).
"""

TABLE: dict[tuple[str, int, int, int], dict[str, int]] = {('sm90', 128, 64, 256): {'block_k': 64,
                          'block_m': 64,
                          'block_pn': 1024,
                          'num_stages': 2,
                          'num_warps': 4,
                          'num_warps_bwd': 4},
 ('sm90', 256, 64, 256): {'block_k': 64,
                          'block_m': 32,
                          'block_pn': 1024,
                          'num_stages': 2,
                          'num_warps': 4,
                          'num_warps_bwd': 4}}
