"""psynth_jax: Parallel-Synthesis in JAX/Flax.

A synthesizer LLM reads the KV caches of K parallel worker branches directly
instead of re-reading their concatenated text. Data flow (README.md, "How it
fits together"):

  load_pretrained -> run_workers (K branches, one jit) -> Branches
  -> synthesize (re-encode + mapper + merge + prefill + decode, jitted)
  vs synthesize_text (the text-concatenation baseline).

Axis letters, used in shape comments and einsum strings everywhere, each with
one meaning:

  K branches        B batch            T tokens of one call   S cache rows
  L layers          N query heads      G kv heads             H head dim
  D model dim       F MLP dim          V vocabulary           R LoRA rank
  Y scored target tokens (training)   Q = N / G query heads per kv head
  M = Q * T (the attention matmul's folded query rows)

Other quantities have names: len_i is the number of tokens kept for branch i
(the mapper's length feature; the synthesizer prompt starts at max_i len_i),
`synth_prompt` the synthesizer's own prompt, `rows` the cache rows reserved
for the merged branches. (The TTFT sweep's rows keep their JSON keys "K" and
"L", the latter meaning tokens per branch.)
"""

from psynth_jax.convert.peft import load_peft_lora
from psynth_jax.convert.reference import load_reference_mapper
from psynth_jax.decode import GREEDY, Sampling
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel, load_pretrained
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights, average_adapters
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
  "average_adapters",
  "encode_branches",
  "forward",
  "init_params",
  "load_peft_lora",
  "load_pretrained",
  "load_reference_mapper",
  "run_workers",
  "synthesis_logits",
  "synthesize",
  "synthesize_text",
]
