"""The `affine` mapper against PyTorch, and the reference release's `cache_mapper.pt`.

* A file in the reference's layout (`net.0.weight` [hidden, F], F = 3 / 2 / 2 / 1,
  `cache_mapper_config.json` beside it) loads with one argument, in every mode and
  hidden width, and maps caches of any depth exactly as a PyTorch implementation
  of the formulas does.
* The mode comes from the config, `features=` or the width, which must agree; a
  width-2 file nobody names is refused.
* `save_reference_mapper` writes what such a PyTorch module loads, and reads back.
* Damaged or foreign files fail with errors that name the file and the key.

torch is only the reference here, so the file is skipped without it (a plain
`pip install .`); the shared helpers come from test_mapper.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mapper import _config, random_branches

import psynth_jax
from psynth_jax.convert.reference import (
  CONFIG_NAME,
  load_reference_mapper,
  save_reference_mapper,
)
from psynth_jax.mapper import Mapper
from psynth_jax.merge import mapped_branch_kv

torch = pytest.importorskip("torch")

REFERENCE_MODES = ("both", "length", "num_agents", "none")


class TorchMapper(torch.nn.Module):
  """The reference's mapper from its formulas: kept features -> Linear -> SiLU -> Linear(4)."""

  def __init__(self, hidden_dim=32, mode="both"):
    super().__init__()
    self.mode = mode
    self.uses_length = mode in ("both", "length")
    self.uses_k = mode in ("both", "num_agents")
    width = 1 + self.uses_length + self.uses_k
    self.net = torch.nn.Sequential(
      torch.nn.Linear(width, hidden_dim), torch.nn.SiLU(), torch.nn.Linear(hidden_dim, 4)
    )

  def coefficients(self, lengths, num_agents, num_layers):
    """[K] lengths, K -> [K, L, 4] (alpha_k, beta_k, alpha_v, beta_v)."""
    per_layer = []
    for layer in range(num_layers):
      rows = []
      for n in lengths:
        f = []
        if self.uses_length:
          f.append(np.log1p(max(n, 1)))
        if self.uses_k:
          f.append(np.log1p(max(num_agents, 1)))
        f.append(layer / (num_layers - 1) if num_layers > 1 else 0.0)
        rows.append(f)
      per_layer.append(rows)
    x = torch.tensor(per_layer, dtype=torch.float32).transpose(0, 1)  # [K, L, F]
    r = self.net(x)
    t = 0.1 * torch.tanh(r)
    return torch.stack([1 + t[..., 0], t[..., 1], 1 + t[..., 2], t[..., 3]], -1)

  def map(self, k, v, lengths, num_agents):
    """K' = alpha_k K + beta_k, V' = alpha_v V + beta_v for L x [K, G, S, H] caches."""
    c = self.coefficients(lengths, num_agents, len(k))
    out_k, out_v = [], []
    for layer, (kl, vl) in enumerate(zip(k, v, strict=True)):
      kl, vl = torch.tensor(np.asarray(kl)), torch.tensor(np.asarray(vl))
      a = c[:, layer, None, None, None, :]  # [K, 1, 1, 1, 4]
      out_k.append((a[..., 0] * kl + a[..., 1]).numpy())
      out_v.append((a[..., 2] * vl + a[..., 3]).numpy())
    return out_k, out_v


def random_torch_mapper(mode, hidden, seed=0) -> TorchMapper:
  torch.manual_seed(seed)
  ref = TorchMapper(hidden, mode)
  with torch.no_grad():
    for p in ref.parameters():
      p.normal_(0, 0.7)  # the last layer too, so that the map is far from the identity
  return ref


def save_release(folder, ref: TorchMapper, config=True):
  """Writes `ref` as the release does: cache_mapper.pt and, optionally, its config."""
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "cache_mapper.pt"
  torch.save(ref.state_dict(), path)
  if config:
    hidden = ref.net[0].out_features
    (folder / CONFIG_NAME).write_text(
      json.dumps({"hidden_dim": hidden, "metadata_features": ref.mode})
    )
  return path


