"""The evaluation workflow: workers once, then every synthesis mode on the same outputs.

For each example the frozen base model first runs the K worker prompts
(greedy, batched over branches, `run_workers`). Every synthesis mode then
answers from those very outputs:

* `single_agent`: the question alone (`Task.single_agent_prompt`), no branches;
* `text_synthesis`: the worker outputs pasted as text (`Task.text_synthesis_prompt`);
* cache modes (`synthesize`), each a `CacheMode` (mapper, LoRA): `naive_merge`
  (re-encoding only), `mapper_only`, `lora_only`, and `parallel_synthesis/<variant>`
  (mapper + LoRA trained together) for every mapper variant given.

Every prompt comes from the `Task` (`psynth_jax.tasks`), and so does the score
(`Task.score`, in [0, 1]; accuracy is its mean). TTFT (`psynth_jax/synthesis.py`)
is measured separately in `measure_timings`: warm (one untimed call per shape
first), the median of repeats per example, then the median over examples.
Every mode is timed from token ids: its prompt (the text prompt for the text
modes, the synthesizer prompt for cache modes) is tokenised before the timed
call, and that time is reported next to the TTFT (`measure_timings`), never in it.

Shapes are kept few so that a run compiles a handful of programs, not a few
per example: worker prompts are padded to a fixed number of branches, the
padding branches are kept but emptied (length 0; the mapper is told the real K),
and the merged cache reserves a power of two (>= 64) of rows for the branches.
The text path uses the decoder's usual prompt buckets.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

from psynth_jax import operators
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAWeights
from psynth_jax.operators import MergeOperator, resolve
from psynth_jax.synthesis import synthesize, synthesize_text
from psynth_jax.tasks import Problem, Task, base
from psynth_jax.workers import Branches, run_workers

SINGLE_AGENT = "single_agent"
TEXT_SYNTHESIS = "text_synthesis"
NAIVE_MERGE = "naive_merge"


@dataclasses.dataclass(frozen=True)
class CacheMode:
  """A synthesis mode that reads branch caches: a mapper (None: identity) or another
  merge operator (`psynth_jax.operators`), and a LoRA."""

  name: str
  mapper: Mapper | None = None
  lora: LoRAWeights | None = None
  operator: MergeOperator | None = None

  def __post_init__(self):
    resolve(self.mapper, self.operator)  # refuses both at once

  @property
  def merge(self) -> MergeOperator:
    """The mode's merge operator (the paper's `Reencode(mapper)` unless `operator`)."""
    return resolve(self.mapper, self.operator)


def operator_mode(spec: str, config) -> CacheMode:
  """A training-free operator mode from "NAME" or "NAME:KEY=VALUE,..." (`psynth eval
  --operator`), e.g. "sequential" or "recompute:fraction=0.15"; named by the operator."""
  op = operators.from_spec(spec, config)
  return CacheMode(op.name, operator=op)


def cache_modes(
  mapper_only: Mapper | None = None,
  lora_only: LoRAWeights | None = None,
  full: dict[str, tuple[Mapper, LoRAWeights]] | None = None,
) -> list[CacheMode]:
  """The standard cache modes; those whose trained weights are not given are skipped.

  Args:
    mapper_only: a mapper trained without LoRA.
    lora_only: a LoRA trained without a mapper (identity re-encoding).
    full: mapper variant name -> (mapper, LoRA) trained together.
  """
  modes = [CacheMode(NAIVE_MERGE)]
  if mapper_only is not None:
    modes.append(CacheMode("mapper_only", mapper=mapper_only))
  if lora_only is not None:
    modes.append(CacheMode("lora_only", lora=lora_only))
  for variant, (mapper, lora) in (full or {}).items():
    modes.append(CacheMode(f"parallel_synthesis/{variant}", mapper=mapper, lora=lora))
  return modes


@dataclasses.dataclass
class ExampleRecord:
  """Everything one example produced: worker outputs and each mode's answer."""

  id: str
  family: str
  num_workers: int
  answer: str
  worker_texts: list[str]
  worker_exact: float | None  # fraction of worker outputs equal to the gold branch (if known)
  worker_s: float
  predictions: dict[str, str] = dataclasses.field(default_factory=dict)
  scores: dict[str, float] = dataclasses.field(default_factory=dict)  # Task.score per mode


