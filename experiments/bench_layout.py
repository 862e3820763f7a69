"""Weight layout for XLA's products with few rows: [in, out] against [out, in], side by side.

  python experiments/bench_layout.py --out results/bench_2026-12-07/layout.json

For each projection shape of Qwen2.5-Coder-0.5B (q/k/v fused, gate = up, down: D = 896,
F = 4864) and each row count M (a decode step's batch, or a prefill's tokens), it times a
jitted chain of `--layers` products x [M, in] -> [M, out] three ways:
  in_out    x @ W with W [in, out]       (psynth_jax's layout before 2026-12-07)
  out_in    einsum("mi,oi->mo") with W [out, in]   (torch's Linear layout; ours now)
  out_in_T  einsum("oi,mi->om").T with W [out, in] (the product as W x^T)
and prints the best of `--repeats` calls with the weight-read rate (the weights' bytes /
time). The decode step's whole time is `bench_decode.py`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.eval import bench_meta

SHAPES = {"qkv": (896, 1152), "gate": (896, 4864), "down": (4864, 896)}  # (in, out)
FORMS = {
  "in_out": lambda x, w: x @ w,
  "out_in": lambda x, w: jnp.einsum("mi,oi->mo", x, w),
  "out_in_T": lambda x, w: jnp.einsum("oi,mi->om", w, x).T,
}


def best_s(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="1,2,3,8,16,48,256")
  parser.add_argument("--layers", type=int, default=6, help="products per timed chain")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--force", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)
  bench_meta.print_warning(run.meta)
  rng = np.random.default_rng(0)
  rows = []
  print("| shape [in, out] | M | " + " | ".join(f"{f} ms (GB/s)" for f in FORMS) + " |")
  print("|---|---|" + "---|" * len(FORMS))
  for name, (d_in, d_out) in SHAPES.items():
    w_in_out = [rng.standard_normal((d_in, d_out), np.float32) for _ in range(args.layers)]
    weights = {
      "in_out": [jnp.asarray(w) for w in w_in_out],
      "out_in": [jnp.asarray(np.ascontiguousarray(w.T)) for w in w_in_out],
    }
    weights["out_in_T"] = weights["out_in"]
    nbytes = args.layers * d_in * d_out * 4
    for m in [int(r) for r in args.rows.split(",")]:
      x = jnp.asarray(rng.standard_normal((m, d_in), np.float32))
      want = np.asarray(x) @ w_in_out[0]
      cells = []
      for form, product in FORMS.items():
        chain = jax.jit(lambda x, ws, product=product: [product(x, w) for w in ws])
        got = np.asarray(chain(x, weights[form])[0])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2 * np.sqrt(d_in))
        ws = weights[form]
        s = best_s(lambda chain=chain, x=x, ws=ws: chain(x, ws), args.repeats)
        rows.append(dict(shape=name, d_in=d_in, d_out=d_out, m=m, form=form, ms=s * 1e3))
        cells.append(f"{s * 1e3:.2f} ({nbytes / s / 1e9:.1f})")
      print(f"| {name} [{d_in}, {d_out}] x{args.layers} | {m} | " + " | ".join(cells) + " |")
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, layers=args.layers, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