def _check_matches(mapper, ref, layer_counts=(1, 2, 5)):
  lengths = [3, 0, 12, 7]  # an empty branch and a full one
  for layers in layer_counts:
    branches = random_branches(lengths, seed=layers, num_layers=layers)
    coeffs = mapper.coefficients(
      branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(len(lengths))
    )
    with torch.no_grad():
      want = ref.coefficients(lengths, len(lengths), layers).numpy()
      want_k, want_v = ref.map(branches.cache.k, branches.cache.v, lengths, len(lengths))
    np.testing.assert_allclose(np.asarray(coeffs)[:, :, 0], want, rtol=1e-6, atol=1e-6)
    k, v = mapped_branch_kv(branches, _config(layers), mapper)
    for layer in range(layers):
      for i, n in enumerate(lengths):
        np.testing.assert_allclose(
          k[layer][i, :, :n], want_k[layer][i, :, :n], rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
          v[layer][i, :, :n], want_v[layer][i, :, :n], rtol=1e-6, atol=1e-6
        )
    # Sanity: the random mapper is far from the identity, so the comparison means something.
    assert np.abs(np.asarray(k[0]) - np.asarray(branches.cache.k[0])).max() > 1e-2


@pytest.mark.parametrize("hidden", [32, 16])
@pytest.mark.parametrize("mode", REFERENCE_MODES)
def test_a_release_file_loads_with_one_argument_and_maps_as_pytorch(tmp_path, mode, hidden):
  ref = random_torch_mapper(mode, hidden)
  path = save_release(tmp_path / "release", ref)
  mapper = psynth_jax.load_reference_mapper(path)
  want_mode = "num_workers" if mode == "num_agents" else mode
  assert (mapper.kind, mapper.features, mapper.hidden_dim) == ("affine", want_mode, hidden)
  assert mapper.num_layers is None  # L comes from the cache it maps
  assert mapper.num_params() == sum(p.numel() for p in ref.parameters())
  _check_matches(mapper, ref)
  # The folder of the release names the same file.
  folder_mapper = load_reference_mapper(tmp_path / "release")
  assert folder_mapper.features == want_mode


@pytest.mark.parametrize("mode", ["both", "none"])
def test_without_a_config_the_width_gives_the_mode(tmp_path, mode):
  ref = random_torch_mapper(mode, 16, seed=1)
  mapper = load_reference_mapper(save_release(tmp_path, ref, config=False))
  assert (mapper.features, mapper.hidden_dim) == (mode, 16)
  _check_matches(mapper, ref, layer_counts=(3,))


def test_a_width_2_file_without_a_config_needs_features(tmp_path):
  path = save_release(tmp_path, random_torch_mapper("length", 32), config=False)
  with pytest.raises(ValueError, match=r"\[32, 2\].*'length' or 'num_agents'.*features="):
    load_reference_mapper(path)
  for mode in ("length", "num_agents"):
    ref = TorchMapper(32, mode)
    ref.load_state_dict(torch.load(path, weights_only=True))
    mapper = load_reference_mapper(path, features=mode, num_layers=2)
    assert mapper.num_layers == 2
    _check_matches(mapper, ref, layer_counts=(2,))


def test_config_features_and_width_must_agree(tmp_path):
  path = save_release(tmp_path, random_torch_mapper("length", 32))  # config: length
  config = tmp_path / CONFIG_NAME
  with pytest.raises(ValueError, match=r"metadata_features='length', features='num_agents'"):
    load_reference_mapper(path, features="num_agents")
  assert load_reference_mapper(path, features="length").features == "length"
  config.write_text(json.dumps({"hidden_dim": 32, "metadata_features": "both"}))
  names_all_three = (
    r"json says metadata_features='both', features=None, and 'net.0.weight' \[32, 2\]"
  )
  with pytest.raises(ValueError, match=names_all_three):
    load_reference_mapper(path)
  config.write_text(json.dumps({"hidden_dim": 16, "metadata_features": "length"}))
  with pytest.raises(ValueError, match=r"hidden width 32.*hidden_dim 16"):
    load_reference_mapper(path)
  config.unlink()
  with pytest.raises(ValueError, match=r"does not exist, features='none'.*\[32, 2\]"):
    load_reference_mapper(path, features="none")
  both = save_release(tmp_path / "both", random_torch_mapper("both", 32), config=False)
  with pytest.raises(ValueError, match=r"features='length'.*\[32, 3\].*old layout"):
    load_reference_mapper(both, features="length")


