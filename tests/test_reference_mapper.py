"""The `affine` mapper against PyTorch, and the reference release's state dict.

* The `affine` mapper equals a PyTorch implementation of the paper's formula
  (`psynth_jax/mapper.py`) on the same random parameters, in every feature mode.
* The reference release's torch state dict round-trips.

torch is only the reference here, so the file is skipped without it (a plain
`pip install .`); the shared helpers come from test_mapper.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from test_mapper import NUM_LAYERS, _config, mapper_with, random_branches, random_reference_state

from psynth_jax.convert.reference import load_reference_mapper, save_reference_mapper
from psynth_jax.mapper import FEATURE_MODES, Mapper
from psynth_jax.merge import mapped_branch_kv

torch = pytest.importorskip("torch")


class ReferenceMapper(torch.nn.Module):
  """The paper's mapper in PyTorch: features -> Linear(3, 32) -> SiLU -> Linear(32, 4)."""

  def __init__(self):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

  def coefficients(self, lengths, num_workers, num_layers, mode):
    """[K] lengths, K -> (alpha_k, beta_k, alpha_v, beta_v), each [K, L]."""
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    f_len = torch.log1p(torch.clamp(lengths, min=1.0))
    f_num = torch.log1p(torch.tensor(float(max(num_workers, 1)))).expand_as(f_len)
    if mode in ("num_workers", "none"):  # dropped features are zero
      f_len = torch.zeros_like(f_len)
    if mode in ("length", "none"):
      f_num = torch.zeros_like(f_num)
    rows = []
    for layer in range(num_layers):
      f_layer = torch.full_like(f_len, layer / (num_layers - 1) if num_layers > 1 else 0.0)
      rows.append(torch.stack([f_len, f_num, f_layer], -1))
    r = self.net(torch.stack(rows, 1))  # [K, L, 4]
    return (
      1 + 0.1 * torch.tanh(r[..., 0]),
      0.1 * torch.tanh(r[..., 1]),
      1 + 0.1 * torch.tanh(r[..., 2]),
      0.1 * torch.tanh(r[..., 3]),
    )

  def map(self, k, v, lengths, num_workers, mode):
    """K' = alpha_k K + beta_k, V' = alpha_v V + beta_v, per (branch, layer) scalars."""
    ak, bk, av, bv = self.coefficients(lengths, num_workers, len(k), mode)
    out_k, out_v = [], []
    for layer, (kl, vl) in enumerate(zip(k, v, strict=True)):
      kl, vl = torch.tensor(np.asarray(kl)), torch.tensor(np.asarray(vl))
      c = [x[:, layer, None, None, None] for x in (ak, bk, av, bv)]
      out_k.append((c[0] * kl + c[1]).numpy())
      out_v.append((c[2] * vl + c[3]).numpy())
    return out_k, out_v


def torch_reference(state: dict) -> ReferenceMapper:
  ref = ReferenceMapper()
  ref.load_state_dict({name: torch.as_tensor(w) for name, w in state.items()})
  return ref


@pytest.mark.parametrize("mode", FEATURE_MODES)
def test_affine_mapper_matches_pytorch_formula(mode):
  state = random_reference_state()
  lengths = [3, 0, 12, 7]  # an empty branch and a full one
  branches = random_branches(lengths)
  mapper = mapper_with("affine", state, features=mode)
  assert mapper.num_params() == 260  # the paper's count
  k, v = mapped_branch_kv(branches, _config(), mapper)
  with torch.no_grad():
    want_k, want_v = torch_reference(state).map(
      branches.cache.k, branches.cache.v, lengths, len(lengths), mode
    )
  for layer in range(NUM_LAYERS):
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(k[layer][i, :n], want_k[layer][i, :n], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(v[layer][i, :n], want_v[layer][i, :n], rtol=1e-5, atol=1e-5)
  # Sanity: the random mapper is far from the identity, so the comparison means something.
  assert np.abs(np.asarray(k[0]) - np.asarray(branches.cache.k[0])).max() > 1e-2


# --- the reference release's state dict ------------------------------------------------


@pytest.mark.parametrize("mode", ["both", "none"])
def test_reference_state_dict_round_trip(tmp_path, mode):
  torch.manual_seed(0)
  ref = ReferenceMapper()
  with torch.no_grad():
    for p in ref.parameters():
      p.normal_(0, 0.7)
  path = tmp_path / "mapper.pt"
  torch.save(ref.state_dict(), path)
  assert set(ref.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}

  mapper = load_reference_mapper(path, NUM_LAYERS, features=mode)
  assert (mapper.kind, mapper.features, mapper.num_layers) == ("affine", mode, NUM_LAYERS)
  lengths = [1, 5, 30]
  branches = random_branches([1, 5, 12])
  ours = np.asarray(
    mapper.coefficients(
      branches.cache.k, branches.cache.v, jnp.asarray(lengths), jnp.asarray(len(lengths))
    )
  )[:, :, 0]
  with torch.no_grad():
    want = np.stack([c.numpy() for c in ref.coefficients(lengths, 3, NUM_LAYERS, mode)], -1)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)

  again = tmp_path / "again.pt"
  save_reference_mapper(mapper, again)
  saved = torch.load(again, weights_only=True)
  assert set(saved) == set(ref.state_dict())
  for name, tensor in ref.state_dict().items():
    assert saved[name].shape == tensor.shape and saved[name].dtype == torch.float32
    torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


def test_reference_state_dict_errors(tmp_path):
  state = {k: torch.as_tensor(v) for k, v in random_reference_state().items()}
  missing = tmp_path / "missing.pt"
  torch.save({k: v for k, v in state.items() if k != "net.2.bias"}, missing)
  with pytest.raises(KeyError, match="net.2.bias"):
    load_reference_mapper(missing, NUM_LAYERS)
  extra = tmp_path / "extra.pt"
  torch.save({**state, "net.4.weight": torch.zeros(4, 4)}, extra)
  with pytest.raises(KeyError, match="net.4.weight"):
    load_reference_mapper(extra, NUM_LAYERS)
  wrong = tmp_path / "wrong.pt"
  torch.save({**state, "net.0.weight": torch.zeros(32, 5)}, wrong)
  with pytest.raises(ValueError, match=r"net.0.weight.*\(32, 5\)"):
    load_reference_mapper(wrong, NUM_LAYERS)
  with pytest.raises(ValueError, match="affine"):
    save_reference_mapper(Mapper.create("head_affine", NUM_LAYERS), tmp_path / "h.pt")
