"""Grouped-query softmax attention, one entry point and its implementations.

`attention(q, k, v, key_mask, impl, scale, softcap, bias)` takes q [B, T, G, Q, H] (Q
query heads per kv head), k, v [B, G, S, H] (the cache's layout) and key_mask [B, T, S]
(True: the query may see the key) and returns [B, T, G, Q, H]. Scores are q.k * scale
(default H**-0.5), then, with a `softcap` (Gemma 2), softcap * tanh(scores / softcap),
then + bias [B, S] (a per-key score bias, None: 0). The implementations compute the same
function:

* "dense": one [Q*T, S] float32 score matrix per (batch, kv head). Fastest for short
  rows and for decode (T = 1); its memory grows with T x S.
* "blocked": an online softmax over key blocks of `BLOCK` rows in plain XLA (any
  backend): no [T, S] score matrix, blocks no query may see are skipped (a merged
  cache's unwritten capacity), and the backward pass recomputes each block's scores
  instead of keeping them.
* "cudnn": `jax.nn.dot_product_attention` with cuDNN's fused kernel (GPU, bf16/fp16).
* "auto": cuDNN on a GPU where it applies (no soft-cap: `jax.nn.dot_product_attention`
  has none), else dense up to `DENSE_MAX_SCORES` scores per (batch, kv head) and
  blocked beyond.

Over a cache (more keys than queries) only the keys some query may see are read:
the cache's capacity is split into at most `PREFIXES` static prefixes, the shortest
that holds the last visible key is chosen at run time (`lax.switch`), and the
implementation runs on that prefix alone. A decode step over a 1,024-row cache holding
200 rows reads 256 of them, not 1,024; the result is the same function (the keys left
out are masked for every query). One query per sequence (T = 1, where "auto" and
"dense" compute dense scores) runs `decode_attention` instead: a loop over the key
blocks up to the last visible key, each read where it lies, as XLA:CPU copies a
sliced prefix before it multiplies it.

A query that sees no key at all (a padding token) gets the mean of the values in
"dense" and an undefined but finite output elsewhere: nothing reads it.

TPU Pallas kernels (splash / flash attention) take a mask fixed when the kernel is
built, where ours depends on the cache's valid rows at run time: not implemented
here, refused by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blocked", "cudnn")
BLOCK = 512  # key rows per block of "blocked"
DECODE_BLOCK = 512  # key rows per block of `decode_attention` (one query over a cache)
# Q*T*S per (batch, kv head) above which "auto" blocks: on this CPU blocked is 3x faster
# already at 3M scores (a synthesizer prompt), and 2x slower at decode (T = 1); see
# experiments/bench_attention.py.
DENSE_MAX_SCORES = 1 << 18
_MASKED = -1e30  # finite, so a fully masked (padding) query stays NaN-free
PREFIXES = 8  # static key prefixes over a cache (one program branch each)
PREFIX_STEP = 128  # their lengths are multiples of this; shorter caches are read whole
# Batch from which "dense" computes a one-query step as broadcast products summed over H
# and S instead of a batched matmul. Over a cache of more than `PREFIX_STEP` rows a
# one-query step runs `decode_attention` instead, so this form is left for short key sets
# (a cache of <= 128 rows). Measured while the cache was stored [B, S, G, H]: a whole 0.5B
# decode step over 288 rows (experiments/bench_decode.py, RESULTS.md) took 773 vs 1,013 ms
# at B = 48, but 399 vs 321 ms at B = 16, where the matmul wins; 32 sits between the two
# (not measured itself). `decode_attention` is level with this form at B = 48 over 288 rows
# (RESULTS.md, "Decode attention over key blocks").
DECODE_REDUCE_MIN_BATCH = 32


def check_impl(impl: str) -> str:
  if impl in ("splash", "flash"):
    raise NotImplementedError(
      f"attention impl {impl!r}: the Pallas TPU kernels need a mask fixed when the kernel"
      " is built, and psynth_jax's masks follow the cache's valid rows at run time; use"
      f" one of {IMPLEMENTATIONS}"
    )
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return impl


def attention(
  q, k, v, key_mask, impl: str = "auto", scale=None, softcap=None, bias=None
) -> jax.Array:
  """Softmax attention of q [B, T, G, Q, H] over k, v [B, G, S, H] -> [B, T, G, Q, H]."""
  impl = check_impl(impl)
  sizes = prefix_sizes(q.shape[1], k.shape[2])
  if len(sizes) == 1 or resolve(impl, q.shape, k.shape[2], q.dtype, softcap, bias) == "cudnn":
    return _attention(q, k, v, key_mask, impl, scale, softcap, bias)
  # The last key any query sees, + 1; 0 if none does.
  seen = key_mask.any(axis=(0, 1))  # [S]
  rows = jnp.where(seen.any(), seen.shape[0] - jnp.argmax(seen[::-1]), 0)
  if q.shape[1] == 1 and resolve(impl, q.shape, k.shape[2], q.dtype, softcap, bias) == "dense":
    return decode_attention(q, k, v, key_mask, rows, scale=scale, softcap=softcap, bias=bias)
  branch = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), rows), len(sizes) - 1)

  def on_prefix(n):
    def run(q, k, v, key_mask, bias):
      bias = None if bias is None else bias[:, :n]
      k, v = k[:, :, :n], v[:, :, :n]
      return _attention(q, k, v, key_mask[..., :n], impl, scale, softcap, bias)

    return run

  return jax.lax.switch(branch, [on_prefix(n) for n in sizes], q, k, v, key_mask, bias)


def prefix_sizes(queries: int, keys: int) -> tuple[int, ...]:
  """The key prefixes `attention` may read: (keys,) unless the keys are a cache longer
  than `PREFIX_STEP` (more keys than queries), else up to `PREFIXES` lengths ending at it."""
  if keys <= queries or keys <= PREFIX_STEP:
    return (keys,)
  step = -(-keys // PREFIXES)
  step = -(-step // PREFIX_STEP) * PREFIX_STEP
  return (*range(step, keys, step), keys)


def _attention(q, k, v, key_mask, impl, scale, softcap, bias) -> jax.Array:
  impl = resolve(impl, q.shape, k.shape[2], q.dtype, softcap, bias)
  if impl == "dense":
    return dense_attention(q, k, v, key_mask, scale, softcap, bias)
  if impl == "blocked":
    return blocked_attention(q, k, v, key_mask, scale=scale, softcap=softcap, bias=bias)
  if softcap is not None or bias is not None:
    raise ValueError(
      "attention impl 'cudnn' has no soft-capping or score bias here; use 'blocked' or 'dense'"
    )
  return cudnn_attention(q, k, v, key_mask, scale)


def resolve(impl: str, q_shape, rows: int, dtype, softcap=None, bias=None) -> str:
  """The implementation "auto" stands for for q of `q_shape` over `rows` keys here."""
  if impl != "auto":
    return impl
  gpu_dtype = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if jax.default_backend() == "gpu" and gpu_dtype and softcap is None and bias is None:
    return "cudnn"
  _, t, _, qh, _ = q_shape
  return "blocked" if qh * t * rows > DENSE_MAX_SCORES else "dense"


def _scores(logits, h: int, scale, softcap):
  """Raw float32 q.k products -> scaled (and soft-capped) scores."""
  logits = logits * (h**-0.5 if scale is None else scale)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return logits


def _biased(logits, bias):
  """Scores [B, G, Q, T, S] + a per-key bias [B, S] (None: unchanged)."""
  return logits if bias is None else logits + bias[:, None, None, None, :]


def dense_attention(q, k, v, key_mask, scale=None, softcap=None, bias=None) -> jax.Array:
  """The reference: the Q query heads that share a kv head are folded with T into one
  matmul dimension M = Q*T, one [M, H] x [S, H]^T product per (batch, kv head), each
  key matrix read in place; on CPU 2-4x faster than a 5-D einsum, and k/v are never
  copied per query head."""
  b, t, g, qh, h = q.shape
  if t == 1 and b >= DECODE_REDUCE_MIN_BATCH:
    return _decode_attention(q, k, v, key_mask, scale, softcap, bias)
  q = q.transpose(0, 2, 3, 1, 4).reshape(b, g, qh * t, h)  # [B, G, M, H]
  logits = jnp.einsum("BGMH,BGSH->BGMS", q, k, preferred_element_type=jnp.float32)
  logits = _biased(_scores(logits.reshape(b, g, qh, t, -1), h, scale, softcap), bias)
  logits = jnp.where(key_mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, g, qh * t, -1)
  out = jnp.einsum("BGMS,BGSH->BGMH", probs, v)
  return out.reshape(b, g, qh, t, h).transpose(0, 3, 1, 2, 4)


def _decode_attention(q, k, v, key_mask, scale, softcap, bias) -> jax.Array:
  """`dense_attention` for one query per row (T = 1) as broadcast products reduced over
  H and S instead of batched matmuls."""
  h = q.shape[-1]
  q1 = q[:, 0].astype(jnp.float32)  # [B, G, Q, H]
  logits = jnp.sum(q1[:, :, :, None] * k[:, :, None].astype(jnp.float32), -1)  # [B, G, Q, S]
  logits = _scores(logits, h, scale, softcap)
  if bias is not None:
    logits = logits + bias[:, None, None, :]
  logits = jnp.where(key_mask[:, :, None, :], logits, _MASKED)  # key_mask [B, 1, S]
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=3)  # [B, G, Q, H]
  return out.astype(v.dtype)[:, None]  # [B, 1, G, Q, H]


def decode_attention(
  q, k, v, key_mask, rows, block: int | None = None, scale=None, softcap=None, bias=None
) -> jax.Array:
  """One query per sequence (T = 1) over a cache whose first `rows` keys may be seen (a
  traced count): an online softmax over the key blocks that hold them, in a loop whose
  trip count is ceil(rows / block), each block sliced where it lies, where "dense" over
  a prefix has XLA:CPU copy the whole prefix first. Whole Qwen 0.5B decode steps over
  4,096 rows: level at B = 1, 1.1x at B = 3, 1.1-1.3x at B = 16 (RESULTS.md, "Decode
  attention over key blocks"; what is left is the cost per call of the small products).
  Forward only: the loop has a traced trip count, so reverse-mode differentiation is
  refused by jax (training steps have T > 1 and never come here)."""
  b, _, g, qh, h = q.shape
  c = min(block or DECODE_BLOCK, k.shape[2])
  qf = q.transpose(0, 2, 3, 1, 4).reshape(b, g, qh, h)

  def step(i, carry):
    kc, vc, mc, bc = _key_block(k, v, key_mask, bias, i, c)
    return _online_update(carry, qf, kc, vc, mc, bc, q.shape, scale, softcap)

  carry = jax.lax.fori_loop(0, (rows + c - 1) // c, step, _online_init(q.shape))
  return _online_output(carry, v.dtype)


def blocked_attention(q, k, v, key_mask, block: int = BLOCK, scale=None, softcap=None, bias=None):
  """Online softmax over key blocks (flash attention's recurrence, in plain XLA).

  Per block: scores of all queries against its keys, a running row maximum m, a
  running denominator l and a running float32 output, rescaled by exp(m_old - m_new).
  A block that no query sees is skipped (`lax.cond`). Each step is rematerialised, so
  a backward pass keeps only the running state per block, never a score matrix.

  More than `block` queries are split into chunks of `block` (`lax.map`, the last one
  padded with queries that see nothing), each with its own skips: under a causal mask a
  chunk skips the key blocks after its last query, about half of a long prompt's.

  Blocks are read in place (`dynamic_slice`); when `block` does not divide the key rows,
  the last block starts `block` rows before the end and masks the rows the block before
  it covered. Padding the keys to whole blocks instead copied every layer's cache once
  per call: a tenth of the synthesizer's first token over 3 x 1,024 branch rows.
  """
  b, t, g, qh, h = q.shape
  if t > block:
    n = -(-t // block)
    pad = ((0, 0), (0, n * block - t))
    chunks = (
      jnp.pad(q, pad + ((0, 0),) * 3).reshape(b, n, block, g, qh, h).swapaxes(0, 1),
      jnp.pad(key_mask, pad + ((0, 0),)).reshape(b, n, block, -1).swapaxes(0, 1),
    )
    out = jax.lax.map(
      lambda c: blocked_attention(c[0], k, v, c[1], block, scale, softcap, bias), chunks
    )
    return out.swapaxes(0, 1).reshape(b, n * block, g, qh, h)[:, :t]
  c = min(block, k.shape[2])
  qf = q.transpose(0, 2, 3, 1, 4).reshape(b, g, qh * t, h)

  @jax.checkpoint
  def step(carry, i):
    kc, vc, mc, bc = _key_block(k, v, key_mask, bias, i, c)

    def update(cr):
      return _online_update(cr, qf, kc, vc, mc, bc, q.shape, scale, softcap)

    return jax.lax.cond(mc.any(), update, lambda cr: cr, carry), None

  carry, _ = jax.lax.scan(step, _online_init(q.shape), jnp.arange(-(-k.shape[2] // c)))
  return _online_output(carry, v.dtype)


def _key_block(k, v, key_mask, bias, i, c: int):
  """Key block i of c rows, sliced in place: (keys, values, mask [B, T, C], bias [B, C] or
  None). The last block ends at the last row; the rows of the block before it are masked."""
  s = k.shape[2]
  start = jnp.minimum(i * c, s - c)
  kc = jax.lax.dynamic_slice_in_dim(k, start, c, axis=2)
  vc = jax.lax.dynamic_slice_in_dim(v, start, c, axis=2)
  mc = jax.lax.dynamic_slice_in_dim(key_mask, start, c, axis=2)
  mc = mc & (start + jnp.arange(c) >= i * c)  # rows of the block before: already read
  bc = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, c, axis=1)
  return kc, vc, mc, bc


def _online_init(q_shape):
  """The online softmax's running max m, denominator l [B, G, Q, T] and output
  [B, G, Q, T, H], float32."""
  b, t, g, qh, h = q_shape
  return (
    jnp.full((b, g, qh, t), -jnp.inf, jnp.float32),
    jnp.zeros((b, g, qh, t), jnp.float32),
    jnp.zeros((b, g, qh, t, h), jnp.float32),
  )


def _online_update(carry, qf, kc, vc, mc, bc, q_shape, scale, softcap):
  """One key block into the running state: scores of the queries qf [B, G, Q*T, H]
  against its keys, the maximum and denominator rescaled by exp(m_old - m_new)."""
  b, t, g, qh, h = q_shape
  c = kc.shape[2]
  m, l, acc = carry
  logits = jnp.einsum("BGMH,BGCH->BGMC", qf, kc, preferred_element_type=jnp.float32)
  logits = _biased(_scores(logits.reshape(b, g, qh, t, c), h, scale, softcap), bc)
  logits = jnp.where(mc[:, None, None], logits, _MASKED)
  m_new = jnp.maximum(m, logits.max(-1))
  p = jnp.exp(logits - m_new[..., None])
  rescale = jnp.exp(m - m_new)
  pv = jnp.einsum(
    "BGMC,BGCH->BGMH",
    p.astype(vc.dtype).reshape(b, g, qh * t, c),
    vc,
    preferred_element_type=jnp.float32,
  )
  acc = acc * rescale[..., None] + pv.reshape(b, g, qh, t, h)
  return m_new, l * rescale + p.sum(-1), acc


def _online_output(carry, dtype) -> jax.Array:
  """The running state's output [B, T, G, Q, H]; l = 0 only where no key was seen."""
  _, l, acc = carry
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out.astype(dtype).transpose(0, 3, 1, 2, 4)


def cudnn_attention(q, k, v, key_mask, scale=None) -> jax.Array:
  """cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU only)."""
  if jax.default_backend() != "gpu":
    raise ValueError(
      f"attention impl 'cudnn' needs a GPU (this backend is {jax.default_backend()!r});"
      " use 'blocked' or 'dense'"
    )
  b, t, g, qh, h = q.shape
  out = jax.nn.dot_product_attention(
    q.reshape(b, t, g * qh, h),  # query head n = kv head n // Q: our grouping
    k.transpose(0, 2, 1, 3),  # it takes [B, S, G, H]: a copy of the keys read, per call
    v.transpose(0, 2, 1, 3),
    mask=key_mask[:, None],
    scale=scale,
    implementation="cudnn",
  )
  return out.reshape(b, t, g, qh, h)
