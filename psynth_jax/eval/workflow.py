"""The evaluation workflow: workers once, then every synthesis mode on the same outputs.

For each example the frozen base model first runs the K worker prompts
(greedy, batched over branches, `run_workers`). Every synthesis mode then
answers from those very outputs:

* `single_agent`: the question alone (`single_agent_prompt_text`), no branches;
* `text_synthesis`: the worker outputs pasted as text (`text_synthesis_prompt_text`);
* cache modes (`synthesize`), each a `CacheMode` (mapper, LoRA): `naive_merge`
  (re-encoding only), `mapper_only`, `lora_only`, and `parallel_synthesis/<variant>`
  (mapper + LoRA trained together) for every mapper variant given.

Accuracy is the normalised exact match of `answer_matches`. TTFT (DESIGN.md §2)
is measured separately in `measure_ttft`: warm (one untimed call per shape
first), the median of repeats per example, then the median over examples.

Shapes are kept few so that a run compiles a handful of programs, not a few
per example: worker prompts are padded to a fixed number of branches, the
padding branches are kept but emptied (length 0; the mapper is told the real K),
and the merged cache reserves a power of two (>= 64) of rows for the branches.
The text path uses the decoder's usual prompt buckets.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAWeights
from psynth_jax.synthesis import synthesize, synthesize_text
from psynth_jax.tasks import synthetic
from psynth_jax.workers import Branches, run_workers

SINGLE_AGENT = "single_agent"
TEXT_SYNTHESIS = "text_synthesis"
NAIVE_MERGE = "naive_merge"


@dataclasses.dataclass(frozen=True)
class CacheMode:
  """A synthesis mode that reads branch caches: a mapper (None: identity) and a LoRA."""

  name: str
  mapper: Mapper | None = None
  lora: LoRAWeights | None = None


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
  worker_exact: float  # fraction of worker outputs equal to the gold branch
  worker_s: float
  predictions: dict[str, str] = dataclasses.field(default_factory=dict)
  correct: dict[str, bool] = dataclasses.field(default_factory=dict)


def run_example_workers(
  lm, example: synthetic.Example, max_new_tokens: int, pad_to: int = synthetic.MAX_WORKERS
) -> tuple[list[str], Branches, float]:
  """Runs one example's workers; returns their branch texts, `Branches` and wall seconds.

  Prompts are padded with copies of the first one up to `pad_to` rows, so that
  every K reuses the same compiled program; the padding branches are kept in
  `Branches` (fixed shape) with length 0, and only the real texts are returned.
  """
  k = len(example.branches)
  prompts = [lm.tokenizer.encode(synthetic.worker_prompt_text(example, i)) for i in range(k)]
  out = run_workers(lm, prompts + [prompts[0]] * max(0, pad_to - k), max_new_tokens)
  # The padding branches stay (fixed K) but are emptied: they add no rows.
  branches = out.branches.replace(lengths=out.branches.lengths.at[k:].set(0))
  texts = [synthetic.branch_from_output(t) for t in out.texts[:k]]
  return texts, branches, out.seconds


def merged_rows(num_tokens: int) -> int:
  """Rows reserved for the merged branches: a power of two, at least 64."""
  return max(64, 1 << max(0, num_tokens - 1).bit_length())


def _answer(lm, mode, example, worker_example, branches, max_new_tokens):
  """One mode's SynthesisResult for one example."""
  if mode == SINGLE_AGENT:
    return synthesize_text(lm, synthetic.single_agent_prompt_text(example), max_new_tokens)
  if mode == TEXT_SYNTHESIS:
    prompt = synthetic.text_synthesis_prompt_text(worker_example)
    return synthesize_text(lm, prompt, max_new_tokens)
  prompt_ids = lm.tokenizer.encode(synthetic.synth_prompt_text(example))
  rows = merged_rows(int(branches.lengths.sum()))
  k = len(example.branches)
  return synthesize(
    lm, branches, prompt_ids, mode.mapper, mode.lora, max_new_tokens, num_workers=k, rows=rows
  )


def _wanted(modes: Sequence[CacheMode], single_agent: bool, text: bool) -> list:
  """The modes to run, in display order: baseline names (str), then CacheModes."""
  return [SINGLE_AGENT] * single_agent + [TEXT_SYNTHESIS] * text + list(modes)


def _name(mode) -> str:
  return mode if isinstance(mode, str) else mode.name


def mode_names(modes: Sequence[CacheMode], single_agent: bool = True, text: bool = True):
  return [_name(m) for m in _wanted(modes, single_agent, text)]