@pytest.mark.parametrize("hidden", [32, 16])
@pytest.mark.parametrize("mode", ["both", "length", "num_workers", "none"])
def test_save_reference_mapper_writes_what_the_reference_reads(tmp_path, mode, hidden):
  ref = random_torch_mapper("num_agents" if mode == "num_workers" else mode, hidden, seed=2)
  mapper = load_reference_mapper(save_release(tmp_path / "in", ref), num_layers=4)
  out = tmp_path / "out"
  out.mkdir()
  path = save_reference_mapper(mapper, out)
  assert path.endswith("cache_mapper.pt")
  config = json.loads((out / CONFIG_NAME).read_text())
  assert config == {"hidden_dim": hidden, "metadata_features": ref.mode}  # the reference's names
  # A module built from the config loads the file strictly and gives the same numbers.
  rebuilt = TorchMapper(config["hidden_dim"], config["metadata_features"])
  saved = torch.load(path, weights_only=True)
  rebuilt.load_state_dict(saved, strict=True)
  for name, tensor in ref.state_dict().items():
    assert saved[name].dtype == torch.float32
    torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
  again = load_reference_mapper(path)
  assert (again.features, again.hidden_dim, again.num_layers) == (mapper.features, hidden, None)
  _check_matches(again, rebuilt, layer_counts=(4,))
  # A fresh mapper saves too (any file name; the config goes beside it).
  fresh = Mapper.create("affine", features=mode, hidden_dim=hidden, seed=3)
  save_reference_mapper(fresh, tmp_path / "fresh.pt")
  loaded = load_reference_mapper(tmp_path / "fresh.pt")
  jax.tree.map(np.testing.assert_array_equal, loaded.state, fresh.state)


def test_reference_file_errors(tmp_path):
  state = random_torch_mapper("both", 32).state_dict()
  missing = tmp_path / "missing.pt"
  torch.save({k: v for k, v in state.items() if k != "net.2.bias"}, missing)
  with pytest.raises(KeyError, match=r"missing.pt.*net.2.bias"):
    load_reference_mapper(missing)
  extra = tmp_path / "extra.pt"
  torch.save({**state, "net.4.weight": torch.zeros(4, 4)}, extra)
  with pytest.raises(KeyError, match="net.4.weight"):
    load_reference_mapper(extra)
  wide = tmp_path / "wide.pt"
  torch.save({**state, "net.0.weight": torch.zeros(32, 5)}, wide)
  with pytest.raises(ValueError, match=r"wide.pt.*\[32, 5\].*1, 2 or 3"):
    load_reference_mapper(wide)
  wrong = tmp_path / "wrong.pt"
  torch.save({**state, "net.2.weight": torch.zeros(4, 16)}, wrong)
  with pytest.raises(ValueError, match=r"wrong.pt.*'net.2.weight' has shape \(4, 16\), expected"):
    load_reference_mapper(wrong)
  tensor = tmp_path / "tensor.pt"
  torch.save(torch.zeros(3), tensor)
  with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
    load_reference_mapper(tensor)
  not_tensor = tmp_path / "not_tensor.pt"
  torch.save({**state, "net.0.bias": [0.0] * 32}, not_tensor)
  with pytest.raises(ValueError, match="'net.0.bias' is a list, not a tensor"):
    load_reference_mapper(not_tensor)
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(extra.read_bytes()[:200])
  with pytest.raises(ValueError, match="truncated.pt: cannot read it as a torch state dict"):
    load_reference_mapper(truncated)
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(np.random.default_rng(0).bytes(512))
  with pytest.raises(ValueError, match="garbage.pt: cannot read it as a torch state dict"):
    load_reference_mapper(garbage)
  with pytest.raises(FileNotFoundError, match="absent.pt"):
    load_reference_mapper(tmp_path / "absent.pt")
  bad_config = tmp_path / "bad"
  path = save_release(bad_config, random_torch_mapper("both", 32))
  (bad_config / CONFIG_NAME).write_text("{not json")
  with pytest.raises(ValueError, match=f"{CONFIG_NAME}: not a readable JSON file"):
    load_reference_mapper(path)
  (bad_config / CONFIG_NAME).write_text(json.dumps({"metadata_features": "tokens"}))
  with pytest.raises(ValueError, match=f"{CONFIG_NAME}: 'metadata_features'.*'tokens'"):
    load_reference_mapper(path)
  with pytest.raises(ValueError, match="affine"):
    save_reference_mapper(Mapper.create("head_affine", 2), tmp_path / "h.pt")
