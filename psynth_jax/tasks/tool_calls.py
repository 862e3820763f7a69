"""Stage-1 route "tool calls": each tool call and its response is one branch (the paper's
Toucan / DTA-Tool route). Two upstreams, two registered tasks:

`tool_calls`: ToolTalk's recorded conversations (`nvidia-tooltalk==26.3`, MIT,
`tooltalk/data/tooltalk/*.json`: 50 conversations; a local folder of files in that format,
or one file, can be given). An assistant turn that made at least `MIN_CALLS` api calls is
one problem: its calls, each with its recorded response (or the exception it raised), are
the branches, "[Call i] Name(param=value, ...)\\nResponse: <json>"; the conversation
before it, after ToolTalk's own user-data line (location, time, logged-in user), is the
question; the assistant's reply that follows the calls is the target. (`data/easy` holds
only one-call turns, so it is not read.)

`bfcl_calls`: BFCL v4's multi-turn conversations (`bfcl-eval==2026.3.23`, Apache-2.0,
`bfcl_eval/data/BFCL_v4_multi_turn_<category>.json` with the gold calls of every turn in
`possible_answer/`; a local folder in that layout can be given). Its calls have no recorded
responses, so each conversation's gold calls are executed, turn after turn, on BFCL's own
offline backends (the classes of `bfcl_eval/eval_checker/multi_turn_eval/func_source_code`,
each loaded with the conversation's `initial_config`, the long-context data for the
`long_context` category), as BFCL's checker does; the responses are formatted as BFCL
hands them to a model (text as it is, a dict as JSON, `Error during execution: ...` for an
exception). Calls are parsed with `ast` and only literal arguments are accepted: nothing
is `eval`ed, and every conversation gets fresh instances. A turn with gold calls after
at least one executed call is one problem: the branches are the signatures of the
functions available at that turn, one branch per backend class ("[Functions: Class]"),
then the calls so far with their responses ("[Call i] ..."; the most recent ones when
there are more than `max_branches` in all); the question is the user's messages so far;
the target is the turn's gold calls, one per line. Turns without gold calls (the user
must be asked for a missing parameter, a function is missing), without a user message
(`miss_func`'s turn that adds the function) and first turns are skipped with their reason.
The four categories are variants of the same 200 scenarios: a problem repeated exactly by
an earlier category is skipped, near-repeats are kept.

BFCL's `parallel*` categories are not read: their functions (`spotify.play`,
`calculate_em_force`, ...) belong to no backend, so their gold calls have no responses,
and they have no next turn to be a target.

Turns of one conversation are separate problems, and the split is by problem id: a
later turn's branches or question can hold an earlier turn's target across the
train / validation split (as in `retrieved_chunks`).
"""

from __future__ import annotations

import ast
import copy
import glob
import importlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.routes import Report, RouteTask

MIN_CALLS = 2

TOOLTALK = ("tooltalk", "data/tooltalk")
TOOLTALK_CONVERSATIONS = 50

BFCL = ("bfcl_eval", "data")
BFCL_CATEGORIES = ("base", "long_context", "miss_param", "miss_func")
BFCL_CONVERSATIONS = 200  # per category


# ToolTalk.


def call_text(name: str, arguments: Mapping[str, Any]) -> str:
  """ "Name(key=<json value>, ...)", the call as one line."""
  args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
  return f"{name}({args})"


def _user_data(metadata: Mapping[str, Any]) -> str:
  """ToolTalk's own system-prompt fields (`evaluation/evaluate_nim.py`), on one line."""
  return (
    f"User data: location {metadata.get('location', 'unknown')}; timestamp"
    f" {metadata.get('timestamp', 'unknown')}; username (if logged in)"
    f" {metadata.get('username', 'unknown')}."
  )