def run_workflow(
  lm,
  examples: Sequence[synthetic.Example],
  modes: Sequence[CacheMode] = (CacheMode(NAIVE_MERGE),),
  single_agent: bool = True,
  text: bool = True,
  worker_max_new_tokens: int = 64,
  answer_max_new_tokens: int = 48,
  progress: bool = True,
) -> list[ExampleRecord]:
  """Workers, then every mode, example by example (greedy throughout).

  Args:
    lm: the base `LanguageModel` with a tokenizer.
    examples: suite examples (their branches are the gold worker outputs).
    modes: cache modes (see `cache_modes`).
    single_agent: also run the single-agent baseline.
    text: also run text-concatenation synthesis.
    worker_max_new_tokens: worker decode budget.
    answer_max_new_tokens: synthesizer decode budget.
    progress: show a tqdm bar.

  Returns:
    One `ExampleRecord` per example, in order.
  """
  from tqdm.auto import tqdm

  wanted = _wanted(modes, single_agent, text)
  records = []
  for ex in tqdm(examples, desc="eval", disable=not progress, mininterval=2):
    texts, branches, seconds = run_example_workers(lm, ex, worker_max_new_tokens)
    worker_ex = dataclasses.replace(ex, branches=tuple(texts))
    exact = sum(a == b for a, b in zip(texts, ex.branches, strict=True)) / len(texts)
    rec = ExampleRecord(ex.id, ex.family, len(texts), ex.answer, texts, exact, seconds)
    for mode in wanted:
      result = _answer(lm, mode, ex, worker_ex, branches, answer_max_new_tokens)
      rec.predictions[_name(mode)] = result.text
      rec.correct[_name(mode)] = synthetic.answer_matches(result.text, ex.answer)
    records.append(rec)
  return records


def accuracy(records: Sequence[ExampleRecord], mode: str) -> dict[str, float]:
  """Accuracy of one mode per family (suite order) and "overall"."""
  return synthetic.accuracy((r.family, r.correct[mode]) for r in records)


def measure_ttft(
  lm,
  examples: Sequence[synthetic.Example],
  modes: Sequence[CacheMode] = (CacheMode(NAIVE_MERGE),),
  single_agent: bool = True,
  text: bool = True,
  repeats: int = 3,
  worker_max_new_tokens: int = 64,
  answer_max_new_tokens: int = 48,
) -> dict[str, float]:
  """Median warm TTFT per mode (seconds) over `examples`, workers excluded.

  Per example and mode: one untimed call (compiles new shapes), then `repeats`
  timed ones; the example's value is their median, the mode's the median of those.
  The decode budget is the accuracy run's, so caches have the same capacity.
  """
  wanted = _wanted(modes, single_agent, text)
  per_mode: dict[str, list[float]] = {_name(m): [] for m in wanted}
  for ex in examples:
    texts, branches, _ = run_example_workers(lm, ex, worker_max_new_tokens)
    worker_ex = dataclasses.replace(ex, branches=tuple(texts))
    for mode in wanted:
      args = (lm, mode, ex, worker_ex, branches, answer_max_new_tokens)
      _answer(*args)
      times = [_answer(*args).ttft_s for _ in range(repeats)]
      per_mode[_name(mode)].append(statistics.median(times))
  return {name: statistics.median(v) for name, v in per_mode.items() if v}


def ttft_by_length(
  lm,
  example: synthetic.Example,
  lengths: Sequence[int] = (16, 32, 64, 128),
  num_workers: int = 4,
  mode: CacheMode = CacheMode(NAIVE_MERGE),
  repeats: int = 3,
  max_new_tokens: int = 48,
) -> list[dict[str, float]]:
  """Warm median TTFT of text vs cache synthesis for K branches of each token length.

  Every branch is `example`'s first branch text repeated and cut to the length
  (only the cost matters here); the cache path reads them via `encode_branches`,
  the text path pastes them into the text-synthesis prompt. `max_new_tokens`
  only sizes the caches (pass the accuracy run's to reuse its compiled programs).

  Returns:
    Per length: {"length", "num_workers", "text_s", "cache_s", "ratio"} (ratio = text / cache).
  """
  from psynth_jax.workers import encode_branches

  rows = []
  base = example.branches[0] + " "
  synth_ids = lm.tokenizer.encode(synthetic.synth_prompt_text(example))
  for length in lengths:
    branch = (base * (length // len(base) + 1))[:length]
    worker_ex = dataclasses.replace(example, branches=(branch,) * num_workers)
    prompt = synthetic.text_synthesis_prompt_text(worker_ex)
    branches = encode_branches(lm, [lm.tokenizer.encode(branch)] * num_workers)

    def text_path(prompt=prompt):
      return synthesize_text(lm, prompt, max_new_tokens).ttft_s

    def cache_path(branches=branches):
      return synthesize(lm, branches, synth_ids, mode.mapper, mode.lora, max_new_tokens).ttft_s

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
      }
    )
  return rows
