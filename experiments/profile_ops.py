"""Where a program's time goes: a `jax.profiler` trace of compiled runs, per HLO op.

  python experiments/profile_ops.py decode                 # Qwen2.5-Coder-0.5B, B = 1, 3, 16
  python experiments/profile_ops.py decode --batches 1 --capacity 6144 --filled 4096
  python experiments/profile_ops.py cache-path             # K = 3, L = 128, 512, 1024
  python experiments/profile_ops.py decode --model qwen-shape   # random weights, no download

`decode` runs `decode.jit_decode_step` (the step `LanguageModel.stream` runs; the fused
loop runs the same body) over a cache of `--capacity` rows of which `--filled` are
written. `cache-path` runs the synthesizer's first token as `synthesize` does (merge
inside, LoRA rank 16 on q/k/v/o and the affine mapper at init, an 80-token prompt) over
K branch caches of L random tokens. Each traces `--steps` runs and sums the XLA:CPU
thunk times by HLO instruction, grouped by what they compute (read from the compiled
HLO: the compiled program carries no source lines, so the groups follow opcodes, shapes
and where an instruction sits):

* unembed: the [B, D] x [V, D] logits product; sample: the rest over V (argmax, sampling);
* lora: products whose output is the adapter's rank wide (x A);
* projections: every other matrix product (q/k/v/o, gate/up/down, B of the LoRA);
* attention: what runs inside the cache-prefix switch of `attention_ops.attention`
  (and the blocked attention's loop), except "kv copy": copies, slices and transposes of cache
  rows there;
* cache write: writes into a layer's [B, G, S, H] keys or values (new rows, the merge);
* other: norms, RoPE, residual adds, loop bookkeeping, the rest.

Prints a table per case (ms per run, share, each group's top instructions) with the
weight-read floor measured in the same run (`psynth_jax.eval.limits`), and writes JSON.
Thunk times add up across XLA's two worker threads, so on 2 cores their sum can exceed
the wall time; a traced run is slower than an untraced one (a few us per thunk). The
shares are what this is for: `bench_decode.py` / `bench_cache_path.py` give the times.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_cache_path import load

import psynth_jax as ps
from psynth_jax import decode
from psynth_jax.eval import bench_meta, limits
from psynth_jax.kv_cache import KVCache
from psynth_jax.operators import resolve
from psynth_jax.synthesis import _jit_first_token, branch_rows

GROUPS = (
  "unembed",
  "sample",
  "lora",
  "projections",
  "attention",
  "kv copy",
  "cache write",
  "other",
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_CALLED = re.compile(r"(?:body|condition|to_apply|calls)=%([\w.\-]+)")


def hlo_instructions(text: str) -> dict[str, dict]:
  """Compiled HLO text -> {instruction: {opcode, shape, entry, attention}}.

  `entry`: the instruction is in the entry computation (its thunk time is the run's);
  `attention`: it runs inside a `conditional`'s branch, or in what such a branch calls
  (the prefix switch of `attention_ops.attention`, and the blocked attention's
  per-block skip, are the only conditionals of these programs), or it is a product
  with batch dimensions (the projections are plain 2-D products; a mixture-of-experts
  layer's expert products would count here too).
  """
  out, computation, entry_name = {}, None, None
  branches, batched, edges = set(), set(), collections.defaultdict(set)
  for line in text.splitlines():
    if m := _COMPUTATION.match(line):
      computation = m.group(1)
      if line.startswith("ENTRY"):
        entry_name = computation
      continue
    if not (m := _INSTR.match(line)):
      continue
    name, shape, opcode, rest = m.groups()
    if opcode == "conditional":
      called = re.findall(r"%([\w.\-]+)", rest.split("branch_computations=")[1])
      branches.update(called)
      edges[computation].update(called)
    edges[computation].update(_CALLED.findall(rest))
    if opcode == "dot" and "lhs_batch_dims" in rest:
      batched.add(computation)
    calls = _CALLED.search(rest) if opcode == "fusion" else None
    out[name] = {
      "opcode": opcode,
      "shape": shape.split("{")[0],
      "computation": computation,
      "batched_dot": opcode == "dot" and "lhs_batch_dims" in rest,
      "fuses": calls.group(1) if calls else None,
    }
  inside, todo = set(), list(branches)
  while todo:
    c = todo.pop()
    if c not in inside:
      inside.add(c)
      todo.extend(edges[c])
  for info in out.values():
    info["entry"] = info["computation"] == entry_name
    batched_dot = info.pop("batched_dot") or info.pop("fuses") in batched
    info["attention"] = info["computation"] in inside or batched_dot
    info.pop("fuses", None)
  return out


def group_of(name: str, info: dict, vocab: int, rank: int | None) -> str:
  shape = info["shape"]
  matmul = info["opcode"] == "dot" or name.startswith("ynn_fusion")
  if info["attention"]:
    # A copy or transpose there moves the cache's k / v into another layout (q's are tiny).
    moved = name.startswith(("copy", "transpose")) or "slice" in name
    moved = moved or info["opcode"] in ("copy", "transpose", "slice")
    return "kv copy" if moved else "attention"
  dus = "dynamic-update-slice" in name or info["opcode"] in ("dynamic-update-slice", "scatter")
  if dus and shape.count(",") == 3:  # [B, G, S, H]: a cache layer's keys or values
    return "cache write"
  if f",{vocab}]" in shape or f"[{vocab}" in shape:
    return "unembed" if matmul else "sample"
  if matmul and rank is not None and shape.endswith(f",{rank}]"):
    return "lora"
  return "projections" if matmul else "other"


def op_times(jitted, make_args, steps: int, **static):
  """Traces `steps` runs of `jitted(*make_args(), **static)`: (the compiled program's
  instructions, ns per instruction summed over the runs, wall seconds per run)."""
  compiled = jitted.lower(*make_args(), **static).compile()
  instructions = hlo_instructions(compiled.as_text())
  jax.block_until_ready(jitted(*make_args(), **static))  # warm
  inputs = [make_args() for _ in range(steps)]
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp):
      for args in inputs:
        jax.block_until_ready(jitted(*args, **static))
    wall = (time.perf_counter() - t0) / steps
    data = jax.profiler.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      # Thunks run on XLA's worker threads, small programs on the caller's: every line.
      for ev in line.events:
        if ev.name in instructions:
          per_op[ev.name] += ev.duration_ns
  return instructions, per_op, wall


def trace_ops(jitted, make_args, steps: int, vocab: int, rank: int | None = None, **static):
  """Traces `steps` runs of `jitted(*make_args(), **static)`: per-group ms per run.

  `make_args` returns fresh arguments for each run (a program may donate its input).
  """
  instructions, per_op, wall = op_times(jitted, make_args, steps, **static)
  # Thunks nest (a loop's or a conditional's spans its body's): the run's time is the sum
  # over the entry computation's thunks, the groups are summed over the leaves.
  busy = sum(ns for n, ns in per_op.items() if instructions[n]["entry"]) / 1e6 / steps
  groups = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0, "top": []})
  for name, ns in per_op.most_common():
    info = instructions[name]
    if info["opcode"] in ("while", "conditional", "call"):
      continue
    g = group_of(name, info, vocab, rank)
    ms = ns / 1e6 / steps
    groups[g]["ms"] += ms
    groups[g]["ops"] += 1
    if len(groups[g]["top"]) < 4:
      groups[g]["top"].append({"op": name, "ms": round(ms, 3), "shape": info["shape"]})
  leaves = sum(v["ms"] for v in groups.values())
  if busy > leaves:  # container thunks' own time (loop bookkeeping, small calls)
    groups["other"]["ms"] += busy - leaves
  return {
    "wall_ms_per_run": wall * 1e3,
    "thunk_ms_per_run": busy,
    "groups": {g: groups[g] for g in GROUPS if g in groups},
  }


def filled_decode_state(config, batch: int, capacity: int, filled: int, spec):
  """A decode state over a cache of `capacity` rows, the first `filled` written (zeros:
  the values do not change a step's time), as after a prefill of `filled` tokens."""
  cache = KVCache.empty(config, batch, capacity).replace(
    valid=jnp.arange(capacity)[None].repeat(batch, 0) < filled,
    positions=jnp.arange(capacity, dtype=jnp.int32)[None].repeat(batch, 0),
    index=jnp.asarray(filled, jnp.int32),
  )
  logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
  return decode.start(logits, jnp.full((batch,), filled), cache, jax.random.key(0), spec)


def profile_decode(params, batch: int, capacity: int, filled: int, steps: int) -> dict:
  cfg = params.config
  spec = decode.DecodeSpec(max_new_tokens=steps + 2)

  def make():  # a fresh state each time: the step donates its input
    return params, filled_decode_state(cfg, batch, capacity, filled, spec)

  row = trace_ops(decode.jit_decode_step, make, steps, cfg.vocab_size, spec=spec)
  return {"case": f"decode B={batch}", "capacity": capacity, "filled": filled, **row}


def profile_cache_path(lm, k: int, length: int, prompt_tokens: int, steps: int) -> dict:
  """The synthesizer's first token as `synthesize` runs it, LoRA and mapper at init."""
  cfg = lm.config
  rng = np.random.default_rng(0)
  low = min(100, cfg.vocab_size // 4)
  branches = ps.encode_branches(lm, rng.integers(low, cfg.vocab_size, (k, length)).tolist())
  prompt = rng.integers(low, cfg.vocab_size, prompt_tokens).tolist()
  lora_config = ps.LoRAConfig()
  lora = ps.LoRAWeights.init(cfg, lora_config)
  op = resolve(ps.Mapper.create("affine", cfg.num_layers), None)
  spec, batch, _ = lm.prepare([prompt], 1, lora=lora)
  rows = branch_rows(branches, op)
  capacity = rows + decode.bucket(batch.tokens.shape[1] + 1)

  def make():
    tokens, positions, mask = (jnp.asarray(a) for a in (batch.tokens, batch.positions, batch.mask))
    return lm.params, branches, tokens, positions, mask, op, lora, jax.random.key(0)

  row = trace_ops(
    _jit_first_token,
    make,
    steps,
    cfg.vocab_size,
    lora_config.rank,
    spec=spec,
    rows=rows,
    capacity=capacity,
  )
  return {"case": f"cache path K={k} L={length}", "rows": rows, **row}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("program", choices=("decode", "cache-path"))
  ap.add_argument("--model", default="qwen", choices=("qwen", "qwen-shape", "tiny"))
  ap.add_argument("--batches", default="1,3,16", help="decode: batch sizes")
  ap.add_argument("--capacity", type=int, default=288, help="decode: cache rows")
  ap.add_argument("--filled", type=int, default=48, help="decode: rows written")
  ap.add_argument("--k", type=int, default=3, help="cache path: branches")
  ap.add_argument("--lengths", default="128,512,1024", help="cache path: branch lengths")
  ap.add_argument("--prompt-tokens", type=int, default=80, help="cache path")
  ap.add_argument("--steps", type=int, default=8, help="traced runs per case")
  ap.add_argument("--out", default="outputs/profile_ops.json")
  ap.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  args = ap.parse_args()
  run = bench_meta.start(force=args.force)
  bench_meta.print_warning(run.meta)
  bandwidth = limits.memory_bandwidth()["bandwidth_gbps"]
  lm = load(args.model)
  weight_floor_ms = limits.weight_read_bytes(lm.params) / (bandwidth * 1e9) * 1e3
  if args.program == "decode":
    cases = [
      lambda b=b: profile_decode(lm.params, b, args.capacity, args.filled, args.steps)
      for b in map(int, args.batches.split(","))
    ]
  else:
    cases = [
      lambda n=n: profile_cache_path(lm, args.k, n, args.prompt_tokens, args.steps)
      for n in map(int, args.lengths.split(","))
    ]
  rows = []
  for case in cases:
    row = case()
    rows.append(row)
    print(
      f"\n{row['case']}: {row['wall_ms_per_run']:.1f} ms/run traced,"
      f" {row['thunk_ms_per_run']:.1f} ms in thunks; weight-read floor {weight_floor_ms:.1f} ms"
      f" ({bandwidth:.1f} GB/s)"
    )
    for g, v in row["groups"].items():
      top = ", ".join(f"{t['op']} {t['ms']:.2f} {t['shape']}" for t in v["top"][:2])
      print(f"  {g:12s} {v['ms']:7.2f} ms  {v['ms'] / row['thunk_ms_per_run']:5.1%}  {top}")
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  meta.update(bandwidth_gbps=bandwidth, weight_floor_ms=weight_floor_ms, model=args.model)
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
