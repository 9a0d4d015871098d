"""8-bit μ-law quantisation of waveforms (numpy; used by the audio data and generation).

The companding curve of ITU-T G.711 with μ = 255, quantised as in WaveNet and SaShiMi:

  F(x) = sign(x) · ln(1 + μ|x|) / ln(1 + μ),   x ∈ [−1, 1]
  q    = ⌊(F(x) + 1) / 2 · μ + 1/2⌋ ∈ {0, …, μ}
  x̂    = sign(y) · ((1 + μ)^|y| − 1) / μ,      y = 2q/μ − 1

so decode(encode(x)) is within half a step (1/μ) of x in the companded domain, and
encode(decode(q)) = q for every code. Silence is code 128 (y = 1/255, x̂ ≈ 2e-5).
"""

from __future__ import annotations

import numpy as np

MU = 255
NUM_CODES = MU + 1


def mulaw_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
  """Waveform in [−1, 1] (any shape; clipped) -> codes in {0, …, mu} (uint8 for mu ≤ 255)."""
  if not isinstance(mu, (int, np.integer)) or mu < 1:
    raise ValueError(f"mu must be an int >= 1, got {mu!r}")
  x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
  companded = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
  codes = np.floor((companded + 1.0) / 2.0 * mu + 0.5)
  return codes.astype(np.uint8 if mu <= 255 else np.int32)


def mulaw_decode(codes: np.ndarray, mu: int = MU) -> np.ndarray:
  """Codes in {0, …, mu} (any shape) -> waveform in [−1, 1], float32."""
  codes = np.asarray(codes)
  if codes.size and (codes.min() < 0 or codes.max() > mu):
    raise ValueError(f"codes must be in [0, {mu}], got range [{codes.min()}, {codes.max()}]")
  y = 2.0 * codes.astype(np.float64) / mu - 1.0
  return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)
