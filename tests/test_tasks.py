"""Tests of the synthetic workflow suite, its prompt formats and the suite tokenizer.

Answers are checked by a solver written here from the texts alone (branches and
question), independent of the generator's internals.
"""

import collections
import json
import re

import pytest
import tokenizers

from psynth_jax import tasks
from psynth_jax.tasks import base, chat, synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer


@pytest.fixture(scope="module")
def train():
  return synthetic.generate("train", 900, seed=0)


def _sentences(branches):
  for branch in branches:
    yield from (s.strip() for s in branch.split(".") if s.strip())


def _solve_evidence(question, branches):
  lives, country_of, friend = {}, {}, {}
  for s in _sentences(branches):
    for pattern, table in (
      (r"(\w+) lives in (\w+)", lives),
      (r"(\w+) is in (\w+)", country_of),
      (r"(\w+)'s friend is (\w+)", friend),
    ):
      if m := re.fullmatch(pattern, s):
        assert table.setdefault(m[1], m[2]) == m[2], f"contradicting facts about {m[1]}"
  if m := re.fullmatch(r"which (city|country) does (\w+)('s friend)? live in\?", question):
    city = lives.get(friend.get(m[2]) if m[3] else m[2])
    return city if m[1] == "city" else country_of.get(city)
  m = re.fullmatch(r"who lives in (\w+)\?", question)
  who = [p for p, c in lives.items() if country_of.get(c) == m[1]]
  return who[0] if len(who) == 1 else None


def _solve_candidates(question, branches):
  expr = re.fullmatch(r"what is ([0-9+*-]+)\?", question)[1]
  return str(eval(expr))  # Python's own precedence: safe, the regex admits only digits and ops.


def _solve_tools(question, branches):
  table = collections.defaultdict(dict)
  for branch in branches:
    tool, results = branch.split(": ")
    for item, value in (pair.split(" ") for pair in results.split(", ")):
      table[tool][item] = int(value)
  if m := re.fullmatch(r"what is the total (\w+) of all \w+\?", question):
    return str(sum(table[m[1]].values()))
  if m := re.fullmatch(r"which \w+ has the (highest|lowest) (\w+)\?", question):
    values = table[m[2]]
    best = (max if m[1] == "highest" else min)(values.values())
    return [i for i, v in values.items() if v == best][0] if values else None
  if m := re.fullmatch(r"sort the \w+ by (\w+), lowest first\.", question):
    return ", ".join(sorted(table[m[1]], key=table[m[1]].get))
  if m := re.fullmatch(r"how many \w+ have (\w+) above (\d+)\?", question):
    return str(sum(v > int(m[2]) for v in table[m[1]].values()))
  m = re.fullmatch(r"what is the (\w+) of (\w+) plus (\w+)\?", question)
  values = table[m[1]]
  return str(values[m[2]] + values[m[3]]) if m[2] in values and m[3] in values else None


def solve(family, question, branches):
  return {"evidence": _solve_evidence, "candidates": _solve_candidates, "tools": _solve_tools}[
    family
  ](question, list(branches))


def _every_branch_needed(ex):
  rest = [ex.branches[:i] + ex.branches[i + 1 :] for i in range(len(ex.branches))]
  return all(solve(ex.family, ex.question, r) != ex.answer for r in rest)


def test_deterministic_and_seeded():
  a = synthetic.generate("train", 60, seed=0)
  assert a == synthetic.generate("train", 60, seed=0)
  assert a[:20] == synthetic.generate("train", 20, seed=0)
  b = synthetic.generate("train", 60, seed=1)
  assert [(e.question, e.branches) for e in a] != [(e.question, e.branches) for e in b]


def test_splits_disjoint():
  contents, ids, sums = {}, {}, {}
  for split, seed in (("train", 0), ("validation", 0), ("test", 0), ("test", 1)):
    examples = synthetic.generate(split, 600 if split == "train" else 300, seed=seed)
    assert all(synthetic.split_of(e) == split for e in examples)
    contents.setdefault(split, set()).update((e.question, e.branches) for e in examples)
    ids.setdefault(split, set()).update(e.id for e in examples)
    # A candidates question fixes its answer, so such questions must not cross splits.
    sums.setdefault(split, set()).update(e.question for e in examples if e.family == "candidates")
    assert len({(e.question, e.branches) for e in examples}) == len(examples)
  for s1, s2 in (("train", "validation"), ("train", "test"), ("validation", "test")):
    assert not contents[s1] & contents[s2]
    assert not ids[s1] & ids[s2]
    assert not sums[s1] & sums[s2]
  with pytest.raises(ValueError):
    synthetic.generate("dev", 1)


