"""psynth_jax: Parallel-Synthesis in JAX/Flax.

A synthesizer LLM reads the KV caches of K parallel worker branches directly
instead of re-reading their concatenated text. Data flow (README.md, "How it
fits together"):

  load_pretrained -> run_workers (K branches, one jit) -> Branches
  -> synthesize (re-encode + mapper + merge + prefill + decode, jitted)
  vs synthesize_text (the text-concatenation baseline).
"""

from psynth_jax.decode import GREEDY, Sampling
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel, load_pretrained
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import Params, forward, init_params
from psynth_jax.synthesis import SynthesisResult, synthesis_logits, synthesize, synthesize_text
from psynth_jax.workers import Branches, encode_branches, run_workers

__all__ = [
  "GREEDY",
  "Branches",
  "KVCache",
  "LanguageModel",
  "LoRAConfig",
  "LoRAWeights",
  "Mapper",
  "ModelConfig",
  "Params",
  "Sampling",
  "SynthesisResult",
  "encode_branches",
  "forward",
  "init_params",
  "load_pretrained",
  "run_workers",
  "synthesis_logits",
  "synthesize",
  "synthesize_text",
]
