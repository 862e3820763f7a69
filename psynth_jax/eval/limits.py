"""Machine limits, measured in the same run as the times they bound.

* Memory bandwidth (GB/s): a jitted full read (a sum) of a large array on the
  default device and a NumPy copy (each byte read and written); the larger
  of the two is used, since a floor must be a lower bound on time. Weight-read
  floor of one decode step = bytes of the weights it reads / bandwidth.
* Matmul GFLOP/s at the model's shapes: jitted [M, D] -> [M, F] and
  [M, F] -> [M, D] products of [out, in] weights (D = hidden, F = intermediate; M = batch for
  decode, prompt tokens for prefill), in the model's dtype. Compute floor = the step's FLOPs / that rate.
  `torch_matmul_gflops` is the same probe for a transformers peer, whose
  limit is oneDNN's, not XLA's.

A limit is the best of its repeats (what the machine can do); the benchmark
times next to it stay medians. The weight-read floor assumes the weights
stream from memory: a model small enough to stay in the last-level cache
(the tiny test models) can run below it.

`Limits` turns those two measurements into the floors of a benchmark's stages
(a prefill, decode steps, a cache merge) for one model: each stage's floor is
max(bytes it must move / bandwidth, its FLOPs / the matmul rate at its M), and
stages run one after another add (`total`). The bytes are the weights it reads
(`weight_read_bytes`, plus an adapter's) and the KV cache rows it must read
and write; the FLOPs are `psynth_jax.eval.ttft.prefill_flops`'s count (matmuls
and causal attention) per call. `attention_cost` is the same for one attention
call alone. `Limits.of_torch` gives a transformers peer the same formula with
its own bytes, dtype and matmul probe (oneDNN's rate, not XLA's).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model.config import ModelConfig
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
  runs ~15x slower than the same products in a loop.) The weights are laid out
  [out, in] and multiplied as the model's are (`psynth_jax.model.layers.MLP`).
  """
  r = _rounds(m, k, n)
  kx, ku, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  # Scaled so that activations stay O(1) through the chain.
  up = (jax.random.normal(ku, (n, k), jnp.float32) * k**-0.5).astype(dtype)
  down = (jax.random.normal(kd, (k, n), jnp.float32) * n**-0.5).astype(dtype)

  def pair(x, up, down):
    return jnp.einsum("mn,kn->mk", jnp.einsum("mk,nk->mn", x, up), down)

  chain = jax.jit(lambda x, up, down: jax.lax.fori_loop(0, r, lambda _, x: pair(x, up, down), x))
  best = _best_s(lambda: jax.block_until_ready(chain(x, up, down)), repeats)
  return 4 * r * m * k * n / best / 1e9


def torch_matmul_gflops(
  m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5, device: str = "cpu"
) -> float:
  """The same probe in eager PyTorch on `device` (on a CPU its matmul goes through oneDNN,
  not XLA; on a GPU through cuBLAS, synchronised before the clock stops), with the weights
  laid out as `torch.nn.Linear` keeps them."""
  import torch

  r = _rounds(m, k, n)
  gen = torch.Generator().manual_seed(0)
  dt = getattr(torch, dtype)
  x = torch.randn(m, k, generator=gen).to(device, dt)
  up = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, dt)  # [out, in], as Linear's
  down = (torch.randn(k, n, generator=gen) * n**-0.5).to(device, dt)

  def chain():
    y = x
    for _ in range(r):
      y = (y @ up.T) @ down.T
    if device != "cpu":
      torch.cuda.synchronize(device)
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


def expert_bytes(params: Params) -> int:
  """Bytes of the mixture-of-experts layers' expert weights (0 for a dense model)."""
  return sum(
    int(a.size) * a.dtype.itemsize for name, a in flat_state(params).items() if ".experts." in name
  )


def experts_read(config: ModelConfig, tokens: int) -> float:
  """The fraction of each expert layer's experts a program over `tokens` tokens reads.

  Routing is data-dependent, so this is its expectation under uniform top-k routing,
  1 - (1 - k/E)^T: k/E for one token, all of them for a long prefill. 1 for dense models.
  """
  if not config.moe_layers:
    return 1.0
  k, e = config.num_experts_per_tok, config.num_experts
  return 1.0 - (1.0 - k / e) ** max(1, tokens)


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


def total(*stages: dict) -> dict:
  """The floors of stages run one after another: every field summed (a floor of each, added)."""
  keys = ("bytes", "flops", "memory_floor_s", "compute_floor_s", "floor_s")
  return {k: sum(stage[k] for stage in stages) for k in keys}


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of a pytree (e.g. the `LoRAWeights` an adapted call reads)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kv_row_bytes(config: ModelConfig) -> int:
  """Bytes of one token's keys and values over every layer (the cache is in the model's dtype)."""
  c = config
  return 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize


