"""The reference release's LoRA as published: a PEFT folder with embedding copies, on its own.

A release-like adapter is made with real `peft` on a tiny random Qwen3: the
vocabulary is resized from V = 64 to V' = 50 (`resize_token_embeddings`), LoRA
r=4 on q/k/v/o gets non-zero B, and `save_embedding_layers=True` writes copies
of embed_tokens and lm_head [V', D], converted to bf16 like the release's. The
base's lm_head rows >= V' are made large along the prompt's last hidden state,
so that without the vocabulary mask the argmax there would be >= V'.
"""

import copy
import dataclasses
import json
import logging
import re
import shutil
import tracemalloc
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from psynth_jax import average_adapters, load_peft_lora
from psynth_jax.convert import adapter_files, peft_embeddings
from psynth_jax.convert.adapter_files import EMBEDDING_KEYS
from psynth_jax.convert.hf import load_hf_folder
from psynth_jax.convert.peft import (
  UnsupportedAdapterError,
  apply_adapter_embeddings,
  export_peft_lora,
)
from psynth_jax.decode import Sampling
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import unembed
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.synthesis_batch import synthesize_batch
from psynth_jax.testing import hf_model, random_params, tiny_config
from psynth_jax.train import batching, losses
from psynth_jax.train import step as step_lib
from psynth_jax.workers import encode_branches

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4
V, V_ADAPTER = 64, 50
QWEN3 = dict(
  vocab_size=V,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  max_position_embeddings=64,
  tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = [3, 17, 41, 8, 22, 5, 30]  # every id < V'
TOKENS = np.asarray([PROMPT, [1, 2, 3, 4, 5, 6, 49]])


def _randomise_lora(model, seed: int = 1) -> None:
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(0.3 * torch.randn_like(p))  # B too: PEFT starts it at zero


def _torch_logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def _copies_to_bf16(folder) -> None:
  """The release's copies are bf16 (its LoRA tensors stay as saved)."""
  path = folder / "adapter_model.safetensors"
  tensors = safetensors_torch.load_file(path)
  for key in EMBEDDING_KEYS.values():
    tensors[key] = tensors[key].to(torch.bfloat16)
  safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(base folder, our LanguageModel, adapter folder, PEFT logits [2, T, V'], PEFT model)."""
  root = tmp_path_factory.mktemp("release")
  base = hf_model(transformers.Qwen3Config, 0, **QWEN3)
  resized = copy.deepcopy(base)
  resized.resize_token_embeddings(V_ADAPTER)
  model = peft.get_peft_model(resized, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
  _randomise_lora(model)
  model.eval()
  with torch.no_grad():  # the adapted model's final (normed) hidden state at the prompt's end
    h = model.base_model.model.model(input_ids=torch.tensor([PROMPT])).last_hidden_state[0, -1]
    rows = base.lm_head.weight[V_ADAPTER:]
    rows.copy_(30.0 * h / h.square().sum() + 0.01 * torch.randn_like(rows))
  base.save_pretrained(root / "base")
  model.save_pretrained(root / "adapter", save_embedding_layers=True)
  _copies_to_bf16(root / "adapter")
  lm = LanguageModel(load_hf_folder(root / "base"))
  return root / "base", lm, root / "adapter", _torch_logits(model), model


def _unmasked(lora: LoRAWeights) -> LoRAWeights:
  return lora.replace(config=dataclasses.replace(lora.config, vocab_size=None))


def _no_copy_warnings(record) -> bool:
  return not [w for w in record if "differs from the base" in str(w.message)]


# --- loading ----------------------------------------------------------------------------


def test_release_adapter_loads_with_one_argument(release):
  _, lm, folder, want, _ = release
  with open(folder / "adapter_config.json") as f:
    assert not json.load(f).get("modules_to_save")
  lora = load_peft_lora(folder)
  assert lora.config.vocab_size == V_ADAPTER
  assert (lora.config.rank, lora.config.alpha) == (4, 8.0)
  assert lora.config.targets == ("q", "k", "v", "o") and lora.num_layers == 2
  assert lora.dims("q") == (32, 64) and lora.dims("k") == (32, 32) and lora.dims("o") == (64, 32)
  got = np.asarray(lm.logits(TOKENS, lora=lora))
  np.testing.assert_allclose(got[..., :V_ADAPTER], want, atol=TOL)
  assert np.all(got[..., V_ADAPTER:] == -np.inf)
  # The optional checks give the same adapter.
  for other in (load_peft_lora(folder, lm.config), load_peft_lora(folder, lm=lm)):
    assert other.config == lora.config
    for t in lora.config.targets:
      for a, b in zip(other.arrays(t), lora.arrays(t), strict=True):
        np.testing.assert_array_equal(a, b)


def test_masked_ids_are_never_generated(release):
  _, lm, folder, _, _ = release
  lora = load_peft_lora(folder)
  unmasked = _unmasked(lora)
  assert np.asarray(lm.logits([PROMPT], lora=unmasked))[0, -1].argmax() >= V_ADAPTER
  assert lm.generate([PROMPT], 1, lora=unmasked)[0][0] >= V_ADAPTER  # the case the mask is for
  (greedy,) = lm.generate([PROMPT], 6, lora=lora)
  assert len(greedy) == 6 and max(greedy) < V_ADAPTER
  sampled = lm.generate(
    [PROMPT, PROMPT[:4]], 6, sampling=Sampling(temperature=1.0), seed=3, lora=lora
  )
  assert max(max(s) for s in sampled) < V_ADAPTER

  branches = encode_branches(lm, [[4, 8, 15], [16, 23, 42, 1]])
  logits = np.asarray(synthesis_logits(lm, branches, PROMPT, lora=lora))
  assert np.all(logits[:, V_ADAPTER:] == -np.inf) and np.isfinite(logits[:, :V_ADAPTER]).all()
  assert max(synthesize(lm, branches, PROMPT, lora=lora, max_new_tokens=4).tokens) < V_ADAPTER
  batch = synthesize_batch(
    lm, [branches, branches], [PROMPT, PROMPT[2:]], lora=lora, max_new_tokens=4
  )
  assert max(max(r.tokens) for r in batch) < V_ADAPTER


def test_prompt_ids_beyond_the_adapter_vocabulary_are_refused(release):
  _, lm, folder, _, _ = release
  lora = load_peft_lora(folder)
  bad = PROMPT + [V_ADAPTER + 2]
  lm.logits([bad])  # fine for the base model
  with pytest.raises(ValueError, match=r"\[0, 50\) with this LoRA adapter.*resized to 50"):
    lm.logits([bad], lora=lora)
  with pytest.raises(ValueError, match="resized to 50"):
    lm.generate([PROMPT, bad], 2, lora=lora)
  branches = encode_branches(lm, [[4, 8, 15]])
  with pytest.raises(ValueError, match="resized to 50"):
    synthesize(lm, branches, bad, lora=lora)
  with pytest.raises(ValueError, match="resized to 50"):
    synthesis_logits(lm, branches, bad, lora=lora)


def test_lm_check_passes_on_equal_copies_warns_on_altered_ones(release, tmp_path, caplog):
  _, lm, folder, _, _ = release
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    load_peft_lora(folder, lm=lm)  # bf16 copies == the float32 base cast to bf16
  assert _no_copy_warnings(record)

  altered = tmp_path / "altered"
  shutil.copytree(folder, altered)
  tensors = safetensors_torch.load_file(altered / "adapter_model.safetensors")
  tensors[EMBEDDING_KEYS["embed_tokens"]][[2, 7, 40]] += 0.5
  tensors[EMBEDDING_KEYS["lm_head"]][11] -= 0.25
  safetensors_torch.save_file(tensors, altered / "adapter_model.safetensors")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    load_peft_lora(altered, lm=lm)
  said = [str(w.message) for w in record if "differs from the base" in str(w.message)]
  assert len(said) == 2  # one per copy
  assert re.search(r"copy of embed_tokens.*in 3 of its 50 rows \(max \|difference\| 0\.50", said[0])
  assert re.search(r"copy of lm_head.*in 1 of its 50 rows.*apply_adapter_embeddings", said[1])
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    load_peft_lora(altered, lm=lm, embeddings="ignore")
  assert _no_copy_warnings(record)

  # Without the model the copies are not compared: said once per folder.
  with caplog.at_level(logging.WARNING, logger="psynth_jax.convert.peft"):
    load_peft_lora(altered)
    load_peft_lora(altered)
  said = [r for r in caplog.records if "were not compared" in r.getMessage()]
  assert len(said) == 1 and "embed_tokens and lm_head" in said[0].getMessage()
  with pytest.raises(ValueError, match="embeddings must be"):
    load_peft_lora(folder, embeddings="use")


def test_apply_adapter_embeddings_uses_the_copies(release, tmp_path):
  base_folder, lm, _, _, _ = release
  resized = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  resized.resize_token_embeddings(V_ADAPTER)
  torch.manual_seed(5)
  with torch.no_grad():  # copies that differ from the base (e.g. trained new tokens)
    resized.model.embed_tokens.weight.add_(
      0.5 * torch.randn_like(resized.model.embed_tokens.weight)
    )
    resized.lm_head.weight.add_(0.5 * torch.randn_like(resized.lm_head.weight))
  model = peft.get_peft_model(resized, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
  _randomise_lora(model, seed=2)
  model.eval()
  want = _torch_logits(model)
  model.save_pretrained(tmp_path, save_embedding_layers=True)

  with pytest.warns(UserWarning, match="in 50 of its 50 rows"):
    lora = load_peft_lora(tmp_path, lm=lm)
  base_logits = np.asarray(lm.logits(TOKENS, lora=lora))
  assert np.abs(base_logits[..., :V_ADAPTER] - want).max() > 0.1  # the copies matter
  adapted = apply_adapter_embeddings(lm, tmp_path)
  got = np.asarray(adapted.logits(TOKENS, lora=lora))
  np.testing.assert_allclose(got[..., :V_ADAPTER], want, atol=TOL)
  assert adapted.params.fingerprint != lm.params.fingerprint
  np.testing.assert_array_equal(np.asarray(lm.logits(TOKENS, lora=lora)), base_logits)  # untouched
  new, old = adapted.params.state, lm.params.state
  np.testing.assert_array_equal(new["lm_head"][...][V_ADAPTER:], old["lm_head"][...][V_ADAPTER:])
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    load_peft_lora(tmp_path, lm=adapted)
  assert _no_copy_warnings(record)
  with pytest.raises(ValueError, match="no embedding copies"):
    apply_adapter_embeddings(lm, _plain_adapter(lm, tmp_path / "plain"))


def _plain_adapter(lm, folder):
  return export_peft_lora(LoRAWeights.init(lm.config, LoRAConfig(rank=2)), folder)


def test_tied_embeddings_take_one_copy(tmp_path):
  base = hf_model(transformers.Qwen3Config, 0, **{**QWEN3, "tie_word_embeddings": True})
  base.save_pretrained(tmp_path / "base")
  lm = LanguageModel(load_hf_folder(tmp_path / "base"))
  assert lm.config.tie_word_embeddings
  base.resize_token_embeddings(V_ADAPTER)
  with torch.no_grad():  # tied: the head moves with the embedding
    base.model.embed_tokens.weight[:5] += 0.5
  model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
  _randomise_lora(model)
  model.eval()
  want = _torch_logits(model)
  model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)

  with pytest.warns(UserWarning, match=r"embed.embedding in 5 of its 50 rows"):
    lora = load_peft_lora(tmp_path / "adapter", lm=lm)
  got = np.asarray(apply_adapter_embeddings(lm, tmp_path / "adapter").logits(TOKENS, lora=lora))
  np.testing.assert_allclose(got[..., :V_ADAPTER], want, atol=TOL)
  path = tmp_path / "adapter" / "adapter_model.safetensors"
  tensors = safetensors_torch.load_file(path)
  tensors[EMBEDDING_KEYS["lm_head"]][0] += 1.0  # two copies one tied matrix cannot hold
  safetensors_torch.save_file(tensors, path)
  with pytest.raises(ValueError, match="ties its embedding and unembedding"):
    apply_adapter_embeddings(lm, tmp_path / "adapter")


def test_modules_to_save_lm_head_adapter_loads(release, tmp_path):
  base_folder, lm, _, _, _ = release
  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
  model = peft.get_peft_model(base, config)
  _randomise_lora(model, seed=3)
  torch.manual_seed(4)
  with torch.no_grad():  # a trained head
    for name, p in model.named_parameters():
      if "modules_to_save" in name:
        p.add_(0.2 * torch.randn_like(p))
  model.eval()
  want = _torch_logits(model)
  model.save_pretrained(tmp_path)

  with pytest.warns(UserWarning, match=r"lm_head.*in 64 of its 64 rows"):
    lora = load_peft_lora(tmp_path, lm=lm)
  assert lora.config.vocab_size == V  # a full copy: nothing is masked
  got = np.asarray(apply_adapter_embeddings(lm, tmp_path).logits(TOKENS, lora=lora))
  np.testing.assert_allclose(got, want, atol=TOL)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(
    json.dumps({**config, "modules_to_save": ["lm_head", "score"]})
  )
  with pytest.raises(UnsupportedAdapterError, match=r"modules_to_save.*\['score'\]"):
    load_peft_lora(tmp_path)


def test_legacy_bin_release_adapter_loads(release, tmp_path):
  _, lm, folder, want, _ = release
  shutil.copy(folder / "adapter_config.json", tmp_path)
  state = safetensors_torch.load_file(folder / "adapter_model.safetensors")
  torch.save(state, tmp_path / "adapter_model.bin")  # what older PEFT wrote
  lora = load_peft_lora(tmp_path)
  assert lora.config == load_peft_lora(folder).config
  got = np.asarray(lm.logits(TOKENS, lora=lora))
  np.testing.assert_allclose(got[..., :V_ADAPTER], want, atol=TOL)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    load_peft_lora(tmp_path, lm=lm)  # bf16 rows read through torch's bits
  assert _no_copy_warnings(record)


def test_an_adapter_for_another_model_is_refused(release):
  _, _, folder, _, _ = release
  lora = load_peft_lora(folder)  # nothing to check it against yet
  other = LanguageModel(random_params(tiny_config()))  # head_dim 8: q is [32, 32]
  with pytest.raises(
    ValueError, match=r"does not fit.*b_q is \(2, 4, 64\), the model needs \(2, 4, 32\)"
  ):
    other.logits(TOKENS, lora=lora)
  with pytest.raises(ValueError, match="does not fit"):
    other.generate([PROMPT], 2, lora=lora)
  with pytest.raises(ValueError, match=r"adapter tensor .*q_proj\.lora_B.*expected \(32, 4\)"):
    load_peft_lora(folder, other.config)
  smaller = LanguageModel(random_params(tiny_config(vocab_size=40, head_dim=16)))
  with pytest.raises(ValueError, match="embedding copies"):
    load_peft_lora(folder, lm=smaller)


# --- memory: the copies are read in row chunks, in their own dtype ------------------------


def _big_adapter(folder, lm, v: int):
  """An adapter file (1 layer, q only) with bf16 copies of `lm`'s first v rows."""
  folder.mkdir()
  d = lm.config.hidden_size
  cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
  (folder / "adapter_config.json").write_text(json.dumps(cfg))
  rng = np.random.default_rng(0)
  prefix = "base_model.model.model.layers.0.self_attn.q_proj"
  n_h = lm.config.num_heads * lm.config.head_dim
  embed = np.asarray(lm.params.state["embed"]["embedding"][...])[:v]
  head = np.asarray(lm.params.state["lm_head"][...])[:v]
  tensors = {
    f"{prefix}.lora_A.weight": rng.normal(size=(2, d)).astype(np.float32),
    f"{prefix}.lora_B.weight": rng.normal(size=(n_h, 2)).astype(np.float32),
    EMBEDDING_KEYS["embed_tokens"]: embed.astype(ml_dtypes.bfloat16),
    EMBEDDING_KEYS["lm_head"]: np.ascontiguousarray(head).astype(ml_dtypes.bfloat16),
  }
  save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
  return folder


def test_embedding_copies_are_never_read_whole_or_as_float32(tmp_path, monkeypatch):
  v = 32768
  config = tiny_config(vocab_size=v + 100, num_layers=1, max_position_embeddings=32)
  lm = LanguageModel(random_params(config))
  folder = _big_adapter(tmp_path / "big", lm, v)
  copy_bytes = v * config.hidden_size * 2  # one bf16 copy: 2 MiB
  monkeypatch.setattr(peft_embeddings, "CHUNK_BYTES", copy_bytes // 16)
  reads, rows = [], []
  monkeypatch.setattr(
    adapter_files.SafetensorsFile, "read", _spy(adapter_files.SafetensorsFile.read, reads)
  )
  monkeypatch.setattr(
    adapter_files.SafetensorsFile, "rows", _spy(adapter_files.SafetensorsFile.rows, rows)
  )
  load_peft_lora(folder, lm=lm)  # warm: compiles the chunk programs
  apply_adapter_embeddings(lm, folder)
  assert not set(reads) & set(EMBEDDING_KEYS.values())
  sizes = [stop - start for _, start, stop in rows]
  assert len(rows) >= 3 * 16 and max(sizes) <= v // 16

  tracemalloc.start()
  try:
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      lora = load_peft_lora(folder, lm=lm)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    _read_all_f32(folder / "adapter_model.safetensors")  # the old reader, for scale
    _, old_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert _no_copy_warnings(record) and lora.config.vocab_size == v
  assert peak < copy_bytes / 2, (peak, copy_bytes)  # less than half of one bf16 copy
  assert old_peak > 4 * copy_bytes  # both copies as float32


def _read_all_f32(path):
  """What the loader did before: every tensor of the file at once, as float32."""
  with safe_open(str(path), framework="numpy") as reader:
    return {name: reader.get_tensor(name).astype(np.float32) for name in reader.keys()}


def _spy(method, calls):
  def spy(self, name, *args):
    calls.append(name if not args else (name, *args))
    return method(self, name, *args)

  return spy


# --- averaging ---------------------------------------------------------------------------


def _random_lora(config, seed):
  rng = np.random.default_rng(seed)
  lora = LoRAWeights.init(config, LoRAConfig(rank=3, alpha=6.0), seed=seed)
  flat = [
    (path, var.replace(rng.normal(0, 0.3, var.shape).astype(np.float32)))
    for path, var in nnx.to_flat_state(lora.state)
  ]
  return lora.replace(state=nnx.from_flat_state(flat))


def test_average_adapters_is_tensor_wise_not_the_delta_average():
  config = tiny_config()
  x, y = _random_lora(config, 0), _random_lora(config, 1)
  for weights in ((0.5, 0.5), (0.25, 0.75)):
    avg = average_adapters([x, y], weights)
    assert avg.config == x.config
    for t in x.config.targets:
      for got, a, b in zip(avg.arrays(t), x.arrays(t), y.arrays(t), strict=True):
        np.testing.assert_allclose(got, weights[0] * a + weights[1] * b, atol=1e-6)
  avg = average_adapters([x, y])
  (ax, bx), (ay, by), (a, b) = x.arrays("q"), y.arrays("q"), avg.arrays("q")
  delta_average = 0.5 * (ax @ bx) + 0.5 * (ay @ by)  # [L, D_in, D_out]
  assert np.abs(a @ b - delta_average).max() > 0.05
  three = average_adapters([x, y, x], (0.2, 0.3, 0.5))
  np.testing.assert_allclose(
    three.arrays("v")[1], 0.7 * x.arrays("v")[1] + 0.3 * y.arrays("v")[1], atol=1e-6
  )


def test_average_adapters_refuses_what_does_not_average():
  config = tiny_config()
  x, y = _random_lora(config, 0), _random_lora(config, 1)
  with pytest.raises(ValueError, match="2 adapters but 3 weights"):
    average_adapters([x, y], (0.2, 0.3, 0.5))
  with pytest.raises(ValueError, match="sum to 1"):
    average_adapters([x, y], (0.5, 0.6))
  with pytest.raises(ValueError, match="at least two"):
    average_adapters([x], (1.0,))
  other_rank = LoRAWeights.init(config, LoRAConfig(rank=2, alpha=6.0))
  with pytest.raises(ValueError, match="adapter 1 has config"):
    average_adapters([x, other_rank])
  deeper = _random_lora(config.replace(num_layers=3), 2)
  with pytest.raises(
    ValueError, match=r"adapter 1's a_q is \(3, 32, 3\), adapter 0's \(2, 32, 3\)"
  ):
    average_adapters([x, deeper])


# --- training with a resized-vocabulary adapter -----------------------------------------


def test_training_loss_is_finite_and_masked_with_a_resized_vocabulary(release):
  _, lm, folder, _, _ = release
  lora = load_peft_lora(folder)
  rng = np.random.default_rng(0)
  ids = lambda *shape: jnp.asarray(rng.integers(0, V_ADAPTER, shape), jnp.int32)  # noqa: E731
  tokens = ids(1, 10)
  batch = batching.Batch(
    branch_tokens=ids(1, 2, 8),
    branch_mask=jnp.ones((1, 2, 8), bool),
    branch_start=jnp.zeros((1, 2), jnp.int32),
    num_workers=jnp.asarray([2], jnp.int32),
    tokens=tokens,
    mask=jnp.ones((1, 10), bool),
    score_pos=jnp.asarray([[5, 6, 7, 8]], jnp.int32),
    labels=tokens[:, 6:10],
    weights=jnp.ones((1, 4), jnp.float32),
    skipped=jnp.zeros((1,), jnp.int32),
    teacher_tokens=tokens,
    teacher_mask=jnp.ones((1, 10), bool),
    teacher_pos=jnp.asarray([[5, 6, 7, 8]], jnp.int32),
  )
  config = step_lib.StepConfig(branch_rows=16, kl_weight=0.5)
  mapper = Mapper.create("affine", lm.config.num_layers)
  grad = jax.jit(jax.value_and_grad(step_lib.loss_fn, has_aux=True), static_argnums=4)
  key = jax.random.key(0)
  (loss, metrics), grads = grad({"mapper": mapper, "lora": lora}, lm.params, batch, key, config)
  assert np.isfinite(loss) and np.isfinite(metrics["kl"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  (_, unmasked), _ = grad(
    {"mapper": mapper, "lora": _unmasked(lora)}, lm.params, batch, key, config
  )
  assert metrics["ce"] < unmasked["ce"]  # ids >= V' no longer take probability mass
  # The one place that masks: the unembedding given the adapter.
  x = jnp.ones((1, 1, lm.config.hidden_size))
  assert np.all(np.asarray(unembed(lm.params, x, lora))[..., V_ADAPTER:] == -np.inf)
  assert np.isfinite(np.asarray(unembed(lm.params, x))).all()
  masked = unembed(lm.params, x, lora)
  assert float(losses.kl_to_teacher(masked, masked, jnp.ones((1, 1)))) == 0.0  # not NaN
