"""Machine limits, measured in the same run as the times they bound.

* Memory bandwidth (GB/s): a jitted full read (a sum) of a large array on the
  default device and a NumPy copy (each byte read and written); the larger
  of the two is used, since a floor must be a lower bound on time. Weight-read
  floor of one decode step = bytes of the weights it reads / bandwidth.
* Matmul GFLOP/s at the model's shapes: jitted [M, D] x [D, F] and
  [M, F] x [F, D] products (D = hidden, F = intermediate; M = batch for
  decode, prompt tokens for prefill), in the model's dtype. Compute floor = the step's FLOPs / that rate.
  `torch_matmul_gflops` is the same probe for a transformers peer, whose
  limit is oneDNN's, not XLA's.

A limit is the best of its repeats (what the machine can do); the benchmark
times next to it stay medians. The weight-read floor assumes the weights
stream from memory: a model small enough to stay in the last-level cache
(the tiny test models) can run below it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model.transformer import Params, flat_state


def _best_s(fn, repeats: int) -> float:
  fn()  # compile / first touch of the pages
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _device_read_s(n: int, repeats: int) -> float:
  x = jnp.ones((n,), jnp.float32)  # freed on return, before the host copy allocates
  read = jax.jit(jnp.sum)
  return _best_s(lambda: jax.block_until_ready(read(x)), repeats)


def memory_bandwidth(nbytes: int | None = None, repeats: int = 5) -> dict[str, float]:
  """GB/s of a device read and of a host copy; "bandwidth_gbps" is the larger.

  Args:
    nbytes: probe size; default 256 MiB on CPU (well above any last-level
      cache), 2 GiB on an accelerator (so launch overhead stays small).
    repeats: timed passes after one untimed one.
  """
  if nbytes is None:
    nbytes = (256 << 20) if jax.default_backend() == "cpu" else (2 << 30)
  n = nbytes // 4
  read_s = _device_read_s(n, repeats)
  src = np.ones((n,), np.float32)
  dst = np.empty_like(src)
  copy_s = _best_s(lambda: np.copyto(dst, src), repeats)
  read_gbps = nbytes / read_s / 1e9
  copy_gbps = 2 * nbytes / copy_s / 1e9  # read + write
  return {
    "bandwidth_gbps": max(read_gbps, copy_gbps),
    "device_read_gbps": read_gbps,
    "host_copy_gbps": copy_gbps,
    "probe_bytes": nbytes,
  }


def _rounds(m: int, k: int, n: int) -> int:
  """Up/down pairs per timed call: ~0.4 GFLOP, so launch overhead does not set the rate."""
  return max(1, min(512, int(4e8 // (4 * m * k * n))))


def matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5) -> float:
  """GFLOP/s of jitted [m, k] x [k, n] and [m, n] x [n, k] matmuls in `dtype` (default device).

  Like an MLP's up and down projections, chained in a `fori_loop` inside one
  program (as a decode loop runs them), so that small shapes (a decode step's
  M = B) measure the matmul and not the cost of launching a program. (A
  `lax.map` over stacked inputs is no substitute: in bfloat16 on XLA:CPU it
  runs ~15x slower than the same products in a loop.)
  """
  r = _rounds(m, k, n)
  kx, ku, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  # Scaled so that activations stay O(1) through the chain.
  up = (jax.random.normal(ku, (k, n), jnp.float32) * k**-0.5).astype(dtype)
  down = (jax.random.normal(kd, (n, k), jnp.float32) * n**-0.5).astype(dtype)
  chain = jax.jit(lambda x, up, down: jax.lax.fori_loop(0, r, lambda _, x: (x @ up) @ down, x))
  best = _best_s(lambda: jax.block_until_ready(chain(x, up, down)), repeats)
  return 4 * r * m * k * n / best / 1e9


def torch_matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5) -> float:
  """The same probe in eager PyTorch (its CPU matmul goes through oneDNN, not XLA)."""
  import torch

  r = _rounds(m, k, n)
  gen = torch.Generator().manual_seed(0)
  dt = getattr(torch, dtype)
  x = torch.randn(m, k, generator=gen).to(dt)
  up = (torch.randn(k, n, generator=gen) * k**-0.5).to(dt)
  down = (torch.randn(n, k, generator=gen) * n**-0.5).to(dt)

  def chain():
    y = x
    for _ in range(r):
      y = (y @ up) @ down
    return y

  with torch.inference_mode():
    return 4 * r * m * k * n / _best_s(chain, repeats) / 1e9


def weight_read_bytes(params: Params) -> int:
  """Bytes of weights one decode step reads.

  Every parameter, except that an untied embedding table is only gathered
  (B rows) while its separate unembedding is read whole; a tied table is read
  once, by the unembedding.
  """
  arrays = flat_state(params)
  total = sum(int(a.size) * a.dtype.itemsize for a in arrays.values())
  if not params.config.tie_word_embeddings:
    table = arrays["embed.embedding"]
    total -= int(table.size) * table.dtype.itemsize
  return total


def torch_weight_read_bytes(model) -> int:
  """`weight_read_bytes` of a transformers causal LM (call before adding adapters)."""
  total = sum(p.numel() * p.element_size() for p in model.parameters())
  if not model.config.tie_word_embeddings:
    table = model.get_input_embeddings().weight
    total -= table.numel() * table.element_size()
  return total


def program_cost(fn, *args) -> dict[str, float]:
  """XLA's own count of a jitted program's work: {"flops", "bytes_accessed"} (0 if unknown).

  Read from the compiled program's cost analysis, so it counts what the program does
  (remat recomputation, the teacher, the backward pass), not a formula of ours.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
  }


def floors(weight_bytes: int, bandwidth_gbps: float, flops: float, gflops: float) -> dict:
  """Weight-read and compute floors (seconds) of one step, and the binding one."""
  weight_s = weight_bytes / (bandwidth_gbps * 1e9)
  compute_s = flops / (gflops * 1e9)
  return {
    "weight_floor_s": weight_s,
    "compute_floor_s": compute_s,
    "floor_s": max(weight_s, compute_s),
  }
