"""Helpers for tests and benchmarks (like gemma's `gm.testing`): tiny random models.

* `tiny_config`: the tests' small Llama (2 layers, GQA 4/2, head 8, vocab 64),
  with any field replaced; `GEMMA3_TINY` / `tiny_gemma3_config`: a small Gemma 3
  (4 layers, local and global, window 5, two RoPE bases) as an HF config dict and ours;
  `MIXTRAL_TINY` / `QWEN3_MOE_TINY`: small mixtures of experts (transformers kwargs);
* `random_params`: our weights for any `ModelConfig`, drawn with numpy (cheap
  to build; compiling jax's initialisers costs more than a tiny test), with
  norm scales and biases away from their 1 / 0 init so that they matter.
* `hf_model`: a tiny random transformers model of any config class, likewise
  perturbed; `tiny_llama_hf` is the benchmarks' 4-layer Llama.

torch and transformers are imported inside the functions that need them, so
this module imports on a JAX-only install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import Params, abstract_params, params_from_flat


def require_package(module: str) -> None:
  """Skips a test whose data package is missing, except under CI (`CI=true`), which
  installs every package: there a missing one is a failure, never a silent skip."""
  import importlib.util
  import os

  import pytest

  if importlib.util.find_spec(module) is None:
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI installs the data package {module}, but it is missing")
    pytest.skip(f"the data package {module} is not installed")


TINY = ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8, max_position_embeddings=96)


def tiny_config(**overrides) -> ModelConfig:
  """`TINY` with `overrides` (e.g. `model_type="qwen2", qkv_bias=True`)."""
  return TINY.replace(**overrides)


# The tests' Gemma 3 in the v5 schema (as Gemma3TextConfig(...).to_dict() writes it):
# local and global layers, a window shorter than the test sequences, two RoPE bases with
# the global one linearly scaled, and an attention scalar that is not head_dim.
GEMMA3_TINY = {
  "model_type": "gemma3_text",
  "vocab_size": 96,
  "hidden_size": 64,
  "intermediate_size": 112,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
  "max_position_embeddings": 256,
  "sliding_window": 5,
  "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
  "query_pre_attn_scalar": 24,
  "rope_parameters": {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
  },
  "final_logit_softcapping": None,
  "attn_logit_softcapping": None,
  "initializer_range": 0.05,
  "eos_token_id": None,  # transformers' generate runs its full length
}


def tiny_gemma3_config(**overrides) -> ModelConfig:
  """`GEMMA3_TINY` as our config, with `overrides` (ModelConfig fields)."""
  return ModelConfig.from_hf(GEMMA3_TINY).replace(**overrides)


# Mixture of experts, as transformers config kwargs. A wider init than transformers'
# 0.02 gives the router clear margins between the k-th and (k+1)-th expert, so that
# float32 rounding (~1e-6) between two implementations never flips a routing choice.
MIXTRAL_TINY = {
  "vocab_size": 96,
  "hidden_size": 32,
  "intermediate_size": 40,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "num_local_experts": 8,
  "num_experts_per_tok": 2,
  "max_position_embeddings": 256,
  "initializer_range": 0.1,
  "eos_token_id": None,
}
# 4 layers: 0 dense (mlp_only_layers), 2 dense (decoder_sparse_step 2: layers 1, 3, ...
# only), 1 and 3 sparse; 12 experts of width 24, top-3 without renormalisation, dense
# MLP width 56.
QWEN3_MOE_TINY = {
  "vocab_size": 96,
  "hidden_size": 32,
  "intermediate_size": 56,
  "moe_intermediate_size": 24,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "num_experts": 12,
  "num_experts_per_tok": 3,
  "norm_topk_prob": False,
  "decoder_sparse_step": 2,
  "mlp_only_layers": [0],
  "max_position_embeddings": 256,
  "initializer_range": 0.1,
  "eos_token_id": None,
}


def tiny_moe_config(family: str = "qwen3_moe", **hf_changes) -> ModelConfig:
  """Our config of `MIXTRAL_TINY` or `QWEN3_MOE_TINY` with transformers kwargs changed."""
  base = MIXTRAL_TINY if family == "mixtral" else QWEN3_MOE_TINY
  return ModelConfig.from_hf({"model_type": family, **base, **hf_changes})


BPE_CORPUS = [
  "def add(a, b):\n    return a + b\n",
  "The quick brown fox jumps over the lazy dog. Don't panic!",
  "Résumé: naïve café — 東京 and emoji 🙂 too.",
  "You are a helpful assistant. Answer the question step by step.",
]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen-like: block tags without '-' so trim_blocks/lstrip_blocks matter, tools via
# tojson (which must not HTML-escape), raise_exception, bos_token as a variable.
BPE_CHAT_TEMPLATE = """{{ bos_token }}
{% if tools %}
<|im_start|>system
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}<|im_end|>
{% elif messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


# Projections stored [out, in] (torch's layout): fan-in is the last axis; attn.o is
# [D, N, H] and its fan-in N * H. The router and the experts are [in, out].
_FAN_IN_LAST = ("q", "k", "v", "gate", "up", "down", "lm_head")


def random_params(config: ModelConfig, seed: int = 0) -> Params:
  """Random weights: fan-in scaled projections, norm scales ~1 +- 0.3 (Gemma's (1 + w)
  norms: w ~0 +- 0.3), biases ~0 +- 0.3."""
  rng = np.random.default_rng(seed)
  arrays = {}
  norm_center = 0.0 if config.norm_plus_one else 1.0
  for path, var in nnx.to_flat_state(abstract_params(config).state):
    name = ".".join(str(p) for p in path)
    shape = var.shape
    if name.endswith("scale"):
      a = norm_center + 0.3 * rng.standard_normal(shape)
    elif name.endswith("bias"):
      a = 0.3 * rng.standard_normal(shape)
    elif name == "embed.embedding":
      a = rng.standard_normal(shape)
    else:
      if ".experts." in name:  # stacked [E, in, out]
        fan_in = shape[1]
      elif name.endswith(_FAN_IN_LAST):
        fan_in = shape[-1]
      elif name.endswith("router"):  # [D, E]
        fan_in = shape[0]
      else:  # attn.o
        fan_in = np.prod(shape[1:])
      a = rng.standard_normal(shape) / np.sqrt(fan_in)
    arrays[name] = a.astype(np.float32)
  return params_from_flat(config, arrays)


def hf_model(config_cls, seed: int = 0, perturb: bool = True, **config_kwargs):
  """A random transformers causal LM of `config_cls(**config_kwargs)`, in eval mode.

  With `perturb`, norm weights are drawn around 1 and biases around 0 (their
  init is exactly 1 / 0, which would hide a missing norm or bias in a parity test).
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**config_kwargs))
  if perturb:
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "norm" in name:
          p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
          p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def tiny_llama_hf(max_position_embeddings: int = 1024, seed: int = 0):
  """The benchmarks' tiny Llama: 4 layers, D = 128, 4 heads / 2 kv heads, vocabulary 512."""
  from transformers import LlamaConfig

  return hf_model(
    LlamaConfig,
    seed,
    perturb=False,
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=max_position_embeddings,
  )


def bpe_tokenizer_folder(folder) -> Path:
  """A byte-level BPE tokenizer (at most 400 ids) with Qwen-style special tokens and a chat
  template in tokenizer_config.json, written to `folder` (a chat model's tokenizer)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=BPE_SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  backend.train_from_iterator(BPE_CORPUS, trainer)
  backend.save(str(folder / "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "clean_up_tokenization_spaces": False,
    "chat_template": BPE_CHAT_TEMPLATE,
  }
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  gen = {"eos_token_id": [backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")]}
  (folder / "generation_config.json").write_text(json.dumps(gen))
  return folder


def tiny_chat_model(folder, max_position_embeddings: int = 2048) -> Path:
  """A converted tiny random chat model (the BPE tokenizer above) in `folder`."""
  from psynth_jax.model.checkpoint import save_converted
  from psynth_jax.tokenizer import Tokenizer

  folder = Path(folder)
  tok_dir = bpe_tokenizer_folder(folder / "tok")
  config = tiny_config(
    vocab_size=Tokenizer.from_folder(tok_dir).vocab_size,
    max_position_embeddings=max_position_embeddings,
  )
  save_converted(random_params(config), folder / "model", tokenizer_src=tok_dir)
  return folder / "model"


def train_two_steps(folder, train_jsonl, **batch) -> list[dict]:
  """Two trainer steps of a tiny random chat model on a trace file: the step history.

  Proves a data route's traces are trainer rows; `batch` overrides the config's budgets.
  """
  from psynth_jax.configs.base import default_config
  from psynth_jax.train import trainer

  folder = Path(folder)
  c = default_config()
  c.model.path = str(tiny_chat_model(folder / "tiny"))
  c.data.update(source="jsonl", train_jsonl=str(train_jsonl))
  c.batch.update(dict(batch_size=2, max_branches=8, synth_tokens=512) | batch)
  c.lora.rank = 2
  c.train.num_steps = 2
  c.mesh.shape = (1, 1, 1)
  c.fast_compile = True
  c.export.enabled = False
  return trainer.train(c, str(folder / "work")).history
