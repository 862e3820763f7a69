"""The text path's first token (prefill of K*L branch tokens + an 80-token prompt, then the
first sample: `synthesize_text`, as bench_ttft times it), Qwen2.5-Coder-0.5B fp32: parent
e076b95 (the blocked attention scores every query against every key block some query sees;
package psynth_jax_old, made as in ab_decode_blocks.py) against query chunks of 512 (this
commit), alternating round by round in one process (4 rounds, the first untimed)."""

import statistics
import sys
from importlib import import_module

sys.path.insert(0, "/tmp/s22/old")
import numpy as np
import psynth_jax_old

import psynth_jax
from psynth_jax.eval import bench_meta

run = bench_meta.start(force="--force" in sys.argv)
impls = {}
for pkg in (psynth_jax_old, psynth_jax):
  lm = import_module(pkg.__name__ + ".eval.bench_meta").bench_model("qwen")
  impls[pkg.__name__] = (lm, import_module(pkg.__name__ + ".eval.ttft").synthesize_text)
rng = np.random.default_rng(0)
rows = []
for length in (512, 1024):
  ids = rng.integers(100, 150000, 3 * length + 80).tolist()
  times = {name: [] for name in impls}
  for rnd in range(4):
    for name, (lm, text) in impls.items():
      s = text(lm, ids, max_new_tokens=1).ttft_s * 1e3
      if rnd:
        times[name].append(s)
  med = {k: round(statistics.median(v), 1) for k, v in times.items()}
  print(f"K=3 L={length} ({len(ids)} tokens)", med, flush=True)
  rows.append(dict(K=3, L=length, tokens=len(ids), times_ms=times, median_ms=med))
meta = {**bench_meta.finish(run), "parent": "e076b95"}
bench_meta.write("/work/main/results/bench_2026-12-08/text_prefill_ab.json", meta, rows)
