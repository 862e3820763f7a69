"""Small-sample statistics for benchmark tables: intervals and paired tests.

The paper's sets are small (30 AIME problems, 164 HumanEval), so a difference of
a few points between two modes is often noise; every table reports a 95 %
interval per mode and an exact paired test between modes answering the same
problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95 % Wilson score interval of a proportion (sound at 0, 1 and small n)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
  """Exact McNemar test of two modes' 0/1 scores on the same problems.

  Only the discordant problems count: `a_only` (a right, b wrong) and `b_only`.
  Under "no difference" each discordant problem is a fair coin, so the two-sided
  p-value is a binomial tail. Scores other than 0/1 (partial credit) are refused.
  """
  if len(a) != len(b):
    raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
  if any(s not in (0, 1) for s in (*a, *b)):
    raise ValueError("McNemar's test needs 0/1 scores")
  a_only = sum(1 for x, y in zip(a, b, strict=True) if x > y)
  b_only = sum(1 for x, y in zip(a, b, strict=True) if y > x)
  n = a_only + b_only
  k = min(a_only, b_only)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
  return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}
