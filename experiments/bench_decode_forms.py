"""Whole decode steps of each one-query attention form, side by side, over a filled cache.

`dense_attention` computes a decode step (T = 1) in one of two forms
(`psynth_jax.model.attention_ops`): broadcast products (B >= DECODE_REDUCE_MIN_BATCH)
and batched matmuls (below). This times the compiled `jit_decode_step` untraced with
each form forced, the forms alternating round by round so that drift on the machine
hits them alike, over a cache of `--capacity` rows with `--filled` written (no prefill:
the rows' values do not change the time), next to the step's floor (weights + the cache
rows read, at the bandwidth measured in this run). Prints a table and writes JSON.
Another form is A/B'd by adding its switch to `FORMS` (the flat form of session 19 was,
at 8f7ebdc).

  python bench_decode_forms.py --batches 1,3,16 --capacity 6144 --filled 4096
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
from bench_cache_path import load
from profile_ops import filled_decode_state

from psynth_jax import decode
from psynth_jax.eval import bench_meta, limits
from psynth_jax.model import attention_ops

FORMS = {  # the constant that picks a form, at trace time
  "matmul": {"DECODE_REDUCE_MIN_BATCH": 1 << 30},
  "broadcast": {"DECODE_REDUCE_MIN_BATCH": 1},
  "whole": {"PREFIX_STEP": 1 << 30},  # the matmul form over every cache row (no prefix read)
}


@contextlib.contextmanager
def form(name: str):
  kept = {k: getattr(attention_ops, k) for k in FORMS[name]}
  for k, v in FORMS[name].items():
    setattr(attention_ops, k, v)
  jax.clear_caches()  # the constant is read at trace time
  try:
    yield
  finally:
    for k, v in kept.items():
      setattr(attention_ops, k, v)
    jax.clear_caches()


def step_ms(params, batch: int, capacity: int, filled: int, steps: int) -> list[float]:
  """ms of each of `steps` compiled decode steps (a fresh state each: the step donates it)."""
  spec = decode.DecodeSpec(max_new_tokens=steps + 2)
  make = lambda: filled_decode_state(params.config, batch, capacity, filled, spec)  # noqa: E731

  jax.block_until_ready(decode.jit_decode_step(params, make(), spec=spec))  # compile, warm
  times = []
  for _ in range(steps):
    state = jax.block_until_ready(make())
    t0 = time.perf_counter()
    jax.block_until_ready(decode.jit_decode_step(params, state, spec=spec))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="qwen", choices=("qwen", "qwen-shape", "tiny"))
  ap.add_argument("--batches", default="1,3,16")
  ap.add_argument("--forms", default="matmul,broadcast", help=f"comma-separated of {tuple(FORMS)}")
  ap.add_argument("--capacity", type=int, default=6144, help="cache rows")
  ap.add_argument("--filled", type=int, default=4096, help="rows written")
  ap.add_argument("--steps", type=int, default=8, help="timed steps per form and round")
  ap.add_argument("--rounds", type=int, default=2, help="alternations of the forms")
  ap.add_argument("--out", default="outputs/decode_forms.json")
  ap.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  args = ap.parse_args()
  forms = args.forms.split(",")
  if unknown := [f for f in forms if f not in FORMS]:
    ap.error(f"unknown forms {unknown}; expected some of {tuple(FORMS)}")
  if not 0 < args.filled <= args.capacity:
    ap.error(f"--filled {args.filled} must be in 1..--capacity ({args.capacity})")
  run = bench_meta.start(force=args.force)
  bench_meta.print_warning(run.meta)
  bandwidth = limits.memory_bandwidth()["bandwidth_gbps"]
  lm = load(args.model)
  lim = limits.Limits.of(lm.params, bandwidth)
  rows = []
  print(f"| B | form | ms/step (median) | floor ms | / floor |  ({bandwidth:.1f} GB/s)")
  for b in map(int, args.batches.split(",")):
    times = {f: [] for f in forms}
    for _ in range(args.rounds):
      for f in forms:
        with form(f):
          times[f] += step_ms(lm.params, b, args.capacity, args.filled, args.steps)
    floor_ms = lim.decode([args.filled] * b, 1)["floor_s"] * 1e3
    for f in forms:
      ms = statistics.median(times[f])
      rows.append(dict(batch=b, form=f, ms_per_step=ms, times_ms=times[f], floor_ms=floor_ms))
      print(f"| {b} | {f} | {ms:.1f} | {floor_ms:.1f} | {ms / floor_ms:.2f}x |", flush=True)
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  meta.update(
    bandwidth_gbps=bandwidth, model=args.model, capacity=args.capacity, filled=args.filled
  )
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