def _solve_working(ex):
  """The working the target shows: the two facts quoted in hop order, or the looked-up values."""
  q = ex.question
  if ex.family == "evidence":
    facts = list(_sentences(ex.branches))

    def fact(pattern):
      (match,) = [f for f in facts if re.fullmatch(pattern, f)]
      return match

    if m := re.fullmatch(r"which city does (\w+)'s friend live in\?", q):
      first = fact(rf"{m[1]}'s friend is \w+")
      return f"{first}. " + fact(rf"{first.split()[-1]} lives in \w+")
    if m := re.fullmatch(r"which country does (\w+) live in\?", q):
      first = fact(rf"{m[1]} lives in \w+")
      return f"{first}. " + fact(rf"{first.split()[-1]} is in \w+")
    country = re.fullmatch(r"who lives in (\w+)\?", q)[1]
    residents = {f.split()[-1]: f for f in facts if re.fullmatch(r"\w+ lives in \w+", f)}
    (first,) = [
      f for f in facts if re.fullmatch(rf"(\w+) is in {country}", f) and f.split()[0] in residents
    ]  # the one city with a resident
    return f"{first}. {residents[first.split()[0]]}"
  values = [
    (tool, pair.split(" "))
    for tool, results in (b.split(": ") for b in ex.branches)
    for pair in results.split(", ")
  ]
  if m := re.fullmatch(r"what is the (\w+) of (\w+) plus (\w+)\?", q):
    table = {x: v for tool, (x, v) in values if tool == m[1]}
    return f"{m[2]} {table[m[2]]} plus {m[3]} {table[m[3]]}"
  if m := re.fullmatch(r"how many \w+ have (\w+) above (\d+)\?", q):
    above = [x for tool, (x, v) in values if tool == m[1] and int(v) > int(m[2])]
    return ", ".join(above) or "none"
  return ""


def test_answers_match_independent_solver(train):
  for ex in train:
    assert solve(ex.family, ex.question, ex.branches) == ex.answer, ex
    assert _solve_working(ex) == ex.working, ex


def test_follow_up_questions_match_independent_solver(train):
  asked = collections.Counter()
  for ex in train:
    for question, working, answer in synthetic.follow_up_questions(ex):
      assert question != ex.question
      follow = synthetic.Example(ex.id, ex.family, question, ex.branches, (), answer, working)
      assert solve(ex.family, question, ex.branches) == answer, follow
      assert _solve_working(follow) == working, follow
      asked[ex.family] += 1
  assert asked["evidence"] > 0 and asked["tools"] > 0 and not asked["candidates"]


def test_candidates_mix_right_and_wrong_workings(train):
  for ex in (e for e in train if e.family == "candidates"):
    finals = []
    for branch in ex.branches:
      expr, steps = branch.split(": ")
      assert f"what is {expr}?" == ex.question
      for a, op, b, v in re.findall(r"(\d+)([+*-])(\d+)=(-?\d+)", steps):
        assert eval(f"{a}{op}{b}") == int(v)  # every step is honest arithmetic
      finals.append(steps.rsplit("=", 1)[1])
    assert ex.answer in finals and set(finals) - {ex.answer}


def test_coverage(train):
  assert {e.family for e in train} == set(synthetic.FAMILIES)
  assert {len(e.branches) for e in train} == set(range(2, 9))
  assert all(len(e.branches) == len(e.worker_prompts) for e in train)
  lengths = [len(b) for e in train for b in e.branches]
  assert 8 <= min(lengths) and max(lengths) <= 64
  needed = [e for e in train if _every_branch_needed(e)]
  assert {e.family for e in needed} >= {"evidence", "tools"}
  assert {len(e.branches) for e in needed} >= set(range(2, 6))
  six = [
    e for e in synthetic.generate("train", 300, families=["tools"], min_workers=6, max_workers=6)
  ]
  assert any(_every_branch_needed(e) for e in six)
  # Distractors exist too: some branches can be dropped without changing the answer.
  assert len(needed) < len([e for e in train if e.family != "candidates"])
  only = synthetic.generate("test", 20, families=["tools"], min_workers=5, max_workers=5)
  assert {(e.family, len(e.branches)) for e in only} == {("tools", 5)}


def test_worker_output_is_a_function_of_worker_prompt(train):
  seen = {}
  for ex in train:
    for i, branch in enumerate(ex.branches):
      prompt = synthetic.worker_prompt_text(ex, i)
      assert ex.question in prompt
      assert seen.setdefault(prompt, branch) == branch


