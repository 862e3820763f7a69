"""Stage-1 route "tool calls": ToolTalk turns and BFCL multi-turn conversations parsed into
call branches and targets with skip reasons, BFCL calls executed on a backend, the packaged
sources' counts, and two training steps on each route's traces."""

import importlib.util
import json
import math
import pathlib

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import benchmark
from psynth_jax.tasks.tool_calls import BfclCallsTask, ToolTalkCallsTask, parse_call
from psynth_jax.train import stage1

TOOLTALK_DIR = pathlib.Path(__file__).parent / "fixtures" / "tool_calls" / "tooltalk"
BENCHMARKS = {"gsm8k": [("gsm8k-0", "A question that no fixture repeats.")]}
needs_bfcl = pytest.mark.skipif(
  importlib.util.find_spec("bfcl_eval") is None, reason="bfcl-eval is not installed"
)


def _all(task, path):
  problems, report = task.load_report(str(path), split="train")
  return problems + task.load(str(path), split="validation"), report


def test_tooltalk_turns_with_several_calls_become_problems():
  problems, report = _all(ToolTalkCallsTask(max_branches=2), TOOLTALK_DIR)
  by_id = {p.id: p for p in problems}
  assert sorted(by_id) == ["Alarm-Messages-SendMessage-1-1", "Garden-Reminder-AddReminder-0-3"]
  garden = by_id["Garden-Reminder-AddReminder-0-3"]
  assert garden.question == (
    "User data: location Lisbon; timestamp 2024-04-02 08:00:00; username (if logged in) unknown.\n"
    "User: Remind me to water the tomatoes at 6 pm.\n"
    "Assistant: Happy to. Please log in first: what are your username and password?\n"
    "User: fernlee, moss-and-stone"
  )
  assert garden.meta["branches"] == [
    '[Call 1] UserLogin(username="fernlee", password="moss-and-stone")\n'
    'Response: {"session_token": "tok-1"}',
    '[Call 2] AddReminder(session_token="tok-1", task="water the tomatoes",'
    ' due_date="2024-04-02 18:00:00")\nResponse: {"reminder_id": "r-7"}',
  ]
  assert garden.answer == "Done: you will be reminded to water the tomatoes at 6 pm today."
  alarms = by_id["Alarm-Messages-SendMessage-1-1"]
  assert alarms.question.startswith("User data: location Oslo; timestamp 2024-05-10 21:00:00;")
  assert "username (if logged in) arnebo." in alarms.question
  assert [b.split("\n")[0][:8] for b in alarms.meta["branches"]] == ["[Call 2]", "[Call 3]"]
  assert alarms.meta["branches"][0].endswith("Response: Error: User not found.")
  j = report.to_json()
  assert j["rows"] == 7
  assert j["skipped"] == {
    "no tool calls": 2,
    "fewer than 2 tool calls": 1,
    "no reply after the calls": 1,
    "malformed api call": 1,
  }
  assert j["notes"] == {
    "a call raised an exception (its message is the response)": 1,
    "only the last 2 calls kept": 1,
  }
  one_file = TOOLTALK_DIR / "Garden-Reminder-AddReminder-0.json"
  assert [p.id for p in _all(ToolTalkCallsTask(), one_file)[0]] == [garden.id]


class Notebook:
  """A backend in BFCL's shape: a scenario loader and public methods (the functions)."""

  def _load_scenario(self, scenario, long_context=False):
    self.notes = dict(scenario.get("notes", {}))

  def add(self, title: str, text: str = "") -> dict:
    self.notes[title] = text
    return {"added": title}

  def read(self, title: str) -> str:
    return self.notes[title]  # a KeyError is the call's response

  def count(self) -> int:
    return len(self.notes)

  def delete(self, title: str) -> dict:
    return {"deleted": self.notes.pop(title)}


NOTEBOOK_FUNCTIONS = ["add(title, text='')", "count()", "delete(title)", "read(title)"]


def _user(text):
  return [{"role": "user", "content": text}] if text else []