def _tooltalk_call(api: Any) -> str | None:
  """One recorded api call as a branch, or None when it is malformed."""
  if not isinstance(api, dict) or not isinstance(api.get("request"), dict):
    return None
  name, params = api["request"].get("api_name"), api["request"].get("parameters", {})
  if not isinstance(name, str) or not isinstance(params, dict):
    return None
  if api.get("exception"):
    response = f"Error: {api['exception']}"
  else:
    response = json.dumps(api.get("response"), ensure_ascii=False)
  return f"{call_text(name, params)}\nResponse: {response}"


def tooltalk_problems(
  conversation: dict, name: str, report: Report, max_branches: int
) -> list[Problem]:
  """The problems of one ToolTalk conversation (every assistant turn is a row of `report`)."""
  turns = conversation.get("conversation")
  if not isinstance(turns, list):
    raise ValueError(f"{name}: not a ToolTalk conversation (no 'conversation' list)")
  head = _user_data(conversation.get("metadata") or {})
  problems, history = [], []
  for pos, turn in enumerate(turns):
    role, text = turn.get("role"), str(turn.get("text") or "").strip()
    label = "User" if role == "user" else "Assistant"
    if role != "assistant":
      history.append(f"{label}: {text}")
      continue
    report.rows += 1
    apis = turn.get("apis") or []
    calls = [_tooltalk_call(api) for api in apis]
    if not apis:
      report.skip("no tool calls")
    elif len(apis) < MIN_CALLS:
      report.skip(f"fewer than {MIN_CALLS} tool calls")
    elif None in calls:
      report.skip("malformed api call")
    elif not text:
      report.skip("no reply after the calls")
    elif not history or not history[-1].startswith("User:"):
      report.skip("no user message before the calls")
    else:
      if any(api.get("exception") for api in apis):
        report.note("a call raised an exception (its message is the response)")
      first = 0
      if len(calls) > max_branches:
        report.note(f"only the last {max_branches} calls kept")
        first = len(calls) - max_branches
      branches = [f"[Call {first + i + 1}] {c}" for i, c in enumerate(calls[first:])]
      question = "\n".join([head, *history])
      meta = {"branches": branches, "conversation": name, "calls": len(calls), "group": name}
      problems.append(Problem(f"{name}-{pos}", question, text, meta))
    history.append(f"{label}: {text}")
  return problems


class ToolTalkCallsTask(RouteTask):
  name = "tool_calls"
  context_line = (
    "You are given latent information: the tool calls made for the user's last message,"
    " each with its response."
  )
  instruction = "Reply to the user's last message using the results of those calls."

  def __init__(self, max_branches: int = 8):
    self.max_branches = max_branches

  def read(self, path=None):
    source = path or benchmark.package_file(*TOOLTALK)
    files = sorted(glob.glob(os.path.join(source, "*.json"))) if os.path.isdir(source) else [source]
    if path is None and len(files) != TOOLTALK_CONVERSATIONS:
      raise ValueError(f"{source}: {len(files)} conversations, expected {TOOLTALK_CONVERSATIONS}")
    report, problems = Report(), []
    for file in files:
      with open(file, encoding="utf-8") as f:
        conversation = json.load(f)
      if not isinstance(conversation, dict):
        raise ValueError(f"{file}: not a ToolTalk conversation (a JSON object)")
      name = str(conversation.get("name") or os.path.splitext(os.path.basename(file))[0])
      problems += tooltalk_problems(conversation, name, report, self.max_branches)
    return problems, report


# BFCL.


def parse_call(text: str) -> tuple[str, list, dict]:
  """ "name(arg, key=value)" -> (name, args, kwargs); only literal arguments (`ast.literal_eval`)."""
  node = ast.parse(text.strip(), mode="eval").body
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
    raise ValueError(f"not a call of a function name: {text!r}")
  if any(k.arg is None for k in node.keywords):
    raise ValueError(f"**arguments in {text!r}")
  args = [ast.literal_eval(a) for a in node.args]
  return node.func.id, args, {k.arg: ast.literal_eval(k.value) for k in node.keywords}