def test_prompt_formats(train):
  ex = train[0]
  text = synthetic.text_synthesis_prompt_text(ex)
  for i, branch in enumerate(ex.branches):
    assert f"[worker {i + 1}]: {branch}\n" in text
  for prompt in (text, synthetic.synth_prompt_text(ex), synthetic.single_agent_prompt_text(ex)):
    assert prompt.endswith(f"q: {ex.question}\na:")
  assert "latent" in synthetic.synth_prompt_text(ex)
  working = f"{ex.working} => " if ex.working else ""
  assert synthetic.target_text(ex) == " " + working + ex.answer + synthetic.END_MARKER
  assert synthetic.worker_target_text(ex, 0, end_marker="") == " " + ex.branches[0]
  assert synthetic.branch_from_output(synthetic.worker_target_text(ex, 0, "")) == ex.branches[0]


def _all_texts(examples):
  for ex in examples:
    yield synthetic.synth_prompt_text(ex)
    yield synthetic.text_synthesis_prompt_text(ex)
    yield synthetic.single_agent_prompt_text(ex)
    yield from (synthetic.worker_prompt_text(ex, i) for i in range(len(ex.branches)))


def test_tokenizer_round_trip_and_hf_parity(train, tmp_path):
  tok = SuiteTokenizer()
  assert tok.vocab_size < 2400 and tok.pad_token_id == 0
  assert tok.eos_token_id in tok.eos_token_ids
  for text in _all_texts(train):
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
  target = synthetic.target_text(train[0])
  ids = tok.encode(target, add_special_tokens=True)
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  assert tok.decode(ids) == target.removesuffix(synthetic.END_MARKER)
  assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + target
  hf = tokenizers.Tokenizer.from_file(tok.save(str(tmp_path)))
  assert hf.get_vocab_size() == tok.vocab_size
  odd = "Zed!<eos> <pad>x\n\n  "
  for text in [*list(_all_texts(train[:30])), target, odd]:
    for special in (False, True):
      ids = tok.encode(text, add_special_tokens=special)
      assert hf.encode(text, add_special_tokens=special).ids == ids
      assert hf.decode(ids) == tok.decode(ids)
      assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)


def test_answer_matches():
  m = synthetic.answer_matches
  assert m("norway<eos>", "norway") and m(" Norway.\nmore text", "norway")
  assert m("a: 17", "17") and m("17.0", "17") and m("kiwi, apple,fig", "kiwi,apple,fig")
  assert not m("norwa", "norway") and not m("18", "17") and not m("", "")
  assert not m("apple,kiwi", "kiwi,apple") and not m("17 apples", "17")
  # Working before "=>" is not scored; only the last answer counts.
  assert (
    m("oslo => norway<eos>", "norway")
    and m("apple 4 plus fig 7 => 11", "11")
    and m("a => b => 3", "3")
  )
  assert not m("norway => oslo", "norway") and not m("norway =>", "norway")


def test_jsonl_round_trip(train, tmp_path):
  path = str(tmp_path / "suite.jsonl")
  synthetic.write_jsonl(train[:50], path)
  assert synthetic.read_jsonl(path) == train[:50]
  assert train[0].to_json()["family"] == train[0].family
  for original in train[:50]:
    # A record with only a target (a trace) gives the answer and working from it.
    bare = {**original.to_json(), "worker_prompts": [], "target": synthetic.target_text(original)}
    del bare["answer"], bare["working"]
    ex = synthetic.Example.from_json(bare)
    assert (ex.answer, ex.working, ex.worker_prompts) == (original.answer, original.working, ())


def test_accuracy_per_family_in_suite_order():
  scored = [("tools", True), ("evidence", False), ("tools", False), ("evidence", True)]
  scored += [("evidence", True)]
  acc = base.accuracy(scored, synthetic.FAMILIES)
  assert list(acc) == ["evidence", "tools", "overall"]
  assert acc == pytest.approx({"evidence": 2 / 3, "tools": 0.5, "overall": 0.6})
  assert base.accuracy([]) == {"overall": 0.0}


# ---------------------------------------------------------------- the task interface
def test_registry_names_every_builtin_task_and_refuses_clashes():
  assert {"synthetic", "chat", "synthetic_chat"} <= set(tasks.names())
  assert tasks.get("synthetic") is synthetic.TASK and tasks.get("chat") is chat.CHAT
  with pytest.raises(KeyError, match="registered tasks"):
    tasks.get("gsm9k")
  with pytest.raises(ValueError, match="taken"):
    tasks.register(synthetic.SyntheticTask())
  with pytest.raises(TypeError, match="Task"):
    tasks.register(object())


