"""The decoder and its pure forward function.

`logits, cache = forward(params, tokens, positions, cache, mask)`: params and
the cache are explicit pytrees passed in and returned. The NNX modules below
only *define* the computation; `Params` holds a config (static) and the
module's `nnx.State`, and `forward` merges them inside whatever jit calls it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax import pytree, sharding
from psynth_jax.kv_cache import KVCache
from psynth_jax.model.attention import Attention
from psynth_jax.model.attention_ops import check_impl
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.fingerprint import digest, fingerprint, fingerprint_sample, first_layout_axes
from psynth_jax.model.layers import MLP, Embed, RMSNorm, param
from psynth_jax.model.lora import mask_vocab
from psynth_jax.model.moe import MoE, check_dispatch
from psynth_jax.model.remat import remat_layer
from psynth_jax.model.rope import layer_inv_frequencies


class Block(nnx.Module):
  """Pre-norm attention and MLP sublayers; with `post_norms` (Gemma) each sublayer's
  output is normed again before the residual add. Layer `layer`'s MLP is a mixture of
  experts where `config.is_moe(layer)` (`psynth_jax.model.moe`)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
    dtype = jnp.dtype(config.dtype)
    d, eps, plus_one = config.hidden_size, config.rms_norm_eps, config.norm_plus_one
    self.attn_norm = RMSNorm(d, eps, dtype, plus_one=plus_one)
    self.attn = Attention(config, rngs)
    self.mlp_norm = RMSNorm(d, eps, dtype, plus_one=plus_one)
    self.mlp = MoE(config, rngs) if config.is_moe(layer) else MLP(config, rngs)
    self.moe = config.is_moe(layer)
    if config.post_norms:
      self.post_attn_norm = RMSNorm(d, eps, dtype, plus_one=plus_one)
      self.post_mlp_norm = RMSNorm(d, eps, dtype, plus_one=plus_one)
    self.post_norms = config.post_norms

  def __call__(
    self,
    x,
    positions,
    inv_freq,
    cache_kv,
    index,
    key_mask,
    lora,
    impl="auto",
    key_bias=None,
    moe_dispatch="sorted",
  ):
    h, new_kv = self.attn(
      self.attn_norm(x), positions, inv_freq, cache_kv, index, key_mask, lora, impl, key_bias
    )
    if self.post_norms:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp_norm(x)
    h = self.mlp(h, moe_dispatch) if self.moe else self.mlp(h, lora)
    if self.post_norms:
      h = self.post_mlp_norm(h)
    return x + h, new_kv


