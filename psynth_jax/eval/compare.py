"""The mode comparison: one report of accuracy and TTFT per synthesis mode, as table, JSON, PNG.

`compare_modes` runs `workflow.run_workflow` (accuracy, every mode on the same
worker outputs), `workflow.measure_timings` (warm median TTFT per mode, and
apart from it the median time to tokenise the mode's prompt) and
`workflow.ttft_by_length` (text vs cache TTFT as branches grow) and gathers
them in a `Report`. `format_table`, `write_json` and `plot` present it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from psynth_jax.eval import workflow
from psynth_jax.tasks import Problem, Task


@dataclasses.dataclass
class Report:
  """Scores of every mode on one set of examples.

  Attributes:
    modes: mode names in display order.
    accuracy: mode -> {family: accuracy, ..., "overall": accuracy}.
    ttft_s: mode -> median warm TTFT in seconds (workers excluded).
    workers: {"exact": share of worker outputs equal to the gold branch,
      "seconds_median": median wall time of one example's workers}.
    ttft_by_length: rows of `workflow.ttft_by_length`.
    meta: free-form run description (model, number of examples, ...).
    tokenize_s: mode -> median seconds to tokenise its prompt (not inside ttft_s).
    prompt_tokens: mode -> median tokens its synthesizer prefilled (timed examples).
  """

  modes: list[str]
  accuracy: dict[str, dict[str, float]]
  ttft_s: dict[str, float]
  workers: dict[str, float]
  ttft_by_length: list[dict[str, float]] = dataclasses.field(default_factory=list)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Last, with defaults, so that reports written before they existed still load.
  tokenize_s: dict[str, float] = dataclasses.field(default_factory=dict)
  prompt_tokens: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Report:
    return cls(**data)


def compare_modes(
  lm,
  task: Task,
  problems: Sequence[Problem],
  modes: Sequence[workflow.CacheMode] = (workflow.CacheMode(workflow.NAIVE_MERGE),),
  single_agent: bool = True,
  text: bool = True,
  ttft_examples: int = 8,
  ttft_repeats: int = 3,
  lengths: Sequence[int] = (16, 32, 64, 128),
  length_workers: int = 4,
  worker_max_new_tokens: int = 64,
  answer_max_new_tokens: int = 48,
  progress: bool = True,
  meta: dict[str, Any] | None = None,
) -> Report:
  """Accuracy and TTFT of every mode on the same worker outputs.

  Args:
    lm: the base `LanguageModel` (with a tokenizer).
    task: the `Task` of the problems (prompts and score).
    problems: the problems to score.
    modes: cache modes (`workflow.cache_modes`).
    single_agent: include the single-agent baseline.
    text: include text-concatenation synthesis.
    ttft_examples: how many of `problems` to time (0: no per-mode TTFT).
    ttft_repeats: timed repeats per example and mode.
    lengths: branch lengths (tokens) for the text-vs-cache sweep (empty: skip it).
    length_workers: K in that sweep.
    worker_max_new_tokens: worker decode budget.
    answer_max_new_tokens: synthesizer decode budget.
    progress: show progress bars.
    meta: extra fields for `Report.meta`.
  """
  records = workflow.run_workflow(
    lm,
    task,
    problems,
    modes,
    single_agent,
    text,
    worker_max_new_tokens,
    answer_max_new_tokens,
    progress,
  )
  names = workflow.mode_names(modes, single_agent, text)
  timings = {}
  if ttft_examples:
    timings = workflow.measure_timings(
      lm,
      task,
      problems[:ttft_examples],
      modes,
      single_agent,
      text,
      ttft_repeats,
      worker_max_new_tokens,
      answer_max_new_tokens,
    )
  sweep = []
  if lengths:
    # The fullest cache mode is the one a user would deploy; its cost is timed.
    # Branches of the first problem's first gold branch (its first worker output if none).
    first = problems[0]
    text = (first.meta.get("branches") or records[0].worker_texts)[0]
    sweep = workflow.ttft_by_length(
      lm, task, first, text, lengths, length_workers, modes[-1], ttft_repeats, answer_max_new_tokens
    )
  exact = [r.worker_exact for r in records if r.worker_exact is not None]
  workers = {
    "exact": statistics.fmean(exact) if exact else None,
    "seconds_median": statistics.median(r.worker_s for r in records),
  }
  info = {"task": task.name, "num_examples": len(records), **(meta or {})}
  accuracy = {name: workflow.accuracy(records, name, task.families) for name in names}
  return Report(
    names,
    accuracy,
    {name: t["ttft_s"] for name, t in timings.items()},
    workers,
    sweep,
    info,
    tokenize_s={name: t["tokenize_s"] for name, t in timings.items()},
    prompt_tokens={name: t["prompt_tokens"] for name, t in timings.items()},
  )


def _families(report: Report) -> list[str]:
  """The families of the report's accuracy table, in its own order ("overall" apart)."""
  first = next(iter(report.accuracy.values()), {})
  return [f for f in first if f != "overall"]


def format_table(report: Report) -> str:
  """Plain-text table: one row per mode, accuracy per family, overall, TTFT and speed-up."""
  cols = [*_families(report), "overall"]
  text_ttft = report.ttft_s.get(workflow.TEXT_SYNTHESIS)
  width = max(len(m) for m in report.modes) + 2
  header = f"{'mode':<{width}}" + "".join(f"{c:>12}" for c in cols)
  header += f"{'ttft ms':>10}{'vs text':>9}{'tok ms':>9}{'prompt':>8}"
  lines = [header, "-" * len(header)]
  for mode in report.modes:
    acc = report.accuracy[mode]
    row = f"{mode:<{width}}" + "".join(
      f"{100 * acc[c]:>11.1f}%" if c in acc else f"{'-':>12}" for c in cols
    )
    ttft = report.ttft_s.get(mode)
    row += f"{1000 * ttft:>10.2f}" if ttft is not None else f"{'-':>10}"
    speedup = text_ttft / ttft if ttft and text_ttft else None
    row += f"{speedup:>8.2f}x" if speedup is not None else f"{'-':>9}"
    tok = report.tokenize_s.get(mode)
    row += f"{1000 * tok:>9.3f}" if tok is not None else f"{'-':>9}"
    n = report.prompt_tokens.get(mode)
    row += f"{n:>8.0f}" if n is not None else f"{'-':>8}"
    lines.append(row)
  if report.tokenize_s:
    lines.append(
      "ttft: token ids in -> first token on the host (workers excluded); tok: tokenising the"
      " mode's prompt, before and outside the ttft; prompt: tokens the synthesizer prefilled"
    )
  exact = report.workers["exact"]
  exact = f"{100 * exact:.1f}% outputs exact" if exact is not None else "no gold outputs"
  lines.append(
    f"workers: {exact}, median {1000 * report.workers['seconds_median']:.0f} ms per example"
  )
  if report.ttft_by_length:
    k = report.ttft_by_length[0]["num_workers"]
    lines.append(f"text vs cache TTFT by branch length in tokens (K = {k}):")
    for row in report.ttft_by_length:
      tokens = ""
      if "text_prompt_tokens" in row:  # reports written before token counts were recorded
        tokens = (
          f" (text prefills {row['text_prompt_tokens']} tokens; cache reads"
          f" {row['cache_branch_tokens']} rows + prefills {row['cache_prompt_tokens']})"
        )
      lines.append(
        f"  L={row['length']:>4}: text {1000 * row['text_s']:8.2f} ms, cache"
        f" {1000 * row['cache_s']:8.2f} ms, ratio {row['ratio']:.2f}x" + tokens
      )
  return "\n".join(lines)


def write_json(report: Report, path: str | os.PathLike) -> None:
  """Writes the report as indented JSON (read back with `read_json`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report.to_json(), f, indent=2)
    f.write("\n")


def read_json(path: str | os.PathLike) -> Report:
  with open(path, encoding="utf-8") as f:
    return Report.from_json(json.load(f))


def plot(report: Report, path: str | os.PathLike) -> None:
  """PNG: accuracy bars per mode and family (left), text vs cache TTFT by length (right)."""
  import matplotlib

  matplotlib.use("Agg")  # headless: never needs a display
  import matplotlib.pyplot as plt

  fig, (ax_acc, ax_ttft) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(3, 2))
  groups = _families(report)
  groups.append("overall")
  width = 0.8 / max(len(report.modes), 1)
  for i, mode in enumerate(report.modes):
    xs = [g + (i - (len(report.modes) - 1) / 2) * width for g in range(len(groups))]
    ys = [100 * report.accuracy[mode].get(f, 0.0) for f in groups]
    ax_acc.bar(xs, ys, width, label=mode)
  ax_acc.set_xticks(range(len(groups)), groups)
  ax_acc.set_ylabel("accuracy (%)")
  ax_acc.set_ylim(0, 105)
  ax_acc.set_title(f"accuracy per mode ({report.meta.get('num_examples', '?')} examples)")
  ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

  if report.ttft_by_length:
    lengths = [r["length"] for r in report.ttft_by_length]
    ax_ttft.plot(lengths, [1000 * r["text_s"] for r in report.ttft_by_length], "o-", label="text")
    ax_ttft.plot(lengths, [1000 * r["cache_s"] for r in report.ttft_by_length], "s-", label="cache")
    for r in report.ttft_by_length:
      ax_ttft.annotate(f"{r['ratio']:.1f}x", (r["length"], 1000 * r["text_s"]), fontsize=8)
    ax_ttft.set_xscale("log", base=2)
    ax_ttft.set_xlabel(f"tokens per branch (K = {report.ttft_by_length[0]['num_workers']})")
    ax_ttft.set_ylabel("synthesizer TTFT (ms)")
    ax_ttft.set_title("TTFT: text vs cache (warm median)")
    ax_ttft.legend()
  else:
    ax_ttft.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