MAX_WORKERS = 8  # default K the worker batch is padded to


def num_workers(problem: Problem, default: int) -> int:
  """K for a problem: its gold branch count where it has gold branches, else `default`."""
  gold = problem.meta.get("branches")
  return len(gold) if gold else default


def run_example_workers(
  lm, task: Task, problem: Problem, k: int, max_new_tokens: int, pad_to: int = MAX_WORKERS
) -> tuple[list[str], Branches, float]:
  """Runs one problem's k workers; returns their branch texts, `Branches` and wall seconds.

  Prompts are padded with copies of the first one up to `pad_to` rows, so that
  every K reuses the same compiled program; the padding branches are kept in
  `Branches` (fixed shape) with length 0, and only the real texts are returned.
  """
  tok = lm.require_tokenizer()
  prompts = [task.encode(tok, text) for text in task.worker_prompts(problem, k)]
  out = run_workers(lm, prompts + [prompts[0]] * max(0, pad_to - k), max_new_tokens)
  # The padding branches stay (fixed K) but are emptied: they add no rows.
  branches = out.branches.replace(lengths=out.branches.lengths.at[k:].set(0))
  texts = [task.branch_from_output(t) for t in out.texts[:k]]
  return texts, branches, out.seconds


def merged_rows(num_tokens: int) -> int:
  """Rows reserved for the merged branches: a power of two, at least 64."""
  return max(64, 1 << max(0, num_tokens - 1).bit_length())


def prompt_ids(lm, task, mode, problem, outputs) -> tuple[list[int], float]:
  """The mode's prompt ids and the seconds it took to render and tokenise them."""
  if mode == SINGLE_AGENT:
    text = task.single_agent_prompt(problem)
  elif mode == TEXT_SYNTHESIS:
    text = task.text_synthesis_prompt(problem, outputs)
  else:
    text = task.synth_prompt(problem)
  t0 = time.perf_counter()
  ids = task.encode(lm.require_tokenizer(), text)
  return ids, time.perf_counter() - t0


def answer(lm, task, mode, problem, outputs, branches, max_new_tokens, first_token_only=False):
  """One mode's SynthesisResult for one problem; `stages["tokenize"]` is its prompt's.

  Both kinds of path get token ids, so neither timed call tokenises.
  `first_token_only` stops after the TTFT (caches sized for `max_new_tokens`).
  """
  ids, tokenize_s = prompt_ids(lm, task, mode, problem, outputs)
  if mode in (SINGLE_AGENT, TEXT_SYNTHESIS):
    result = synthesize_text(lm, ids, max_new_tokens, first_token_only=first_token_only)
  else:
    extra = mode.merge.extra_rows(branches.num_branches)  # an operator's own rows (links)
    rows = merged_rows(int(branches.lengths.sum()) + extra)
    result = synthesize(
      lm,
      branches,
      ids,
      None,
      mode.lora,
      max_new_tokens,
      num_workers=len(outputs),
      rows=rows,
      first_token_only=first_token_only,
      merge=mode.merge,
    )
  result.stages["tokenize"] = tokenize_s
  return result


def wanted_modes(modes: Sequence[CacheMode], single_agent: bool, text: bool) -> list:
  """The modes to run, in display order: baseline names (str), then CacheModes."""
  return [SINGLE_AGENT] * single_agent + [TEXT_SYNTHESIS] * text + list(modes)


def mode_name(mode) -> str:
  return mode if isinstance(mode, str) else mode.name


def mode_names(modes: Sequence[CacheMode], single_agent: bool = True, text: bool = True):
  return [mode_name(m) for m in wanted_modes(modes, single_agent, text)]