def _write_bfcl(folder, category, rows):
  """BFCL's layout: the conversations, and their gold calls in possible_answer/."""
  (folder / "possible_answer").mkdir(parents=True, exist_ok=True)
  name = f"BFCL_v4_multi_turn_{category}.json"
  lines = [{k: v for k, v in r.items() if k != "ground_truth"} for r in rows]
  gold = [{"id": r["id"], "ground_truth": r["ground_truth"]} for r in rows]
  (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
  (folder / "possible_answer" / name).write_text("".join(json.dumps(g) + "\n" for g in gold))


def _notebook_row(rid, turns, **extra):
  return {
    "id": rid,
    "question": [_user(q) for q, _ in turns],
    "ground_truth": [g for _, g in turns],
    "initial_config": {"Notebook": {"notes": {"todo": "buy milk"}}},
    "involved_classes": ["Notebook"],
    **extra,
  }


@pytest.fixture
def bfcl_folder(tmp_path):
  base = [
    _notebook_row(
      "multi_turn_base_0",
      [
        ("Add a note called plan saying draft.", ["add(title='plan', text='draft')"]),
        ("Read it back and count my notes.", ["read(title='plan')", "count()"]),
        ("Now read the other one.", []),
        ("The one called ghost.", ["read(title='ghost')"]),
        ("Then read todo.", ["read(title='todo')"]),
      ],
      excluded_function=["delete"],
    ),
    _notebook_row("multi_turn_base_1", [("Open it.", ["add(title=open('x'))"]), ("Go.", [])]),
    _notebook_row("multi_turn_base_2", [("Add x.", ["add(title='x')"]), ("Erase x.", ["erase()"])]),
  ]
  miss_func = [
    _notebook_row(
      "multi_turn_miss_func_0",
      [
        ("Add a note called plan saying draft.", ["add(title='plan', text='draft')"]),
        ("Read it back.", ["read(title='plan')"]),
        ("And count my notes.", []),  # `count` is missing until turn 3
        ("", ["count()"]),
        ("Then delete todo.", ["delete(title='todo')"]),
      ],
      missed_function={"3": ["count"]},
    )
  ]
  # Notebook ignores long_context: the copy repeats base's problems exactly.
  long_context = [dict(r, id=r["id"].replace("base", "long_context")) for r in base]
  _write_bfcl(tmp_path, "base", base)
  _write_bfcl(tmp_path, "miss_func", miss_func)
  _write_bfcl(tmp_path, "long_context", long_context)
  return tmp_path


def test_bfcl_gold_calls_are_executed_into_branches(bfcl_folder):
  task = BfclCallsTask(max_branches=4, backends={"Notebook": Notebook})
  problems, report = _all(task, bfcl_folder)
  by_id = {p.id: p for p in problems}
  assert sorted(by_id) == [
    "multi_turn_base_0-turn1",
    "multi_turn_base_0-turn3",
    "multi_turn_base_0-turn4",
    "multi_turn_miss_func_0-turn1",
    "multi_turn_miss_func_0-turn4",
  ]
  functions = "[Functions: Notebook]\n" + "\n".join(
    f for f in NOTEBOOK_FUNCTIONS if "delete" not in f
  )
  first = by_id["multi_turn_base_0-turn1"]
  assert (
    first.question
    == "User: Add a note called plan saying draft.\nUser: Read it back and count my notes."
  )
  assert first.meta["branches"] == [
    functions,
    "[Call 1] add(title='plan', text='draft')\nResponse: {\"added\": \"plan\"}",
  ]
  assert first.answer == "read(title='plan')\ncount()"
  last = by_id["multi_turn_base_0-turn4"]  # 1 functions branch + the 3 most recent calls
  assert last.meta["branches"][1:] == [
    "[Call 2] read(title='plan')\nResponse: draft",
    "[Call 3] count()\nResponse: 2",
    "[Call 4] read(title='ghost')\nResponse: Error during execution: 'ghost'",
  ]
  assert last.answer == "read(title='todo')" and last.question.count("User: ") == 5
  hidden = by_id["multi_turn_miss_func_0-turn1"].meta["branches"][0]
  assert hidden == "[Functions: Notebook]\n" + "\n".join(
    f for f in NOTEBOOK_FUNCTIONS if "count" not in f
  )
  later = by_id["multi_turn_miss_func_0-turn4"]
  assert later.meta["branches"][0] == "[Functions: Notebook]\n" + "\n".join(NOTEBOOK_FUNCTIONS)
  assert later.meta["branches"][-1] == "[Call 3] count()\nResponse: 2"
  j = report.to_json()
  assert j["rows"] == 5 + 2 + 2 + 5 + 9  # base, miss_func, long_context (a copy of base)
  assert j["notes"] == {"only the most recent calls kept (4 branches in all)": 2}
  assert j["skipped"] == {
    "repeats an earlier problem (the categories share scenarios)": 3,
    "no calls before this turn": 3,
    "no gold calls (the user must be asked, or a function is missing)": 3,
    "a gold call is not a call with literal arguments": 4,
    "a gold call names no function of its backends": 4,
    "no user message (the turn adds a function)": 1,
  }
  again = _all(BfclCallsTask(max_branches=4, backends={"Notebook": Notebook}), bfcl_folder)[0]
  assert [p.to_json() for p in again] == [p.to_json() for p in problems]


def test_parse_call_takes_literal_arguments_only():
  assert parse_call("f(1, b=[2, 'x'], c=None)") == ("f", [1], {"b": [2, "x"], "c": None})
  for bad in ("f(x)", "a.f()", "f(**k)", "f(g())", "1 + 2"):
    with pytest.raises((ValueError, SyntaxError)):
      parse_call(bad)


def _file_system_folder(folder):
  root = {
    "fern": {
      "type": "directory",
      "contents": {
        "notes.txt": {"type": "file", "content": "seeds\nsoil\nwater"},
      },
    }
  }
  row = {
    "id": "multi_turn_base_0",
    "question": [
      _user("What is in my folder?"),
      _user("Show notes.txt and sort it."),
      _user("How many lines does it have?"),
    ],
    "ground_truth": [
      ["ls()"],
      ["cat(file_name='notes.txt')", "sort(file_name='notes.txt')"],
      ["wc(file_name='notes.txt', mode='l')"],
    ],
    "initial_config": {"GorillaFileSystem": {"root": root}},
    "involved_classes": ["GorillaFileSystem"],
  }
  _write_bfcl(folder, "base", [row])
  return folder


@needs_bfcl
def test_bfcl_calls_run_on_bfcls_own_backend(tmp_path):
  problems, _ = _all(tasks.get("bfcl_calls"), _file_system_folder(tmp_path))
  by_id = {p.id: p for p in problems}
  assert sorted(by_id) == ["multi_turn_base_0-turn1", "multi_turn_base_0-turn2"]
  p = by_id["multi_turn_base_0-turn1"]
  assert p.meta["branches"][0].startswith(
    "[Functions: GorillaFileSystem]\ncat(file_name)\ncd(folder)"
  )
  assert p.meta["branches"][1] == (
    '[Call 1] ls()\nResponse: {"current_directory_content": ["notes.txt"]}'
  )
  assert p.answer == "cat(file_name='notes.txt')\nsort(file_name='notes.txt')"
  assert by_id["multi_turn_base_0-turn2"].meta["branches"][2:] == [
    '[Call 2] cat(file_name=\'notes.txt\')\nResponse: {"file_content": "seeds\\nsoil\\nwater"}',
    '[Call 3] sort(file_name=\'notes.txt\')\nResponse: {"sorted_content": "seeds\\nsoil\\nwater"}',
  ]


def test_the_packaged_sources_have_their_counts():
  """The real files (installed by `psynth data install`, always in CI)."""
  try:
    talk, talk_report = tasks.get("tool_calls").read()
    bfcl, bfcl_report = tasks.get("bfcl_calls").read()
  except benchmark.MissingDataError as e:
    pytest.skip(str(e))
  assert talk_report.rows == 177 and len(talk) == 61  # every turn with 2+ calls
  assert bfcl_report.rows == 3_336 and len(bfcl) > 1_400
  assert not [r for r in bfcl_report.skipped if "backend" in r and "import" in r]
  assert [p.to_json() for p in tasks.get("bfcl_calls").read()[0][:50]] == [
    p.to_json() for p in bfcl[:50]
  ]


@pytest.mark.parametrize("route", ["tool_calls", pytest.param("bfcl_calls", marks=needs_bfcl)])
def test_two_training_steps_on_the_routes_traces(route, tmp_path):
  """The traces are trainer rows: a tiny chat model takes two steps on them."""
  from psynth_jax import testing

  path = TOOLTALK_DIR if route == "tool_calls" else _file_system_folder(tmp_path / "bfcl")
  out = tmp_path / "traces"
  stage1.build([route], str(out), paths={route: str(path)}, benchmarks=BENCHMARKS)
  rows = [json.loads(line) for s in ("train", "validation") for line in open(out / f"{s}.jsonl")]
  (out / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  history = testing.train_two_steps(
    tmp_path, out / "all.jsonl", branch_tokens=512, branch_rows=1024, target_tokens=128
  )
  losses = [h["loss"] for h in history]
  assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses
  assert all(h["skipped"] == 0 for h in history), history


@pytest.mark.parametrize(
  "route, pin", [("tool_calls", "nvidia-tooltalk"), ("bfcl_calls", "bfcl-eval")]
)
def test_a_missing_package_names_its_install_line(route, pin, monkeypatch):
  monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(benchmark.MissingDataError, match=f"{pin}==.*psynth data install"):
    tasks.get(route).read()