def response_text(result: Any) -> str:
  """A backend's return value as BFCL's executor hands it to a model."""
  if isinstance(result, str):
    return result
  if isinstance(result, dict):
    try:
      return json.dumps(result)
    except (TypeError, ValueError):
      return str(result)
  return str(result)


def signature_text(name: str, method: Callable) -> str:
  """ "name(required, optional=default)" from the backend method itself."""
  params = []
  for p in inspect.signature(method).parameters.values():
    if p.kind is p.VAR_POSITIONAL:
      params.append(f"*{p.name}")
    elif p.kind is p.VAR_KEYWORD:
      params.append(f"**{p.name}")
    elif p.default is p.empty:
      params.append(p.name)
    else:
      params.append(f"{p.name}={p.default!r}")
  return f"{name}({', '.join(params)})"


def bfcl_backend(class_name: str) -> tuple[type, bool]:
  """BFCL's backend class of that name (KeyError if none) and whether it is stateless."""
  benchmark.package_file("bfcl_eval", "eval_checker/multi_turn_eval/func_source_code")
  config = importlib.import_module("bfcl_eval.constants.executable_backend_config")
  module = importlib.import_module(config.CLASS_FILE_PATH_MAPPING[class_name])
  return getattr(module, class_name), class_name in config.STATELESS_CLASSES


def _instances(
  row: dict, backends: Mapping[str, type], long_context: bool
) -> list[tuple[str, object]] | str:
  """Fresh backend instances of the row's classes, loaded with its scenario; or why not."""
  out = []
  for class_name in row["involved_classes"]:
    try:
      if class_name in backends:
        cls, stateless = backends[class_name], False
      else:
        cls, stateless = bfcl_backend(class_name)
    except KeyError:
      return f"no backend class {class_name}"
    except ImportError as e:  # a backend's own import (mpmath for MathAPI) is missing
      return f"backend {class_name} cannot be imported ({e})"
    instance = cls()
    if not stateless:
      scenario = copy.deepcopy(row.get("initial_config", {}).get(class_name, {}))
      instance._load_scenario(scenario, long_context=long_context)
    out.append((class_name, instance))
  return out


def _methods(instances: Sequence[tuple[str, object]]) -> dict[str, tuple[str, Callable]]:
  """Public method name -> (class name, bound method); a later class wins, as in BFCL."""
  methods = {}
  for class_name, instance in instances:
    for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
      if not name.startswith("_"):
        methods[name] = (class_name, method)
  return methods