def run_workflow(
  lm,
  task: Task,
  problems: Sequence[Problem],
  modes: Sequence[CacheMode] = (CacheMode(NAIVE_MERGE),),
  single_agent: bool = True,
  text: bool = True,
  worker_max_new_tokens: int = 64,
  answer_max_new_tokens: int = 48,
  progress: bool = True,
  default_workers: int = 3,
) -> list[ExampleRecord]:
  """Workers, then every mode, problem by problem (greedy throughout).

  Args:
    lm: the base `LanguageModel` with a tokenizer.
    task: the `Task` the problems belong to (prompts and score).
    problems: its problems; one with gold branches (`meta["branches"]`) runs
      that many workers, and its worker outputs are compared with them.
    modes: cache modes (see `cache_modes`).
    single_agent: also run the single-agent baseline.
    text: also run text-concatenation synthesis.
    worker_max_new_tokens: worker decode budget.
    answer_max_new_tokens: synthesizer decode budget.
    progress: show a tqdm bar.
    default_workers: K for problems without gold branches.

  Returns:
    One `ExampleRecord` per problem, in order.
  """
  from tqdm.auto import tqdm

  wanted = wanted_modes(modes, single_agent, text)
  records = []
  for p in tqdm(problems, desc=f"eval {task.name}", disable=not progress, mininterval=2):
    k = num_workers(p, default_workers)
    texts, branches, seconds = run_example_workers(lm, task, p, k, worker_max_new_tokens)
    gold = p.meta.get("branches")
    exact = sum(a == b for a, b in zip(texts, gold, strict=True)) / k if gold else None
    rec = ExampleRecord(p.id, p.family, k, p.answer, texts, exact, seconds)
    for mode in wanted:
      result = answer(lm, task, mode, p, texts, branches, answer_max_new_tokens)
      rec.predictions[mode_name(mode)] = result.text
      rec.scores[mode_name(mode)] = task.score(result.text, p)
    records.append(rec)
  return records


def accuracy(
  records: Sequence[ExampleRecord], mode: str, families: Sequence[str] = ()
) -> dict[str, float]:
  """Mean score of one mode per family and "overall" (`tasks.base.accuracy`;
  pass `Task.families` for the task's order)."""
  return base.accuracy(((r.family, r.scores[mode]) for r in records), families)


def time_modes(
  lm, task, problem, outputs, branches, modes, repeats: int = 3, max_new_tokens: int = 48
) -> dict[str, dict[str, float]]:
  """One problem's warm TTFT per mode, from its worker outputs and their `Branches`.

  Per mode: one untimed call (compiles new shapes), then `repeats` timed ones,
  each stopped after its first token (the cache still has the capacity of a
  `max_new_tokens` answer, as in the accuracy run).

  Returns:
    mode name -> medians of {"ttft_s", "tokenize_s" (not inside ttft_s)} and
    "prompt_tokens".
  """
  out = {}
  for mode in modes:
    args = (lm, task, mode, problem, outputs, branches, max_new_tokens, True)
    answer(*args)
    results = [answer(*args) for _ in range(repeats)]
    out[mode_name(mode)] = {
      "ttft_s": statistics.median(r.ttft_s for r in results),
      "tokenize_s": statistics.median(r.stages["tokenize"] for r in results),
      "prompt_tokens": results[0].prompt_tokens,
    }
  return out


def measure_timings(
  lm,
  task: Task,
  problems: Sequence[Problem],
  modes: Sequence[CacheMode] = (CacheMode(NAIVE_MERGE),),
  single_agent: bool = True,
  text: bool = True,
  repeats: int = 3,
  worker_max_new_tokens: int = 64,
  answer_max_new_tokens: int = 48,
  default_workers: int = 3,
) -> dict[str, dict[str, float]]:
  """Per mode: median over problems of `time_modes` (workers run first, not timed).

  The decode budget is the accuracy run's, so caches have the same capacity.

  Returns:
    mode -> {"ttft_s", "tokenize_s" (not inside ttft_s), "prompt_tokens"}.
  """
  wanted = wanted_modes(modes, single_agent, text)
  per_problem = []
  for p in problems:
    k = num_workers(p, default_workers)
    texts, branches, _ = run_example_workers(lm, task, p, k, worker_max_new_tokens)
    per_problem.append(
      time_modes(lm, task, p, texts, branches, wanted, repeats, answer_max_new_tokens)
    )
  return {
    mode_name(m): {
      key: statistics.median(t[mode_name(m)][key] for t in per_problem)
      for key in ("ttft_s", "tokenize_s", "prompt_tokens")
    }
    for m in wanted
    if per_problem
  }


