"""Tests for psynth_jax.train.data: the JSONL -> array_record dataset and BatchIterator."""

import json
import re

import pytest

from psynth_jax.train import data


def _rows(n, prefix):
  """Fixture rows: K = 0..8 branches, unicode, newlines, quotes, optional synth_prompt."""
  rows = []
  for i in range(n):
    row = {
      "id": f"{prefix}-{i}",
      "task": ["gsm8k", "humaneval", "gaia"][i % 3],
      "question": f'Q{i}: what is 2+{i}? «ünïcödé» 数学 🚀\n"quoted"',
      "branches": [f"worker {k} of ex {i}: ∑ {'x' * k}\nline2" for k in range(i % 9)],
      "target": f"answer {2 + i} ✓" if i % 4 else "",
    }
    if i % 2:
      row["synth_prompt"] = f"Synthesize the {i % 9} workers. 你好"
    if i % 3 == 1:
      row["worker_prompts"] = [f"worker {k}, do part {k} ✓\n" for k in range(i % 9)]
    rows.append(row)
  rows[1]["branches"] = ["", ""]  # Empty branch texts survive too.
  rows[1]["worker_prompts"] = ["", "p"]
  return rows


def _write_jsonl(path, rows):
  # Blank lines are skipped by the reader, so line numbers still match the file.
  lines = [json.dumps(row, ensure_ascii=i % 2 == 0) for i, row in enumerate(rows)]
  path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("traces")
  rows = {"train": _rows(23, "tr"), "validation": _rows(7, "va")}
  paths = {split: _write_jsonl(root / f"{split}.jsonl", r) for split, r in rows.items()}
  data_dir = str(root / "tfds")
  data.build_dataset(paths, data_dir)
  return rows, paths, data_dir


def _expected(row):
  return {"synth_prompt": "", "worker_prompts": [], "family": "", **row}


def test_round_trip_every_field(built):
  rows, _, data_dir = built
  for split, split_rows in rows.items():
    source = data.load_split(data_dir, split)
    assert len(source) == len(split_rows)
    examples = list(source)
    assert examples == [_expected(row) for row in split_rows]
    assert all(isinstance(e["branches"], list) for e in examples)
  train_ks = {len(e["branches"]) for e in data.load_split(data_dir, "train")}
  assert train_ks == set(range(9))


def test_random_access(built):
  rows, _, data_dir = built
  source = data.load_split(data_dir, "train")
  expected = [_expected(row) for row in rows["train"]]
  assert source[17] == expected[17]
  assert source[-1] == expected[-1]
  assert source.__getitems__([5, 0, 5, 22]) == [expected[i] for i in (5, 0, 5, 22)]
  with pytest.raises(IndexError):
    source[23]
  assert list(data.load_split(data_dir, "train[:4]")) == expected[:4]


def test_rebuild_reuses_and_detects_changed_files(built, tmp_path):
  rows, paths, data_dir = built
  data.build_dataset(paths, data_dir)  # Same contents: reused.
  new_rows = _rows(5, "new")
  changed = {"train": _write_jsonl(tmp_path / "train.jsonl", new_rows)}
  with pytest.raises(ValueError, match="other JSONL contents"):
    data.build_dataset(changed, data_dir)
  fresh_dir = str(tmp_path / "tfds")
  data.build_dataset(paths, fresh_dir)
  data.build_dataset(changed, fresh_dir, overwrite=True)
  assert list(data.load_split(fresh_dir, "train")) == [_expected(r) for r in new_rows]


def test_load_split_needs_prepared_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared"):
    data.load_split(str(tmp_path), "train")


_GOOD = {"id": "a", "task": "t", "question": "q", "branches": ["b"], "target": "x"}