def decode_steps(token_lists: Sequence[Sequence[int]], max_new_tokens: int) -> int:
  """Decode steps a fused loop ran after the prefill, from its trimmed outputs.

  The prefill samples the first token; each step samples one more for every
  sequence, until all have stopped or `max_new_tokens` are out. A sequence that
  stopped generated its stop id too (trimmed from its list, hence the + 1).
  """
  return max(min(max_new_tokens, len(t) + 1) for t in token_lists) - 1


def _prefill_flops(config, queries, keys_before, lora_config) -> float:
  from psynth_jax.eval.ttft import prefill_flops  # a lazy import: ttft imports this module

  return prefill_flops(config, queries, keys_before, lora_config)


@dataclasses.dataclass
class Limits:
  """One run's limits for one model: the measured bandwidth and matmul GFLOP/s per M.

  The matmul rate is probed (`matmul_gflops` at [M, D] x [D, F], the model's
  dtype) the first time a stage asks for its M; `rates` keeps every probe for
  the JSON. Each stage method returns {"bytes", "flops", "memory_floor_s",
  "compute_floor_s", "floor_s"} (seconds; floor = the larger of the two).

  Attributes:
    config: the model's config (shapes, dtype).
    bandwidth_gbps: `memory_bandwidth()["bandwidth_gbps"]`, measured in this run.
    weight_bytes: `weight_read_bytes` of the model's parameters.
    expert_bytes: the part of `weight_bytes` in expert weights (`expert_bytes`): a
      program over T tokens reads `experts_read(config, T)` of it.
    rates: {M: GFLOP/s} of the probes run so far.
    probe: the matmul probe, `probe(m, k, n, dtype)` -> GFLOP/s (`matmul_gflops`;
      `torch_matmul_gflops` for a transformers peer).
  """

  config: ModelConfig
  bandwidth_gbps: float
  weight_bytes: int
  rates: dict[int, float] = dataclasses.field(default_factory=dict)
  probe: Callable[[int, int, int, str], float] = matmul_gflops
  expert_bytes: int = 0

  @classmethod
  def of(cls, params: Params, bandwidth_gbps: float) -> Limits:
    return cls(
      params.config, bandwidth_gbps, weight_read_bytes(params), expert_bytes=expert_bytes(params)
    )

  @classmethod
  def of_torch(cls, model, config: ModelConfig, bandwidth_gbps: float) -> Limits:
    """The limits of a transformers peer of `config`'s model: the same formula, its own numbers.

    Its bytes (`torch_weight_read_bytes`: call before adding adapters), its
    parameters' dtype (the KV rows and the probe's dtype) and oneDNN's matmul
    rate (`torch_matmul_gflops`), with `config`'s shapes.
    """
    weight = next(model.parameters())
    dtype = str(weight.dtype).removeprefix("torch.")
    return cls(
      dataclasses.replace(config, dtype=dtype),
      bandwidth_gbps,
      torch_weight_read_bytes(model),
      probe=functools.partial(torch_matmul_gflops, device=str(weight.device)),
      expert_bytes=sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n
      ),
    )

  def weights_read(self, tokens: int) -> float:
    """Weight bytes one program over `tokens` tokens reads (dense: all of them)."""
    unread = self.expert_bytes * (1.0 - experts_read(self.config, tokens))
    return self.weight_bytes - unread

  def rate(self, m: int) -> float:
    """Matmul GFLOP/s at M = m rows (probed once per m)."""
    m = max(1, int(m))
    if m not in self.rates:
      c = self.config
      self.rates[m] = self.probe(m, c.hidden_size, c.intermediate_size, str(c.dtype))
    return self.rates[m]

  def stage(self, nbytes: float, flops: float, m: int) -> dict:
    """Floors of a stage that moves `nbytes` and computes `flops` in matmuls of M = m rows."""
    memory_s = nbytes / (self.bandwidth_gbps * 1e9)
    compute_s = flops / (self.rate(m) * 1e9) if flops else 0.0
    return {
      "bytes": nbytes,
      "flops": flops,
      "memory_floor_s": memory_s,
      "compute_floor_s": compute_s,
      "floor_s": max(memory_s, compute_s),
    }

  def _adapter(self, lora) -> tuple[int, object]:
    return (0, None) if lora is None else (tree_bytes(lora), lora.config)

  def prefill(
    self, prompt_lengths: Sequence[int], keys_before: int | Sequence[int] = 0, lora=None
  ) -> dict:
    """One prefill program over a batch: sequence b's prompt after keys_before[b] cached rows.

    Reads every weight once (and `lora`, a `LoRAWeights`, if given), the cached
    rows its queries attend to, and writes its own rows. Counts true lengths,
    not the padded ones a program computes.
    """
    before = [keys_before] * len(prompt_lengths) if isinstance(keys_before, int) else keys_before
    lora_bytes, lora_config = self._adapter(lora)
    flops = sum(
      _prefill_flops(self.config, n, k, lora_config)
      for n, k in zip(prompt_lengths, before, strict=True)
    )
    rows = sum(before) + sum(prompt_lengths)
    tokens = sum(prompt_lengths)
    nbytes = self.weights_read(tokens) + lora_bytes + rows * kv_row_bytes(self.config)
    return self.stage(nbytes, flops, tokens)

  def decode(self, contexts: Sequence[float], steps: int, lora=None, unembed: bool = True) -> dict:
    """`steps` decode steps of a batch (one step: one token per sequence, a full weight read).

    Args:
      contexts: per sequence, the keys before its first decoded token (prompt,
        merged rows); step i's token attends to contexts[b] + i + 1 keys.
      steps: decode steps (`decode_steps`); 0 gives a zero floor.
      lora: the `LoRAWeights` every step also reads (None: none).
      unembed: False for a step that only writes its cache rows (a worker's
        final feed of its last token): no unembedding read or computed.
    """
    c = self.config
    lora_bytes, lora_config = self._adapter(lora)
    b = len(contexts)
    mean = sum(contexts) / b + (steps - 1) / 2  # FLOPs and rows read are affine in the context
    flops = b * steps * _prefill_flops(c, 1, mean, lora_config)
    weights = self.weights_read(b)
    if not unembed:
      flops -= b * steps * 2 * c.hidden_size * c.vocab_size
      weights -= c.vocab_size * c.hidden_size * jnp.dtype(c.dtype).itemsize
    rows = b * steps * (mean + 1)  # per step: context + i rows read, one written
    nbytes = steps * (weights + lora_bytes) + rows * kv_row_bytes(c)
    return self.stage(nbytes, flops, b)

  def generation(
    self,
    prompt_lengths: Sequence[int],
    steps: int,
    keys_before: int | Sequence[int] = 0,
    lora=None,
    feed_last: bool = False,
  ) -> dict:
    """A prefill of the prompts, then `steps` decode steps of the batch (`total` of both).

    `feed_last`: the worker programs feed the last sampled token once more, to
    write its cache row (`psynth_jax.workers`): one more step, without unembedding.
    """
    before = [keys_before] * len(prompt_lengths) if isinstance(keys_before, int) else keys_before
    contexts = [k + n for k, n in zip(before, prompt_lengths, strict=True)]
    stages = [self.prefill(prompt_lengths, before, lora), self.decode(contexts, steps, lora)]
    if feed_last:
      stages.append(self.decode([c + steps for c in contexts], 1, lora, unembed=False))
    return total(*stages)

  def merge(self, branch_rows: int) -> dict:
    """Re-encode + map + merge of `branch_rows` branch rows: each read once, written once."""
    return self.stage(2 * branch_rows * kv_row_bytes(self.config), 0.0, 1)


