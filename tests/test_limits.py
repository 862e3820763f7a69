"""Floors of benchmark stages (`psynth_jax.eval.limits`), checked against hand counts.

The tiny config: V = 64, D = 16, F = 32, one layer, N = G = 2 heads of H = 8, float32, untied.
Per token and layer the matmuls are 2 * (D (N + 2G) H + N H D + 3 D F) = 5120 FLOPs, the
unembedding 2 D V = 2048, and each attended key 4 N H = 64 (QK^T and PV).
"""

from __future__ import annotations

import numpy as np
import pytest

from psynth_jax.eval import limits
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import init_params
from psynth_jax.testing import tiny_config

CONFIG = ModelConfig("llama", 64, 16, 32, 1, 2, 2, 8)
WEIGHTS = 4 * (16 * 16 + 2 * 16 * 16 + 16 * 16 + 3 * 16 * 32 + 2 * 16) + 4 * 64 * 16 + 4 * 16
KV_ROW = 2 * 1 * 2 * 8 * 4  # keys and values, one layer, G x H, float32


def _limits() -> limits.Limits:
  # 1 GB/s and 1 GFLOP/s: a floor in seconds is bytes or FLOPs / 1e9. Rates given, not probed.
  return limits.Limits(CONFIG, 1.0, WEIGHTS, {1: 1.0, 2: 1.0, 3: 1.0})


def test_weight_bytes_and_rows():
  assert limits.weight_read_bytes(init_params(CONFIG)) == WEIGHTS
  assert limits.kv_row_bytes(CONFIG) == KV_ROW


def test_prefill_floor():
  # 3 prompt tokens after 5 cached rows: 3 * 5 + (1 + 2 + 3) = 21 attended keys.
  f = _limits().prefill([3], keys_before=5)
  assert f["flops"] == 3 * 5120 + 2048 + 64 * 21
  assert f["bytes"] == WEIGHTS + (5 + 3) * KV_ROW  # the cached rows read, its own written
  assert f["memory_floor_s"] == pytest.approx(f["bytes"] / 1e9)
  assert f["compute_floor_s"] == pytest.approx(f["flops"] / 1e9)
  assert f["floor_s"] == max(f["memory_floor_s"], f["compute_floor_s"])


def test_prefill_floor_with_lora():
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=2, targets=("q", "v")))
  f = _limits().prefill([3], keys_before=5, lora=lora)
  # Per token: 2 R (D_in + D_out) for q (16 -> 16) and v (16 -> 16).
  assert f["flops"] == 3 * (5120 + 2 * 2 * 32 * 2) + 2048 + 64 * 21
  assert f["bytes"] == WEIGHTS + 4 * 2 * (16 * 2 + 2 * 16) + 8 * KV_ROW
  assert limits.tree_bytes(lora) == 4 * 2 * (16 * 2 + 2 * 16)


def test_decode_floor():
  # Two sequences with 4 and 6 keys before, 3 steps: they attend 5, 6, 7 and 7, 8, 9 keys.
  lim = _limits()
  f = lim.decode([4, 6], steps=3)
  assert f["flops"] == 6 * (5120 + 2048) + 64 * (18 + 24)
  # Each step reads every weight; each token reads its earlier rows and writes its own.
  assert f["bytes"] == 3 * WEIGHTS + ((4 + 5 + 6) + (6 + 7 + 8) + 6) * KV_ROW
  assert f["compute_floor_s"] == pytest.approx(f["flops"] / 1e9)  # at M = B = 2
  feed = lim.decode([4, 6], steps=3, unembed=False)  # no unembedding read or computed
  assert feed["flops"] == f["flops"] - 6 * 2048
  assert feed["bytes"] == f["bytes"] - 3 * 4 * 64 * 16
  assert lim.decode([4], steps=0)["floor_s"] == 0.0


def test_generation_is_prefill_then_decode():
  lim = _limits()
  got = lim.generation([3, 2], steps=2, keys_before=[0, 1], feed_last=True)
  # Decode contexts: each prompt after its cached rows; the feed follows the 2 steps.
  parts = (lim.prefill([3, 2], [0, 1]), lim.decode([3, 3], 2), lim.decode([5, 5], 1, unembed=False))
  assert got == limits.total(*parts)
  assert got["flops"] == (
    (5 * 5120 + 2 * 2048 + 64 * (6 + 5))  # prefill: 1+2+3 and 2+3 attended keys
    + (4 * (5120 + 2048) + 64 * 2 * (4 + 5))  # 2 steps: 4 then 5 keys each
    + 2 * 5120
    + 64 * 2 * 6  # the feed: 6 keys, no unembedding
  )


