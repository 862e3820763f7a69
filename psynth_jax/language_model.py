"""`LanguageModel`: weights + tokenizer + the jitted entry points users call."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.model.attention_ops import check_impl
from psynth_jax.model.lora import check_lora, vocab_limit
from psynth_jax.model.transformer import Params, forward


@jax.jit
def _logits(params: Params, tokens: jax.Array, mask: jax.Array, lora=None) -> jax.Array:
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return forward(params, tokens, positions, None, mask, lora)[0]


@dataclasses.dataclass
class LanguageModel:
  """A decoder with its tokenizer (optional: token-id APIs work without one).

  Attributes:
    params: the frozen base weights.
    tokenizer: a `psynth_jax.tokenizer.Tokenizer`-like object or None.
    stop_ids: token ids that end generation (the checkpoint's EOS ids).
    pad_id: id written into padding slots (never fed to the model unmasked).
  """

  params: Params
  tokenizer: Any = None
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0

  @property
  def config(self):
    return self.params.config

  def with_attention(self, impl: str) -> LanguageModel:
    """The same model computing attention with `impl` ("auto", "dense", "blocked", "cudnn";
    `psynth_jax.model.attention_ops`). The weights are shared, not copied."""
    check_impl(impl)
    return dataclasses.replace(self, params=self.params.replace(attention=impl))

  def logits(self, tokens, lora=None) -> jax.Array:
    """Full causal forward without a cache: tokens [B, T] -> float32 logits [B, T, V]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or 0 in tokens.shape:
      raise ValueError(f"tokens must be a non-empty [B, T] array, got shape {tokens.shape}")
    check_lora(lora, self.config)
    self.check_ids(tokens, lora)
    return _logits(self.params, tokens, jnp.ones(tokens.shape, bool), lora)

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: decode.Sampling = decode.GREEDY,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    lora=None,
  ) -> list[list[int]]:
    """Generates for a batch of token-id prompts of different lengths.

    `sampling` is static (a new one compiles); `seed` is traced (a new one does not).
    Returns, per prompt, the new token ids up to (not including) the first stop id.
    """
    check_lora(lora, self.config)
    spec, batch, capacity = self.prepare(prompts, max_new_tokens, sampling, stop_ids, lora)
    state = decode.generate_tokens(
      self.params,
      jnp.asarray(batch.tokens),
      jnp.asarray(batch.positions),
      jnp.asarray(batch.mask),
      jax.random.key(seed),
      spec,
      capacity,
      lora,
    )
    return decode.trim(jax.device_get(state.tokens), spec.stop_ids)

  def stream(
    self,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: decode.Sampling = decode.GREEDY,
    seed: int = 0,
  ) -> Iterator[int]:
    """Yields new tokens one at a time (Python step loop over the same decode step)."""
    spec, batch, capacity = self.prepare([prompt], max_new_tokens, sampling)
    first = decode.jit_begin(
      self.params,
      jnp.asarray(batch.tokens),
      jnp.asarray(batch.positions),
      jnp.asarray(batch.mask),
      jax.random.key(seed),
      spec,
      capacity,
    )
    for state in decode.step_loop(self.params, first, spec):
      token = int(state.last[0])
      if token in spec.stop_ids:
        return
      yield token

  def prepare(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: decode.Sampling = decode.GREEDY,
    stop_ids: Sequence[int] | None = None,
    lora=None,
  ) -> tuple[decode.DecodeSpec, decode.PromptBatch, int]:
    """Checks and batches prompts for a decode: (spec, left-padded batch, cache capacity).

    Raises:
      ValueError: an empty budget, ids outside the vocabulary (`lora`'s, if it
        has one), or prompt + budget beyond the model's `max_position_embeddings`.
    """
    if not isinstance(sampling, decode.Sampling):
      raise TypeError(f"sampling must be a decode.Sampling, got {type(sampling).__name__}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    length = decode.bucket(max((len(p) for p in prompts), default=0))
    batch = decode.pad_prompts(prompts, length, self.pad_id)
    self.check_ids(batch.tokens)
    if vocab_limit(lora) is not None:  # the prompts, not the padding, must fit the adapter
      self.check_ids(batch.tokens[batch.mask], lora)
    capacity = decode.bucket(length + max_new_tokens)
    limit = self.config.max_position_embeddings
    if batch.lengths.max() + max_new_tokens > limit:
      raise ValueError(
        f"prompt ({batch.lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) exceeds"
        f" the model's max_position_embeddings ({limit})"
      )
    spec = decode.DecodeSpec(
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      stop_ids=tuple(self.stop_ids if stop_ids is None else stop_ids),
      pad_id=self.pad_id,
    )
    return spec, batch, capacity

  def check_ids(self, tokens, lora=None) -> None:
    """Raises ValueError if any id is outside this model's vocabulary, or `lora`'s.

    An adapter trained on a vocabulary resized to V' (`lora.config.vocab_size`)
    never saw ids >= V' (their logits are -inf with it), so prompts holding them
    are refused rather than fed to it.
    """
    tokens = np.asarray(tokens)
    if not tokens.size:
      return
    limit = self.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= limit:
      raise ValueError(
        f"token ids must be in [0, {limit}), got range [{tokens.min()}, {tokens.max()}]"
      )
    adapter = vocab_limit(lora)
    if adapter is not None and tokens.max() >= adapter:
      raise ValueError(
        f"token ids must be in [0, {adapter}) with this LoRA adapter (its vocabulary was"
        f" resized to {adapter} of the model's {limit} ids), got ids up to {tokens.max()}"
      )

  # Text helpers (need a tokenizer).

  def encode_chat(self, user: str, system: str | None = None) -> list[int]:
    """Chat-templated prompt ids for one user message."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    text = self.require_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    return self.require_tokenizer().encode(text)

  def decode_text(self, ids: Sequence[int]) -> str:
    return self.require_tokenizer().decode(list(ids))

  def require_tokenizer(self):
    """The tokenizer; a ValueError for a model loaded without one."""
    if self.tokenizer is None:
      raise ValueError("this LanguageModel has no tokenizer; pass token ids instead")
    return self.tokenizer


def load_pretrained(
  path: str | os.PathLike, dtype: str | None = None, mesh=None, rules=None
) -> LanguageModel:
  """Loads a model from an HF folder, a converted psynth folder, or a .gguf file.

  Args:
    path: folder with `config.json` + safetensors (Hugging Face), folder with
      `psynth_config.json` (written by `psynth convert`), or a `.gguf` file.
    dtype: "float32" or "bfloat16"; default: the checkpoint's.
    mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor)
      (`psynth_jax.sharding.make_mesh`): every tensor goes straight from the
      file into its `NamedSharding` (tensor parallel over heads / MLP /
      vocabulary, fsdp over the model dim, by `rules`, default
      `psynth_jax.sharding.DEFAULT_RULES`), one tensor at a time, so neither a
      host nor a device ever holds the whole model. None: the default device.
  """
  from psynth_jax.tokenizer import Tokenizer

  params = load_params(path, dtype, mesh, rules)
  folder = os.fspath(path) if os.path.isdir(path) else os.path.dirname(os.fspath(path))
  tokenizer = None
  if os.path.exists(os.path.join(folder, "tokenizer.json")):
    tokenizer = Tokenizer.from_folder(folder)
  stop_ids = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
  pad_id = (
    tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
  )
  return LanguageModel(params, tokenizer, stop_ids, pad_id)


def load_params(path: str | Path, dtype: str | None = None, mesh=None, rules=None) -> Params:
  """Loads weights from a converted folder, an HF folder or a .gguf file.

  Args:
    path: a folder with psynth_config.json (converted), a folder with
      config.json (Hugging Face safetensors), or a .gguf file.
    dtype: "float32" | "bfloat16"; default: the source's own dtype.
    mesh, rules: sharded placement, as in `load_pretrained`.
  """
  path = Path(path).expanduser()
  from psynth_jax.model.checkpoint import CONFIG_FILE, load_converted

  if path.is_dir():
    if (path / CONFIG_FILE).is_file():
      return load_converted(path, dtype, mesh, rules)
    if (path / "config.json").is_file():
      from psynth_jax.convert.hf import load_hf_folder

      return load_hf_folder(path, dtype, mesh, rules)
    raise FileNotFoundError(
      f"{path} has neither {CONFIG_FILE} (converted) nor config.json (Hugging Face)"
    )
  if path.suffix == ".gguf":
    from psynth_jax.convert.gguf import load_gguf

    return load_gguf(path, dtype, mesh, rules)[0]
  if not path.exists():
    raise FileNotFoundError(f"no model at {path}")
  raise ValueError(f"{path}: expected a model folder or a .gguf file")