class BfclCallsTask(RouteTask):
  name = "bfcl_calls"
  context_line = (
    "You are given latent information: the functions available and the function calls made"
    " so far in this session, each with its response."
  )
  instruction = (
    "Write the function calls that carry out the user's last request, one per line, as"
    " name(argument=value, ...)."
  )

  def __init__(
    self,
    max_branches: int = 8,
    categories: Sequence[str] = BFCL_CATEGORIES,
    backends: Mapping[str, type] | None = None,
  ):
    """`backends`: class name -> a backend class (stateful: it has `_load_scenario`) used
    instead of BFCL's own of that name."""
    self.max_branches = max_branches
    self.categories = tuple(categories)
    self.backends = dict(backends or {})

  def read(self, path=None):
    folder = path or benchmark.package_file(*BFCL)
    report, problems, seen = Report(), [], set()
    found = 0
    for category in self.categories:
      rows_path = os.path.join(folder, f"BFCL_v4_multi_turn_{category}.json")
      gold_path = os.path.join(folder, "possible_answer", os.path.basename(rows_path))
      if not os.path.exists(rows_path) and path is not None:
        continue  # a local folder may hold some of the categories
      for p in (rows_path, gold_path):
        if not os.path.exists(p):
          raise FileNotFoundError(f"{p} is missing (BFCL layout: data file + possible_answer/)")
      found += 1
      rows = benchmark.read_jsonl(rows_path)
      gold = {g["id"]: g["ground_truth"] for g in benchmark.read_jsonl(gold_path)}
      if path is None and len(rows) != BFCL_CONVERSATIONS:
        raise ValueError(f"{rows_path}: {len(rows)} conversations, expected {BFCL_CONVERSATIONS}")
      for row in rows:
        for problem in self._conversation(row, gold.get(row["id"]), category, report):
          key = (problem.question, tuple(problem.meta["branches"]), problem.answer)
          if key in seen:
            report.skip("repeats an earlier problem (the categories share scenarios)")
            continue
          seen.add(key)
          problems.append(problem)
    if not found:
      raise FileNotFoundError(
        f"{folder} holds none of BFCL_v4_multi_turn_{{{','.join(self.categories)}}}.json"
      )
    return problems, report

  def _conversation(
    self, row: dict, gold: list[list[str]] | None, category: str, report: Report
  ) -> list[Problem]:
    """The problems of one conversation (every turn is a row of `report`)."""
    questions = row.get("question") or []
    report.rows += len(questions)

    def skip_all(reason: str) -> list[Problem]:
      for _ in questions:
        report.skip(reason)
      return []

    if gold is None or len(gold) != len(questions):
      return skip_all("gold calls missing or not one list per turn")
    try:
      parsed = [[parse_call(c) for c in turn] for turn in gold]
    except (SyntaxError, ValueError):
      return skip_all("a gold call is not a call with literal arguments")
    instances = _instances(row, self.backends, long_context=category == "long_context")
    if isinstance(instances, str):
      return skip_all(instances)
    methods = _methods(instances)
    if any(name not in methods for turn in parsed for name, _, _ in turn):
      return skip_all("a gold call names no function of its backends")
    excluded = set(row.get("excluded_function") or ())
    added = {int(t): set(names) for t, names in (row.get("missed_function") or {}).items()}
    problems, users, calls = [], [], []  # calls: "[Call i] ..." executed so far
    for t, (messages, turn_text, turn_calls) in enumerate(
      zip(questions, gold, parsed, strict=True)
    ):
      message = "\n".join(m["content"].strip() for m in messages if m.get("content"))
      if message:
        users.append(f"User: {message}")
      if not turn_calls:
        report.skip("no gold calls (the user must be asked, or a function is missing)")
      elif not message:
        report.skip("no user message (the turn adds a function)")
      elif not calls:
        report.skip("no calls before this turn")
      else:
        hidden = excluded | {n for at, names in added.items() if at > t for n in names}
        docs = [
          f"[Functions: {class_name}]\n"
          + "\n".join(
            signature_text(n, m)
            for n, (c, m) in methods.items()
            if c == class_name and n not in hidden
          )
          for class_name, _ in instances
        ]
        recent = calls[-max(1, self.max_branches - len(docs)) :]
        if len(recent) < len(calls):
          report.note(f"only the most recent calls kept ({self.max_branches} branches in all)")
        # The categories are variants of one scenario (`multi_turn_<category>_<n>`): a
        # scenario's turns, in every category, fall in one split.
        scenario = f"bfcl/{str(row['id']).rsplit('_', 1)[-1]}"
        meta = {"branches": docs + recent, "category": category, "turn": t, "group": scenario}
        target = "\n".join(c.strip() for c in turn_text)
        problems.append(Problem(f"{row['id']}-turn{t}", "\n".join(users), target, meta))
      for text, (name, args, kwargs) in zip(turn_text, turn_calls, strict=True):
        try:
          response = response_text(methods[name][1](*args, **kwargs))
        except Exception as e:  # the backend's error is the call's response, as in BFCL
          response = f"Error during execution: {e}"
        calls.append(f"[Call {len(calls) + 1}] {text.strip()}\nResponse: {response}")
    return problems


TOOL_CALLS = ToolTalkCallsTask()
BFCL_CALLS = BfclCallsTask()