def test_merge_and_total():
  lim = _limits()
  merge = lim.merge(10)
  assert merge["bytes"] == 2 * 10 * KV_ROW and merge["compute_floor_s"] == 0.0
  prefill = lim.prefill([3], 10)
  both = limits.total(merge, prefill)
  assert both["floor_s"] == pytest.approx(merge["floor_s"] + prefill["floor_s"])
  assert both["bytes"] == merge["bytes"] + prefill["bytes"]


def test_decode_steps():
  assert limits.decode_steps([[1, 2, 3, 4]], 4) == 3  # no stop: the prefill's token + 3
  assert limits.decode_steps([[1, 2], [1, 2, 3]], 4) == 3  # the last stopped on token 4
  assert limits.decode_steps([[], [7]], 4) == 1  # both stopped by their second token
  assert limits.decode_steps([[]], 1) == 0


def test_rate_is_probed_once_per_m():
  lim = limits.Limits(CONFIG, 1.0, WEIGHTS)
  rate = lim.rate(2)
  assert rate > 0 and lim.rates == {2: rate} and lim.rate(2) == rate


def test_attention_cost():
  # B = 1, T = 2 queries at rows 1, 2 over S = 4 rows: 2 + 3 visible entries.
  cost = limits.attention_cost(1, 2, 4, heads=2, kv_heads=1, head_dim=8, offset=1)
  assert cost["flops"] == 4 * 2 * 8 * 5
  assert cost["dense_flops"] == 4 * 2 * 8 * 8
  assert cost["io_bytes"] == 4 * (2 * 2 * 2 * 8 + 2 * 4 * 1 * 8) + 2 * 4  # q, out, k, v; mask
  assert cost["score_bytes"] == 2 * 2 * 2 * 4 * 4
  full = limits.attention_cost(1, 2, 4, 2, 1, 8)
  assert full["flops"] == full["dense_flops"]
  assert limits.attention_cost(1, 2, 4, 2, 1, 8, offset=10)["flops"] == full["flops"]


def test_rate_uses_the_given_probe():
  calls = []
  lim = limits.Limits(CONFIG, 1.0, WEIGHTS, probe=lambda *shape: calls.append(shape) or 7.0)
  assert lim.rate(3) == 7.0 and lim.rate(3) == 7.0
  assert calls == [(3, 16, 32, "float32")]  # (M, D, F) in the model's dtype, once


def test_of_torch_counts_the_peers_own_bytes():
  pytest.importorskip("transformers")
  from psynth_jax.testing import tiny_llama_hf

  hf = tiny_llama_hf()  # V = 512, D = 128, F = 384, 4 layers, 4 heads / 2 kv heads of 32, untied
  d, kv, f = 128, 2 * 32, 384
  layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; two norms
  config = ModelConfig("llama", 512, d, f, 4, 4, 2, 32, dtype="bfloat16")
  lim = limits.Limits.of_torch(hf, config, 1.0)
  # The gathered embedding is not read whole; the untied unembedding and the final norm are.
  assert lim.weight_bytes == 4 * (4 * layer + d + 512 * d)
  assert lim.config.dtype == "float32"  # the peer's own dtype, not the config's
  # torch's own probe, on the device the peer's weights are on
  assert lim.probe.func is limits.torch_matmul_gflops and lim.probe.keywords == {"device": "cpu"}
  assert limits.kv_row_bytes(lim.config) == 2 * 4 * kv * 4


