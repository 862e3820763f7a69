"""A release-shaped folder (judger_lora/ built by peft + cache_mapper.pt + its config) loads
with one argument and gives the synthesizer logits of a PyTorch + PEFT computation of the
paper's formulas: branches encoded from position 0, the affine map per layer, the caches
concatenated, the synthesizer prompt from position max_i len_i over them."""

import json
import math

import numpy as np
import pytest

from psynth_jax.convert.hf import load_hf_folder
from psynth_jax.convert.release import load_adapter, load_release, save_release
from psynth_jax.language_model import LanguageModel
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.testing import hf_model
from psynth_jax.workers import encode_branches

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE_VOCAB, VOCAB = 96, 90  # the release resized 151,936 -> 151,669
LAYERS = 3
BRANCHES = [[5, 17, 33, 2, 8], [40, 41], [7, 7, 7, 60, 12, 3, 88]]
PROMPT = [9, 10, 11, 12]
MODES = {"both": 3, "length": 2, "num_agents": 2, "none": 1}


def _features(mode, length, num_agents, layer):
  f = []
  if mode in ("both", "length"):
    f.append(math.log1p(max(length, 1)))
  if mode in ("both", "num_agents"):
    f.append(math.log1p(max(num_agents, 1)))
  return f + [layer / (LAYERS - 1)]


def _coefficients(net, mode, length, num_agents, layer):
  r = net(torch.tensor([_features(mode, length, num_agents, layer)], dtype=torch.float32))[0]
  t = 0.1 * torch.tanh(r)
  return 1 + t[0], t[1], 1 + t[2], t[3]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(our base LanguageModel, the torch base model, folder maker)."""
  root = tmp_path_factory.mktemp("release")
  base = hf_model(
    transformers.Qwen3Config,
    seed=0,
    vocab_size=BASE_VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
  )
  base.save_pretrained(root / "base")
  lm = LanguageModel(load_hf_folder(root / "base"))
  return lm, root


def _make_folder(root, mode, hidden=32, seed=0):
  """A release folder: a peft LoRA on the resized model, saved with its embedding copies, and a
  random mapper of `mode` (the reference drops unused features: width MODES[mode])."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
  model.resize_token_embeddings(VOCAB)
  config = peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
  )
  model = peft.get_peft_model(model, config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.3 * torch.randn_like(p))
  folder = root / f"release_{mode}_{hidden}_{seed}"
  model.save_pretrained(folder / "judger_lora", save_embedding_layers=True)
  net = torch.nn.Sequential(
    torch.nn.Linear(MODES[mode], hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 4)
  )
  with torch.no_grad():
    for p in net.parameters():
      p.copy_(torch.randn_like(p))
  torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, folder / "cache_mapper.pt")
  (folder / "cache_mapper_config.json").write_text(
    json.dumps({"hidden_dim": hidden, "metadata_features": mode})
  )
  return folder, model.eval(), net.eval()


def _torch_synthesis_logits(model, net, mode) -> np.ndarray:
  """The paper's formulas on the torch side: [T, V'] logits of the synthesizer prompt."""
  from transformers import DynamicCache

  k = len(BRANCHES)
  keys = [[] for _ in range(LAYERS)]
  values = [[] for _ in range(LAYERS)]
  with torch.no_grad(), model.disable_adapter():  # branches come from the frozen base
    for branch in BRANCHES:
      ids = torch.tensor([branch])
      out = model(input_ids=ids, position_ids=torch.arange(len(branch))[None], use_cache=True)
      for layer in range(LAYERS):
        kl, vl = out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values
        a_k, b_k, a_v, b_v = _coefficients(net, mode, len(branch), k, layer)
        keys[layer].append(a_k * kl + b_k)
        values[layer].append(a_v * vl + b_v)
  merged = DynamicCache()
  for layer in range(LAYERS):
    merged.update(torch.cat(keys[layer], dim=2), torch.cat(values[layer], dim=2), layer)
  rows = sum(len(b) for b in BRANCHES)
  start = max(len(b) for b in BRANCHES)
  t = len(PROMPT)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor([PROMPT]),
      position_ids=(start + torch.arange(t))[None],
      attention_mask=torch.ones(1, rows + t, dtype=torch.long),
      past_key_values=merged,
    )
  return out.logits[0].float().numpy()


@pytest.mark.parametrize("mode", list(MODES))
def test_release_folder_gives_the_pytorch_peft_synthesis_logits(release, mode):
  lm, root = release
  folder, model, net = _make_folder(root, mode)
  mapper, lora = load_release(folder)  # one argument
  assert mapper.features == {"num_agents": "num_workers"}.get(mode, mode)
  assert lora.config.vocab_size == VOCAB
  branches = encode_branches(lm, BRANCHES)
  got = np.asarray(synthesis_logits(lm, branches, PROMPT, mapper, lora))
  want = _torch_synthesis_logits(model, net, mode)
  np.testing.assert_allclose(got[:, :VOCAB], want, atol=1e-4, rtol=0)
  assert np.all(got[:, VOCAB:] == -np.inf)  # ids past the adapter's vocabulary: never chosen
  # With the base model given, the same folder loads through the one entry point, checked.
  again_mapper, again_lora = load_adapter(folder, lm)
  np.testing.assert_array_equal(
    np.asarray(synthesis_logits(lm, branches, PROMPT, again_mapper, again_lora)), got
  )


@pytest.mark.filterwarnings("ignore:.*vocab")
def test_a_run_folder_with_latest_and_a_round_trip(release, tmp_path):
  lm, root = release
  folder, _, _ = _make_folder(root, "both", hidden=16, seed=1)
  mapper, lora = load_release(folder)
  out = save_release(tmp_path / "run" / "latest", mapper, lora)
  assert (out / "cache_mapper_config.json").is_file()
  again_mapper, again_lora = load_adapter(tmp_path / "run", lm)  # finds latest/
  branches = encode_branches(lm, BRANCHES)
  want = synthesis_logits(lm, branches, PROMPT, mapper, lora)
  got = synthesis_logits(lm, branches, PROMPT, again_mapper, again_lora)
  # Our PEFT export holds no embedding copies, so V' is not in it (export_peft_lora warns):
  # the first V' logits are the same, the mask is the original's only.
  np.testing.assert_allclose(np.asarray(got)[:, :VOCAB], np.asarray(want)[:, :VOCAB], atol=1e-6)
  assert again_lora.config.vocab_size is None
  result = synthesize(lm, branches, PROMPT, mapper, lora, max_new_tokens=6)
  assert all(t < VOCAB for t in result.tokens)


def test_not_a_release_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a release folder"):
    load_release(tmp_path)
  with pytest.raises(FileNotFoundError, match="not an adapter"):
    load_adapter(tmp_path)
