"""An adapter's embedding copies: their shapes, the check against the base, and using them.

PEFT's `save_embedding_layers=True` (the reference release: its vocabulary was
resized to V' = 151,669 of Qwen3's 151,936 before training) and
`modules_to_save=["lm_head"]` / `["embed_tokens"]` store full copies

  base_model.model.model.embed_tokens.weight  [V', D]
  base_model.model.lm_head.weight             [V', D]

in the torch layout, which is ours (a tied model has only the embedding [V, D]).
They are the model's, not the adapter's: `check_copies` compares them with the
base's first V' rows, cast to the copy's dtype (bf16 in the release), and `apply_adapter_embeddings` makes a model that uses them.
Both read the copies in row chunks of `CHUNK_BYTES` in their own dtype, never
whole and never as float32, and slice the base on its device.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax.convert.adapter_files import EMBEDDING_KEYS, AdapterFile, open_adapter
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import with_fingerprint

# Bytes of one chunk of a copy read at a time (the release: 3,276 rows of 5,120 bf16).
CHUNK_BYTES = 32 << 20


def copy_shapes(
  f: AdapterFile, folder: Path, model_config: ModelConfig | None = None
) -> dict[str, tuple[int, int]]:
  """{module: (V', D)} of the embedding copies `f` holds, from the headers (nothing is read).

  Raises:
    ValueError: the copies are not one shared [V', D], or (with `model_config`)
      have more rows than the model's vocabulary or another D.
  """
  names = set(f.keys())
  shapes = {m: f.shape(key) for m, key in EMBEDDING_KEYS.items() if key in names}
  if not shapes:
    return {}
  if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
    raise ValueError(f"{folder}: embedding copies must share one [V', D] shape, got {shapes}")
  v, d = next(iter(shapes.values()))
  if model_config is not None and (v > model_config.vocab_size or d != model_config.hidden_size):
    raise ValueError(
      f"{folder}: embedding copies {shapes} do not fit the model's vocabulary"
      f" [{model_config.vocab_size}, {model_config.hidden_size}] (they need at most its rows"
      " and the same D)"
    )
  return shapes


def _base_matrix(config: ModelConfig, module: str) -> str:
  """The flat parameter name ([V, D]) of the base weights a copy of `module` stands for."""
  if module == "embed_tokens" or config.tie_word_embeddings:
    return "embed.embedding"
  return "lm_head"


def _chunks(v: int, d: int, itemsize: int) -> Iterator[tuple[int, int]]:
  step = max(1, CHUNK_BYTES // (d * itemsize))
  for start in range(0, v, step):
    yield start, min(v, start + step)


@functools.partial(jax.jit, static_argnames=("size",))
def _base_rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """Rows [start, start + size) of an embedding or unembedding [V, D].

  The start is traced: one compiled program per chunk size, not one per chunk.
  """
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _flat_vars(lm) -> dict[str, tuple]:
  """{flat parameter name: (nnx path, variable)} of a model's weights."""
  return {
    ".".join(str(p) for p in path): (path, var) for path, var in nnx.to_flat_state(lm.params.state)
  }


def check_copies(f: AdapterFile, folder: Path, copies: dict, lm) -> None:
  """Warns, per copy, if it differs from the base's first V' rows (how many rows, max |diff|)."""
  flat = _flat_vars(lm)
  for module, (v, d) in copies.items():
    key = EMBEDDING_KEYS[module]
    name = _base_matrix(lm.config, module)
    base = flat[name][1][...]
    rows, worst, dtype = 0, 0.0, None
    for start, stop in _chunks(v, d, base.dtype.itemsize):
      copy = f.rows(key, start, stop)  # [rows, D] in the file's dtype
      dtype = copy.dtype
      ours = np.asarray(_base_rows(base, jnp.int32(start), stop - start)).astype(dtype)
      differ = copy != ours
      if differ.any():
        rows += int(differ.any(axis=1).sum())
        worst = max(worst, float(np.abs(copy.astype(np.float32) - ours.astype(np.float32)).max()))
    if rows:
      warnings.warn(
        f"{folder}: the adapter's copy of {module} ({key}, {dtype}) differs from the base"
        f" model's {name} in {rows} of its {v} rows (max |difference| {worst:.3g}); the base"
        " model's rows are used. To use the adapter's copies instead: lm ="
        " psynth_jax.convert.peft.apply_adapter_embeddings(lm, folder)",
        stacklevel=3,
      )


def _copies_equal(f: AdapterFile, shape: tuple[int, int]) -> bool:
  v, d = shape
  for start, stop in _chunks(v, d, 4):
    a = f.rows(EMBEDDING_KEYS["embed_tokens"], start, stop)
    if not np.array_equal(a, f.rows(EMBEDDING_KEYS["lm_head"], start, stop)):
      return False
  return True


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(x: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  """`x` [V, D] with rows [start, start + len(rows)) replaced."""
  return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), start, axis=0)


def apply_adapter_embeddings(lm, folder: str | Path):
  """A new `LanguageModel` whose first V' embedding / unembedding rows are the adapter's copies.

  The copies are cast to the model's dtype; rows >= V' keep the base's values
  (an adapter with `vocab_size` V' masks those ids anyway). The weights change,
  so the fingerprint does: make the workers' branches with the returned model.
  `lm` itself is left as it was.

  Raises:
    ValueError: the folder holds no embedding copies, they do not fit the
      model, or the model ties its embedding and unembedding but the adapter's
      lm_head copy is not its embed_tokens copy (one tied matrix cannot hold both).
  """
  folder = Path(folder)
  flat = _flat_vars(lm)
  state = dict(flat.values())
  with open_adapter(folder) as f:
    copies = copy_shapes(f, folder, lm.config)
    if not copies:
      raise ValueError(
        f"{folder}: the adapter holds no embedding copies ({list(EMBEDDING_KEYS.values())})"
      )
    modules = list(copies)
    if lm.config.tie_word_embeddings:
      if "embed_tokens" not in copies or (
        "lm_head" in copies and not _copies_equal(f, copies["lm_head"])
      ):
        raise ValueError(
          f"{folder}: the model ties its embedding and unembedding, but the adapter's lm_head"
          " copy is not its embed_tokens copy; one tied matrix cannot hold both"
        )
      modules = ["embed_tokens"]
    for module in modules:
      v, d = copies[module]
      path, var = flat[_base_matrix(lm.config, module)]
      x = jnp.array(var[...], copy=True)  # donated below; the base model keeps its own
      for start, stop in _chunks(v, d, x.dtype.itemsize):
        rows = jnp.asarray(f.rows(EMBEDDING_KEYS[module], start, stop))
        x = _put_rows(x, rows, jnp.int32(start))
      state[path] = var.replace(jax.device_put(x, var[...].sharding))
  params = with_fingerprint(lm.params.replace(state=nnx.from_flat_state(list(state.items()))))
  return dataclasses.replace(lm, params=params)
