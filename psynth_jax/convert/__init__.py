"""Weight conversion: HF safetensors and GGUF checkpoints -> psynth_jax `Params`.

A leaf package: torch and transformers are imported lazily, only by the GGUF path.
"""

from psynth_jax.convert.hf import hf_state_to_flat, load_hf_folder
from psynth_jax.convert.weights import KNOWN_MODELS, fetch_qwen_coder

__all__ = [
  "KNOWN_MODELS",
  "fetch_qwen_coder",
  "hf_state_to_flat",
  "load_hf_folder",
]
