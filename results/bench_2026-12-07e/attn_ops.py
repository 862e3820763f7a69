"""The attention ops of one traced decode step, summed by kind: python attn_ops.py B CAPACITY FILLED
(run from the repository root; prints ms per step per kind, 4 traced steps)."""

import collections
import re
import sys

sys.path.insert(0, "/work/main/experiments")
import profile_ops as po
from bench_cache_path import load

from psynth_jax import decode

b, cap, filled = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lm = load("qwen")
params = lm.params
spec = decode.DecodeSpec(max_new_tokens=10)


def make():
  return (params, po.filled_decode_state(params.config, b, cap, filled, spec))


ins, per, _ = po.op_times(decode.jit_decode_step, make, 4, spec=spec)
agg = collections.defaultdict(lambda: [0.0, 0, ""])
for n, ns in per.items():
  i = ins[n]
  if not i["attention"] or i["opcode"] in ("while", "conditional", "call"):
    continue
  k = re.sub(r"\.\d+$", "", n) + " " + re.sub(r"\d+", "n", i["shape"])
  agg[k][0] += ns / 1e6 / 4
  agg[k][1] += 1
  agg[k][2] = i["shape"]
for k, (ms, c, s) in sorted(agg.items(), key=lambda x: -x[1][0])[:12]:
  print(f"{ms:7.2f} ms  x{c:3d}  {k}  e.g. {s}")