def branch_ids(lm, text: str, length: int) -> list[int]:
  """`length` token ids of `text` repeated (space-separated) as often as needed."""
  if not lm.tokenizer.encode(text):
    raise ValueError("the branch text is empty; cannot build a branch of tokens from it")
  reps = 1
  while len(ids := lm.tokenizer.encode(" ".join([text] * reps))) < length:
    reps *= 2
  return ids[:length]


def ttft_by_length(
  lm,
  task: Task,
  problem: Problem,
  branch_text: str,
  lengths: Sequence[int] = (16, 32, 64, 128),
  num_workers: int = 4,
  mode: CacheMode = CacheMode(NAIVE_MERGE),
  repeats: int = 3,
  max_new_tokens: int = 48,
) -> list[dict[str, float]]:
  """Warm median TTFT of text vs cache synthesis for K branches of each token length.

  Every branch is `branch_text` repeated, tokenised and cut
  to `length` token ids (only the cost matters here). The cache path reads
  those ids via `encode_branches`; the text path gets them decoded back to
  text inside the text-synthesis prompt. Both prompts are tokenised before
  the timed calls (their times reported apart). The token counts each path
  really got are recorded: the cache rows (checked to be K * length), and for
  the text path its whole prompt and the decoded branch re-tokenised on its
  own (a tokenizer that does not round-trip would show here; the worker
  labels and question make up the rest of the prompt). `max_new_tokens` only
  sizes the caches (pass the accuracy run's to reuse its compiled programs).

  Returns:
    Per length: {"length", "num_workers", "text_s", "cache_s", "ratio" (text / cache),
    "text_tokenize_s", "cache_tokenize_s", "text_branch_tokens",
    "cache_branch_tokens" (both summed over the K branches), "text_prompt_tokens",
    "cache_prompt_tokens"}.
  """
  from psynth_jax.workers import encode_branches

  rows = []
  t0 = time.perf_counter()
  tok = lm.require_tokenizer()
  synth_ids = task.encode(tok, task.synth_prompt(problem))
  cache_tokenize_s = time.perf_counter() - t0
  for length in lengths:
    ids = branch_ids(lm, branch_text, length)
    text = lm.decode_text(ids)
    t0 = time.perf_counter()
    text_ids = task.encode(tok, task.text_synthesis_prompt(problem, [text] * num_workers))
    text_tokenize_s = time.perf_counter() - t0
    branches = encode_branches(lm, [ids] * num_workers)
    cache_branch_tokens = int(branches.lengths.sum())
    assert cache_branch_tokens == num_workers * length, (cache_branch_tokens, length)

    def text_path(text_ids=text_ids):
      return synthesize_text(lm, text_ids, max_new_tokens).ttft_s

    def cache_path(branches=branches):
      return synthesize(
        lm, branches, synth_ids, lora=mode.lora, max_new_tokens=max_new_tokens, merge=mode.merge
      ).ttft_s

    text_path(), cache_path()  # compile
    text_s = statistics.median(text_path() for _ in range(repeats))
    cache_s = statistics.median(cache_path() for _ in range(repeats))
    rows.append(
      {
        "length": length,
        "num_workers": num_workers,
        "text_s": text_s,
        "cache_s": cache_s,
        "ratio": text_s / cache_s,
        "text_tokenize_s": text_tokenize_s,
        "cache_tokenize_s": cache_tokenize_s,
        "text_branch_tokens": num_workers * len(tok.encode(text)),
        "cache_branch_tokens": cache_branch_tokens,
        "text_prompt_tokens": len(text_ids),
        "cache_prompt_tokens": len(synth_ids),
      }
    )
  return rows