def test_ttft_path_floors():
  from psynth_jax.eval.ttft import path_floors

  # K = 2 branches of L = 3 rows, P = 2 prompt tokens: the text path prefills 8 tokens alone,
  # the cache path 2 after the 6 merged rows. Rates at both Ms given (1 GFLOP/s).
  lim = limits.Limits(CONFIG, 1.0, WEIGHTS, {8: 1.0, 2: 1.0})
  row = path_floors(lim, 2, 3, 2, None, text_ttft_s=1e-3, cache_ttft_s=2e-4)
  text, cache = lim.prefill([8]), lim.prefill([2], 6)
  assert row["text_flops"] == 8 * 5120 + 2048 + 64 * 36  # 1 + ... + 8 attended keys
  assert row["cache_flops"] == 2 * 5120 + 2048 + 64 * (2 * 6 + 3)
  assert row["text_bytes"] == WEIGHTS + 8 * KV_ROW and row["cache_bytes"] == text["bytes"]
  for path, f, ttft_s in (("text", text, 1e-3), ("cache", cache, 2e-4)):
    assert row[f"{path}_floor_s"] == f["floor_s"]
    assert row[f"{path}_memory_floor_s"] == f["memory_floor_s"]
    assert row[f"{path}_compute_floor_s"] == f["compute_floor_s"]
    assert row[f"{path}_vs_floor"] == pytest.approx(ttft_s / f["floor_s"])
  assert row["weight_floor_s"] == pytest.approx(WEIGHTS / 1e9)
  assert row["cache_merge_floor_s"] == pytest.approx(2 * 6 * KV_ROW / 1e9)
  assert row["floor_ratio"] == pytest.approx(text["floor_s"] / cache["floor_s"])


# CONFIG with layer 0's MLP as E = 4 experts of F_E = 8, top-2, in a second layer's model:
# layer 1 stays dense. Per token an expert layer computes its router 2 D E = 128 and two
# experts 2 * 2 * 3 D F_E = 1536 (not all four), the dense layer its MLP 2 * 3 D F = 3072.
MOE = CONFIG.replace(
  num_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, moe_layers=(0,)
)


def test_moe_counts_the_routed_experts_only():
  from psynth_jax.eval.ttft import prefill_flops

  attention = 2 * (16 * 16 + 2 * 16 * 16 + 16 * 16)
  per_token = attention + 128 + 1536 + attention + 3072
  assert prefill_flops(MOE, 1, 0) == per_token + 2048 + 2 * 64  # 1 key, 2 layers
  params = init_params(MOE)
  experts = 4 * 4 * 3 * 16 * 8  # E x (gate, up, down) of D x F_E, float32
  assert limits.expert_bytes(params) == experts
  lim = limits.Limits.of(params, 1.0)
  assert lim.weight_bytes == limits.weight_read_bytes(params)
  # One token reads 2 of 4 experts in expectation; a long prefill all of them.
  assert lim.weights_read(1) == pytest.approx(lim.weight_bytes - experts / 2)
  assert lim.weights_read(3) == pytest.approx(lim.weight_bytes - experts / 8)
  assert lim.weights_read(10_000) == pytest.approx(lim.weight_bytes)
  lim.rates.update({1: 1.0, 2: 1.0})
  step = lim.decode([0, 0], steps=1)
  assert step["bytes"] == pytest.approx(lim.weights_read(2) + 2 * limits.kv_row_bytes(MOE))
  assert limits.experts_read(CONFIG, 1) == 1.0  # dense: every weight


@pytest.mark.parametrize("queries,keys", [(1100, 1152), (1536, 1664), (600, 1024), (80, 3328)])
def test_executed_scores_count_the_blocks_attention_computes(queries, keys):
  """`executed_scores` against the blocks `blocked_attention` runs on a causal prefill (the
  queries the last rows of what is visible): per chunk of queries, the key blocks of the
  prefix read (the last one ending at the prefix) that one of the chunk's queries sees."""
  from psynth_jax.eval.ttft import executed_scores
  from psynth_jax.model import attention_ops

  config = tiny_config(num_heads=14, num_kv_heads=2, head_dim=64)  # Q = 7: "auto" blocks
  visible = min(keys, queries + 1000 if queries < 512 else queries)
  sizes = attention_ops.prefix_sizes(queries, keys)
  n = next(size for size in sizes if size >= visible)
  rows = np.arange(n)
  query_rows = visible - queries + np.arange(queries)
  mask = rows[None, :] <= query_rows[:, None]
  c, chunk = min(attention_ops.BLOCK, n), attention_ops.BLOCK
  count = 0
  for q0 in range(0, queries, chunk):
    for i in range(-(-n // c)):
      start = min(i * c, n - c)
      if mask[q0 : q0 + chunk, max(start, i * c) : start + c].any():
        count += chunk * c if queries > chunk else queries * c
  assert executed_scores(config, queries, keys, visible) == count