def attention_cost(
  batch: int,
  queries: int,
  rows: int,
  heads: int,
  kv_heads: int,
  head_dim: int,
  offset: int | None = None,
  itemsize: int = 4,
) -> dict[str, float]:
  """Work of one attention call q [B, T, N, H] over k, v [B, G, S, H] and a [B, T, S] bool mask.

  Args:
    offset: causal: query j sits at row offset + j and sees rows <= it
      (None: every query sees every row).

  Returns:
    "flops": score (QK^T) and value (PV) matmuls over the visible entries only,
    2 FLOPs per multiply-add each: what any implementation must compute;
    "dense_flops": the same over every [T, S] entry (what dense attention does);
    "io_bytes": q, k, v and the mask read, the output written (any implementation);
    "score_bytes": the [B, N, T, S] float32 scores written once and read once
    (dense attention's extra traffic; a blocked one keeps them in cache).
  """
  t, s = queries, rows
  if offset is None:
    visible = t * s
  else:
    visible = int(np.minimum(offset + np.arange(t) + 1, s).clip(0).sum())
  per_entry = 4 * heads * head_dim  # QK^T and PV: 2 MACs per head-dim element
  io = batch * (2 * t * heads * head_dim + 2 * s * kv_heads * head_dim) * itemsize + batch * t * s
  return {
    "flops": batch * per_entry * visible,
    "dense_flops": batch * per_entry * t * s,
    "io_bytes": io,
    "score_bytes": 2 * batch * heads * t * s * 4,
  }