def test_a_registered_task_is_found_by_name():
  class Shouting(chat.ChatTask):
    name = "test_shouting"

    def synth_prompt(self, problem):
      return problem.question.upper()

  task = tasks.register(Shouting(), replace=True)
  assert tasks.get("test_shouting") is task
  assert task.synth_prompt(tasks.Problem("1", "why?")) == "WHY?"


def test_synthetic_task_prompts_are_the_suites(train):
  task = synthetic.TASK
  for ex in train[:30]:
    p = ex.problem()
    assert synthetic.Example.of(p) == ex
    assert (p.id, p.question, p.answer, p.family) == (ex.id, ex.question, ex.answer, ex.family)
    k = len(ex.branches)
    assert task.worker_prompts(p, k) == [synthetic.worker_prompt_text(ex, i) for i in range(k)]
    assert task.synth_prompt(p) == synthetic.synth_prompt_text(ex)
    assert task.single_agent_prompt(p) == synthetic.single_agent_prompt_text(ex)
    assert task.text_synthesis_prompt(p, ex.branches) == synthetic.text_synthesis_prompt_text(ex)
    assert task.target(p) == synthetic.target_text(ex)
    assert task.score(task.target(p), p) == 1.0 and task.score(" nothing", p) == 0.0
    assert task.branch_from_output(task.branch_as_output(ex.branches[0])) == ex.branches[0]
  with pytest.raises(ValueError, match="workers"):
    task.worker_prompts(train[0].problem(), len(train[0].branches) + 1)


def test_synthetic_task_loads_generated_or_from_a_file(train, tmp_path):
  task = synthetic.TASK
  got = task.load(split="train", limit=20, seed=0)
  assert got == [e.problem() for e in train[:20]]
  path = str(tmp_path / "suite.jsonl")
  synthetic.write_jsonl(train[:5], path)
  assert task.load(path) == got[:5]
  with pytest.raises(ValueError, match="limit"):
    task.load(split="test")
  with pytest.raises(ValueError, match="do not apply"):
    task.load(path, max_workers=3)


def test_problem_json_round_trip():
  p = tasks.Problem("7", "what?", "x", {"family": "f", "instructions": ["a", "b"]})
  assert tasks.Problem.from_json(p.to_json()) == p and p.family == "f"


def test_chat_task_prompts_restate_the_question_and_score_words(tmp_path):
  task = chat.CHAT
  p = tasks.Problem("1", "What is 2+3?", "5", {"instructions": ["use a calculator", "count"]})
  workers = task.worker_prompts(p, 2)
  assert all("What is 2+3?" in w for w in workers)
  assert workers[0].endswith("use a calculator") and "worker 2 of 2" in workers[1]
  with pytest.raises(ValueError, match="instructions"):
    task.worker_prompts(p, 3)
  text = task.text_synthesis_prompt(p, ["five", " 5 "])
  assert "[Worker 1]: five\n[Worker 2]: 5" in text and "What is 2+3?" in text
  assert "latent" in task.synth_prompt(p)
  assert task.score("The answer is 5.", p) == 1.0 and task.score("It is 15", p) == 0.0
  with pytest.raises(ValueError, match="no answer"):
    task.score("5", tasks.Problem("2", "q"))
  path = tmp_path / "chat.jsonl"
  path.write_text("\n".join(json.dumps(q.to_json()) for q in (p, tasks.Problem("2", "q"))) + "\n")
  assert task.load(str(path)) == [p, tasks.Problem("2", "q")]
  assert task.load(str(path), limit=1) == [p]


def test_chat_tasks_render_through_the_chat_template():
  class Template:
    def apply_chat_template(self, messages, add_generation_prompt):
      assert add_generation_prompt
      return f"<user>{messages[0]['content']}</user><assistant>"

  assert chat.CHAT.render(Template(), "hi") == "<user>hi</user><assistant>"
  assert synthetic.TASK.render(Template(), "hi") == "hi"  # raw text: unchanged


def test_synthetic_chat_keeps_the_suites_problems_and_score(train):
  task = tasks.get("synthetic_chat")
  p = train[0].problem()
  assert task.load(split="train", limit=3, seed=0) == [e.problem() for e in train[:3]]
  k = len(train[0].branches)
  prompts = task.worker_prompts(p, k)
  assert all(w.endswith("\n" + i) for w, i in zip(prompts, train[0].worker_prompts, strict=True))
  assert task.target(p) == synthetic.target_text(train[0], end_marker="")
  assert task.score(task.target(p), p) == 1.0
