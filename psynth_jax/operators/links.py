"""Learned link tokens (KVLink-style): a few trained tokens after each branch, run at merge time.

Branch rows are encoded alone, so no row has seen another branch. KVLink (Yang et al.,
2025) appends a few trained "link" tokens to each reused segment and computes their
keys and values at merge time over the reused caches, so they can carry what ties the
segments together. Here every branch i gets the same n link tokens (trained input
vectors `embeddings` [n, D], no vocabulary entry) at positions span_i + j, right after
the branch in the shared-start layout:

1. Merge as the paper does (`reencode`: re-encode to the shared start, the mapper).
2. Branch i's links run through every layer of the frozen base (no LoRA), each seeing
   every merged branch row (all branches: the cross-branch context) and the links of
   branch i before it.
3. Their K * n rows follow the branch rows (`extra_rows`). The synthesizer starts
   where the paper's does (max_i span_i), so the longest branch's links share
   positions with its first tokens, and closed links are the paper's path exactly.
   Links of an empty branch are left invalid.

The synthesizer's attention to link row j carries a trained score bias `gate[j]` (the
cache's per-row bias, as in `ape`). Softmax cannot give an added row zero weight and a
gradient at once, so the links start nearly off: at the default gate -4 a link row
whose score equals a branch row's gets e^-4 (1.8 %) of its weight; gate = -inf is the
paper's path exactly (`closed()`). Order-free: permuting the branches permutes their
rows and their links' rows, and every link sees the branches as a set.

`layout="sequential"` lays the branches end to end first (`sequential.py`: branch i
starts where branch i - 1 ends), each branch's links right after it, and the synthesizer
after the last branch: closed links are then the sequential-positions path exactly. That
layout is order-dependent, as `sequential` is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import pytree
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import hidden_states
from psynth_jax.operators.base import register
from psynth_jax.operators.reencode import Reencode
from psynth_jax.operators.sequential import laid_end_to_end

LAYOUTS = ("shared", "sequential")  # the branches' positions: a shared start, or end to end

GATE_INIT = -4.0
INIT_STD = 0.02  # the embedding table's init scale (x sqrt(D) for Gemma's scaled inputs)


@register("links")
@pytree.dataclass
class Links(Reencode):
  """Reencode + n trained link tokens per branch, recomputed over the merged cache."""

  embeddings: jax.Array | None = None  # [n, D] float32, the links' input vectors
  gate: jax.Array | None = None  # [n] float32, the synthesizer's score bias per link
  layout: str = pytree.field(static=True, default="shared")  # LAYOUTS

  @classmethod
  def create(
    cls,
    config,
    mapper=None,
    seed=0,
    num_links: int = 2,
    gate: float = GATE_INIT,
    layout: str = "shared",
  ):
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if not (isinstance(num_links, int) and num_links >= 1):
      raise ValueError(f"num_links={num_links!r} must be a positive integer")
    if not (isinstance(gate, (int, float)) and gate < math.inf and not math.isnan(gate)):
      raise ValueError(f"gate={gate!r} must be a number below +inf (-inf: links closed)")
    base = Reencode.create(config, mapper, seed)
    std = INIT_STD * (math.sqrt(config.hidden_size) if config.embed_scale else 1.0)
    rng = np.random.default_rng(seed)  # host-side: the same links for a seed everywhere
    embeddings = (std * rng.standard_normal((num_links, config.hidden_size))).astype(np.float32)
    gates = jnp.full((num_links,), gate, jnp.float32)
    op = cls(base.mapper, jnp.asarray(embeddings), gates, layout)
    op.check(config)
    return op

  @property
  def num_links(self) -> int:
    return self.embeddings.shape[0]

  @property
  def order_free(self) -> bool:
    return self.layout == "shared"

  @property
  def name(self) -> str:
    inner = super().name
    head = f"links{self.num_links}" + ("" if self.layout == "shared" else f"_{self.layout}")
    return head if inner == "naive_merge" else f"{head}/{self.mapper.kind}"

  def closed(self) -> Links:
    """The same operator with every link's weight at exactly 0: the paper's path."""
    return self.replace(gate=jnp.full_like(self.gate, -jnp.inf))

  def extra_rows(self, num_branches: int) -> int:
    return num_branches * self.num_links

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    n, k = self.num_links, branches.num_branches
    base = rows - self.extra_rows(k)  # the caller sized rows for both (`extra_rows`)
    laid = branches if self.layout == "shared" else laid_end_to_end(branches)
    cache = super().merge(params, laid, rows=base, capacity=base + n, num_workers=num_workers)
    embedded = self.embeddings.astype(jnp.float32)[None]  # [1, n, D]
    dummy = jnp.zeros((1, n), jnp.int32)

    def run(end):  # branch i's links over the merged cache, after its last row -> their rows
      positions = end + jnp.arange(n, dtype=jnp.int32)
      _, out = hidden_states(params, dummy, positions[None], cache, embedded=embedded)
      return tuple(x[0, :, base:] for x in out.k), tuple(x[0, :, base:] for x in out.v), positions

    ends = branches.span if self.layout == "shared" else jnp.cumsum(branches.span)
    link_k, link_v, link_pos = jax.vmap(run)(ends)  # L x [K, G, n, H], [K, n]
    link_valid = jnp.repeat(branches.lengths > 0, n)  # [K * n]
    pad = capacity - rows

    def place(branch_x, link_x):  # [1, G, base + n, H], [K, G, n, H] -> [1, G, capacity, H]
      g, h = link_x.shape[1], link_x.shape[3]
      links = link_x.transpose(1, 0, 2, 3).reshape(g, k * n, h)  # branch-major, as the rows
      x = jnp.concatenate([branch_x[0, :, :base], links], axis=1)
      return jnp.pad(x, ((0, 0), (0, pad), (0, 0)))[None]

    def column(branch_row, link_row):  # [base + n], [K * n] -> [1, capacity]
      return jnp.pad(jnp.concatenate([branch_row[:base], link_row]), (0, pad))[None]

    gate = jnp.where(link_valid, jnp.tile(self.gate.astype(jnp.float32), k), 0.0)
    return cache.replace(
      k=tuple(place(b, x) for b, x in zip(cache.k, link_k, strict=True)),
      v=tuple(place(b, x) for b, x in zip(cache.v, link_v, strict=True)),
      positions=column(cache.positions[0], link_pos.reshape(-1)),
      valid=column(cache.valid[0], link_valid),
      bias=column(jnp.zeros(base + n, jnp.float32), gate),
      index=jnp.asarray(rows, jnp.int32),
    )

  def start(self, branches):
    return super().start(branches) if self.layout == "shared" else branches.span.sum()

  def flops(self, config: ModelConfig, branches) -> float:
    from psynth_jax.eval.ttft import prefill_flops

    total = int(np.asarray(branches.lengths).sum())
    k = int((np.asarray(branches.lengths) > 0).sum())
    head = 2 * config.hidden_size * config.vocab_size  # no unembedding for the links
    return super().flops(config, branches) + k * (
      prefill_flops(config, self.num_links, total) - head
    )

  def check(self, config: ModelConfig) -> None:
    super().check(config)
    shape = tuple(self.embeddings.shape)
    if len(shape) != 2 or shape[1] != config.hidden_size or tuple(self.gate.shape) != shape[:1]:
      raise ValueError(
        f"link tokens of shape {shape} (gate {tuple(self.gate.shape)}) do not fit a model of"
        f" hidden size {config.hidden_size}: expected [n, {config.hidden_size}] and [n]"
      )