class Transformer(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, rngs)
    self.layers = nnx.List([Block(config, rngs, i) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(
      config.hidden_size,
      config.rms_norm_eps,
      jnp.dtype(config.dtype),
      plus_one=config.norm_plus_one,
    )
    if not config.tie_word_embeddings:
      self.lm_head = param(  # [V, D], as the embedding and torch's Linear
        rngs,
        (config.vocab_size, config.hidden_size),
        ("vocab", "embed"),
        jnp.dtype(config.dtype),
        config.hidden_size**-0.5,
      )

  def unembed(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
    if self.config.tie_word_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("BTD,VD->BTV", x, self.lm_head[...])
    logits = logits.astype(jnp.float32)
    if (cap := self.config.final_softcap) is not None:  # Gemma 2
      logits = cap * jnp.tanh(logits / cap)
    return logits


@pytree.dataclass
class Params:
  """A model's weights: its config (static), the decoder's `nnx.State` and a fingerprint.

  `fingerprint` names these weights: "<config digest>:<weights digest>" (see
  `fingerprint`). It is static (part of the pytree's structure, never traced),
  so it survives `jax.jit`, `jax.tree.map` and sharding, and the `Branches` a
  model makes carry it: synthesis refuses branches whose fingerprint differs
  from the synthesizer's. Empty for abstract or hand-built params.
  """

  config: ModelConfig = pytree.field(static=True)
  state: nnx.State
  fingerprint: str = pytree.field(static=True, default="")
  # The mesh the weights were placed on (`params_from_flat(mesh=)`) and its logical-axis
  # rules: the forward constrains caches and activations to match (`sharding.constrain`).
  mesh: jax.sharding.Mesh | None = pytree.field(static=True, default=None)
  rules: sharding.Rules = pytree.field(static=True, default=sharding.DEFAULT_RULES)
  # How attention is computed (`psynth_jax.model.attention_ops`): the same function,
  # a runtime choice and not part of the model, so it is not in the fingerprint.
  attention: str = pytree.field(static=True, default="auto")
  # How expert layers dispatch tokens (`psynth_jax.model.moe.DISPATCHES`): likewise the
  # same function computed another way, so not in the fingerprint.
  moe_dispatch: str = pytree.field(static=True, default="sorted")

  def module(self) -> Transformer:
    return nnx.merge(graphdef(self.config), self.state)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state))

  def constrain(self, x: jax.Array, axes) -> jax.Array:
    """`x` laid out on this model's mesh by its logical axes (unchanged without a mesh)."""
    return sharding.constrain(x, axes, self.mesh, self.rules)


def with_fingerprint(params: Params) -> Params:
  """`params` with the fingerprint of its current weights (call after training them)."""
  return params.replace(fingerprint=fingerprint(params.config, flat_state(params)))


@functools.lru_cache(maxsize=64)
def graphdef(config: ModelConfig) -> nnx.GraphDef:
  abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def abstract_params(config: ModelConfig) -> Params:
  """Shapes and dtypes of every parameter (no memory allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
  return Params(config, nnx.state(abstract))


def init_params(config: ModelConfig, seed: int = 0) -> Params:
  """Randomly initialised weights (for tests and pretraining from scratch).

  Under `jax.jit` (a sharded init) the weights are not known yet, so the
  fingerprint is left empty: call `with_fingerprint` on the result.
  """
  params = Params(config, nnx.state(Transformer(config, nnx.Rngs(seed))))
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
    return params
  return with_fingerprint(params)


def hidden_states(
  params: Params,
  tokens: jax.Array,  # [B, T] int
  positions: jax.Array,  # [B, T] int
  cache: KVCache | None = None,
  mask: jax.Array | None = None,  # [B, T] bool, False for padding tokens
  lora=None,
  lora_rng: jax.Array | None = None,
  remat: str = "none",
  *,
  row_order: jax.Array | None = None,  # [B, S] int, with a cache: causal order of its rows
  num_layers: int | None = None,
  embedded: jax.Array | None = None,  # [B, T, D]: input vectors in place of embed(tokens)
) -> tuple[jax.Array, KVCache | None]:
  """Runs the decoder stack; returns final-normed hidden states [B, T, D] and the cache.

  With a cache, the T tokens are written at rows [cache.index, cache.index + T)
  and attend to every valid earlier row; without one they attend causally to
  each other only. `lora` is a `psynth_jax.model.lora.LoRAWeights` (or None);
  `lora_rng` turns on its dropout. `remat` names what each layer keeps for a
  backward pass (`psynth_jax.model.remat.POLICIES`; it changes no value).

  Two options for cache operators (`psynth_jax.operators.recompute`):
  `row_order` replaces the row index as the causal order (a row sees valid rows
  whose order is <= its own), so tokens written after the cache's rows can sit
  between them; `num_layers` runs only the first layers (their cache only, hidden
  states not final-normed); `embedded` feeds vectors that are no vocabulary entry
  (`operators/links.py`: trained link tokens; `tokens` then only gives the shape).
  """
  model = params.module()
  config = params.config
  b, t = tokens.shape
  if mask is None:
    mask = jnp.ones((b, t), bool)
  inv_freqs = layer_inv_frequencies(config)

  key_bias = None
  if cache is None:
    index = None
    rows = jnp.arange(t)
    key_mask = mask[:, None, :] & (rows[None, :] <= rows[:, None])[None]  # [B, T, T]
    key_positions = positions
  else:
    index = cache.index
    positions_all = jax.lax.dynamic_update_slice(
      cache.positions, positions.astype(jnp.int32), (0, index)
    )
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
    if cache.bias is not None:  # the rows written now carry no bias
      key_bias = jax.lax.dynamic_update_slice(
        cache.bias, jnp.zeros((b, t), jnp.float32), (0, index)
      )
    if row_order is None:
      query_rows = index + jnp.arange(t)  # [T]
      key_rows = jnp.arange(cache.capacity)  # [S]
      key_mask = valid[:, None, :] & (key_rows[None, :] <= query_rows[:, None])[None]
    else:
      query_order = jax.lax.dynamic_slice_in_dim(row_order, index, t, axis=1)  # [B, T]
      key_mask = valid[:, None, :] & (row_order[:, None, :] <= query_order[:, :, None])
    key_positions = positions_all
  # A window is over positions, not rows: a query sees keys less than `window` positions
  # back, so over a merged cache it follows the re-encoded branch positions. One mask per
  # distinct window (Gemma: local layers windowed, global layers not).
  windows = {config.window(i) for i in range(config.num_layers)} - {None}
  key_masks = {None: key_mask}
  if windows:
    distance = positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
    key_masks.update({w: key_mask & (distance < w) for w in windows})

  impl = check_impl(params.attention)
  moe_dispatch = check_dispatch(params.moe_dispatch)
  lora_layers = None if lora is None else lora.layers(lora_rng)
  x = model.embed(tokens) if embedded is None else embedded.astype(jnp.dtype(config.dtype))
  x = params.constrain(x, sharding.ACTIVATION_AXES)
  new_k, new_v = [], []
  for i, block in enumerate(model.layers):
    if num_layers is not None and i == num_layers:
      break
    cache_kv = None
    if cache is not None:
      cache_kv = tuple(params.constrain(c[i], sharding.CACHE_AXES) for c in (cache.k, cache.v))
    layer_lora = None if lora_layers is None else lora_layers[i]

    def layer(x, cache_kv, block=block, layer_lora=layer_lora, i=i):
      key_mask = key_masks[config.window(i)]
      return block(
        x,
        positions,
        inv_freqs[i],
        cache_kv,
        index,
        key_mask,
        layer_lora,
        impl,
        key_bias,
        moe_dispatch,
      )

    x, kv = remat_layer(layer, remat)(x, cache_kv)
    x = params.constrain(x, sharding.ACTIVATION_AXES)
    if kv is not None:
      new_k.append(params.constrain(kv[0], sharding.CACHE_AXES))
      new_v.append(params.constrain(kv[1], sharding.CACHE_AXES))
  if num_layers is None:
    x = model.final_norm(x)

  if cache is not None:
    cache = KVCache(
      k=tuple(new_k),
      v=tuple(new_v),
      positions=positions_all,
      valid=valid,
      index=index + t,
      bias=key_bias,
    )
  return x, cache


def unembed(params: Params, x: jax.Array, lora=None) -> jax.Array:
  """Hidden states [B, T, D] -> float32 logits [B, T, V].

  With an adapter trained on a vocabulary resized to V' < V (`lora.config.vocab_size`),
  ids >= V' get -inf: this is the one place every path given a `lora` masks them.
  """
  return mask_vocab(params.module().unembed(x), lora)


def forward(
  params: Params,
  tokens: jax.Array,
  positions: jax.Array,
  cache: KVCache | None = None,
  mask: jax.Array | None = None,
  lora=None,
) -> tuple[jax.Array, KVCache | None]:
  """`logits [B, T, V] float32, cache = forward(params, tokens, positions, cache, mask)`."""
  x, cache = hidden_states(params, tokens, positions, cache, mask, lora)
  return unembed(params, x, lora), cache


def flat_state(params: Params) -> dict[str, np.ndarray | jax.Array]:
  """Parameters as {'layers.0.attn.q': array, ...} (the names converters target)."""
  return {".".join(str(p) for p in path): var[...] for path, var in nnx.to_flat_state(params.state)}


def params_from_flat(
  config: ModelConfig,
  arrays: Mapping[str, np.ndarray],
  source: str = "checkpoint",
  mesh: jax.sharding.Mesh | None = None,
  rules=None,
) -> Params:
  """Builds Params from {name: array}, checking every name and shape.

  Arrays are looked up one at a time and dropped once placed, so a lazy mapping
  (`psynth_jax.model.checkpoint.read_safetensors`) is read tensor by tensor.

  Args:
    config: the model config (its dtype is the parameters' dtype).
    arrays: {flat parameter name: array}; any mapping.
    source: what to call the checkpoint in error messages.
    mesh: place every parameter straight into its `NamedSharding` on this mesh
      (by its logical axes and `rules`); each device receives only its slice.
      None: the default device.
    rules: logical-axis rules (default `psynth_jax.sharding.DEFAULT_RULES`).

  Raises:
    KeyError: a parameter is missing or an unexpected one is present (names all).
    ValueError: an array has the wrong shape (names it and both shapes).
  """
  abstract = abstract_params(config)
  want = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(abstract.state)}
  missing = sorted(set(want) - set(arrays))
  unexpected = sorted(set(arrays) - set(want))
  if missing or unexpected:
    raise KeyError(
      f"{source} does not match the {config.model_type} model: missing={missing},"
      f" unexpected={unexpected}"
    )
  dtype = jnp.dtype(config.dtype)
  rules = sharding.DEFAULT_RULES if rules is None else rules
  flat, samples = [], {}
  for name, var in want.items():
    arr = arrays[name]  # read (and converted) now, dropped after placement
    if tuple(arr.shape) != tuple(var.shape):
      raise ValueError(
        f"{source}: parameter {name!r} has shape {tuple(arr.shape)}, expected {tuple(var.shape)}"
      )
    if mesh is None:
      value = jnp.asarray(arr, dtype)
    else:
      value = sharding.place_array(arr, dtype, var.get_metadata().get("axes"), mesh, rules)
    flat.append((tuple(_key(p) for p in name.split(".")), var.replace(value)))
    # Sampled on the host now: slicing sharded arrays later would compile a gather each.
    samples[name] = fingerprint_sample(np.asarray(arr), first_layout_axes(name)).astype(dtype)
    del arr
  return Params(config, nnx.from_flat_state(flat), digest(config, samples), mesh, rules)


def _key(part: str):
  return int(part) if part.isdigit() else part