@pytest.mark.parametrize(
  "bad_line, message",
  [
    (
      json.dumps({k: v for k, v in _GOOD.items() if k != "target"}),
      r"missing key\(s\) \['target'\]",
    ),
    (json.dumps({**_GOOD, "question": 3}), "key 'question' must be a string, got int"),
    (
      json.dumps({**_GOOD, "synth_prompt": None}),
      "key 'synth_prompt' must be a string, got NoneType",
    ),
    (json.dumps({**_GOOD, "branches": "b"}), "key 'branches' must be a list of strings, got str"),
    (json.dumps({**_GOOD, "branches": ["b", 7]}), r"branches\[1\] must be a string, got int"),
    (json.dumps({**_GOOD, "synth_promt": "s"}), r"unknown key\(s\) \['synth_promt'\]"),
    (json.dumps({**_GOOD, "worker_prompts": [1]}), r"worker_prompts\[0\] must be a string"),
    (json.dumps({**_GOOD, "worker_prompts": ["p"] * 9}), "9 worker_prompts for"),
    (json.dumps(["not", "an", "object"]), "expected a JSON object, got list"),
    ('{"id": "a", ', "invalid JSON"),
    (json.dumps({**_GOOD, "id": "ok-0"}), "duplicate id 'ok-0' \\(first seen on line 1\\)"),
  ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad_line, message):
  good = [json.dumps({**_GOOD, "id": f"ok-{i}"}) for i in range(2)]
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join([*good, bad_line]) + "\n", encoding="utf-8")
  with pytest.raises(data.TraceFormatError, match=re.escape(f"{path}:3: ") + message):
    data.read_jsonl(path)
  with pytest.raises(data.TraceFormatError, match=re.escape(f"{path}:3: ")):
    data.build_dataset({"train": str(path)}, str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds").exists()  # Nothing written for a bad file.


def test_bad_utf8_names_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(json.dumps(_GOOD).encode() + b"\n\xff\xfe\n")
  with pytest.raises(data.TraceFormatError, match=re.escape(f"{path}:2: not valid UTF-8")):
    data.read_jsonl(path)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _iterator(source, seed=0, batch_size=4, process_index=0, process_count=1, **kwargs):
  return data.BatchIterator(
    source,
    seed=seed,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    **kwargs,
  )


def test_iterator_is_deterministic_and_seed_dependent():
  source = list(range(50))
  assert _take(_iterator(source, seed=3), 30) == _take(_iterator(source, seed=3), 30)
  assert _take(_iterator(source, seed=3), 12) != _take(_iterator(source, seed=4), 12)


def test_epochs_are_permutations_that_differ():
  source = list(range(10))
  it = _iterator(source, batch_size=4, drop_remainder=False, num_epochs=3)
  assert it.steps_per_epoch == 3
  batches = list(it)
  assert [len(b) for b in batches] == [4, 4, 2] * 3
  epochs = [sum(batches[i : i + 3], []) for i in (0, 3, 6)]
  assert all(sorted(e) == source for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3

  dropped = list(_iterator(source, batch_size=4, num_epochs=2))
  assert len(dropped) == 4 and all(len(b) == 4 for b in dropped)
  assert len(set(dropped[0] + dropped[1])) == 8


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_take_disjoint_slices_of_each_global_batch(drop_remainder):
  source = list(range(37))
  kwargs = dict(seed=7, batch_size=8, drop_remainder=drop_remainder, num_epochs=2)
  global_batches = list(_iterator(source, **kwargs))
  per_host = [list(_iterator(source, process_index=p, process_count=4, **kwargs)) for p in range(4)]
  assert all(len(h) == len(global_batches) for h in per_host)  # Hosts stay in lockstep.
  for step, global_batch in enumerate(global_batches):
    slices = [h[step] for h in per_host]
    assert sum(slices, []) == global_batch
    if len(global_batch) == 8:
      assert all(len(s) == 2 for s in slices)
  if not drop_remainder:
    assert [len(h[4]) for h in per_host] == [2, 1, 1, 1]  # 37 = 4 * 8 + 5


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9, 12])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_restore_state_reproduces_uninterrupted_run(cut, drop_remainder):
  source = list(range(18))  # 4 full batches of 4 per epoch, plus 2 left over.
  kwargs = dict(seed=11, batch_size=4, process_index=1, process_count=2)
  reference = _take(_iterator(source, drop_remainder=drop_remainder, **kwargs), cut + 10)

  it = _iterator(source, drop_remainder=drop_remainder, **kwargs)
  _take(it, cut)
  state = json.loads(json.dumps(it.get_state()))
  resumed = _iterator(source, drop_remainder=drop_remainder, **kwargs)
  resumed.set_state(state)
  assert _take(resumed, 10) == reference[cut:]


def test_state_moves_to_next_epoch_after_last_batch():
  it = _iterator(list(range(18)), batch_size=4)
  _take(it, 3)
  assert it.get_state() == {"epoch": 0, "index": 12}
  next(it)
  assert it.get_state() == {"epoch": 1, "index": 0}
  it.set_state({"epoch": 2, "index": 16})  # Too few left for a full batch.
  assert it.get_state() == {"epoch": 3, "index": 0}


def test_iterator_over_tfds_source_matches_list(built):
  rows, _, data_dir = built
  source = data.load_split(data_dir, "train")
  from_tfds = _take(_iterator(source, seed=5, batch_size=6, process_index=1, process_count=3), 8)
  from_list = _take(
    _iterator(
      [_expected(r) for r in rows["train"]], seed=5, batch_size=6, process_index=1, process_count=3
    ),
    8,
  )
  assert from_tfds == from_list
  assert all(len(b) == 2 and isinstance(b[0]["id"], str) for b in from_tfds)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(batch_size=6, process_count=4),
    dict(process_index=2, process_count=2),
    dict(seed=-1),
    dict(batch_size=16),
    dict(num_epochs=-1),
  ],
)
def test_iterator_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    _iterator(list(range(10)), **kwargs)
