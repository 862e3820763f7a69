"""The benchmark load guard and machine record (no timing: the load is monkeypatched)."""

import json

import pytest

from psynth_jax.eval import bench_meta, limits
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import init_params


def _load(monkeypatch, one_minute):
  monkeypatch.setattr(bench_meta.os, "getloadavg", lambda: (one_minute, 0.5, 0.25))


def test_guard_refuses_above_the_limit(monkeypatch):
  _load(monkeypatch, 1.5)
  with pytest.raises(bench_meta.BusyMachine) as err:
    bench_meta.start()
  message = str(err.value)
  assert "1.50" in message and "1.0" in message and "--force" in message
  assert "stop other work" in message.lower()
  assert isinstance(err.value, SystemExit)  # a script exits with the message, no traceback


def test_guard_passes_below_the_limit(monkeypatch):
  _load(monkeypatch, 0.4)
  run = bench_meta.start()
  assert run.meta["load_1m_start"] == 0.4 and run.meta["load_5m_start"] == 0.5
  assert run.meta["load_15m_start"] == 0.25
  assert not run.meta["forced"] and not run.meta["over_limit"]
  meta = bench_meta.finish(run)
  assert bench_meta.warning(meta) is None and bench_meta.note(meta) is None
  # --force on an idle machine is no override: the result is not marked.
  assert not bench_meta.start(force=True).meta["forced"]


def test_force_marks_the_result(monkeypatch):
  _load(monkeypatch, 3.0)
  run = bench_meta.start(force=True)
  _load(monkeypatch, 2.0)
  meta = bench_meta.finish(run)
  assert meta["forced"] is True and meta["load_1m_start"] == 3.0
  assert meta["load_after"] == [2.0, 0.5, 0.25]
  line = bench_meta.warning(meta)
  assert "FORCED" in line and "3.00" in line and "NOT a result" in line
  json.dumps(meta)  # the meta goes into the JSON as is


def test_demo_records_but_never_refuses(monkeypatch):
  _load(monkeypatch, 5.0)
  meta = bench_meta.finish(bench_meta.start(refuse=False))
  assert meta["over_limit"] and not meta["forced"]
  assert "not a measurement" in bench_meta.note(meta)


def test_machine_record_fields():
  record = bench_meta.machine_record()
  assert record["cpu_model"] and record["cpu_count"] >= 1 and record["device"]
  assert "jax" in record["versions"] and isinstance(record["threads"], dict)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_read_bytes_counts_the_unembedding_once(tied):
  config = ModelConfig("llama", 64, 16, 32, 1, 2, 2, 8, tie_word_embeddings=tied)
  params = init_params(config)
  per_layer = 4 * (16 * 16 + 2 * 16 * 16 + 16 * 16 + 3 * 16 * 32 + 2 * 16)  # attn, mlp, norms
  table = 4 * 64 * 16  # read once: by the tied head, or as the untied lm_head
  assert limits.weight_read_bytes(params) == per_layer + table + 4 * 16
