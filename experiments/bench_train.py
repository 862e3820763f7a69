r"""Training throughput on this machine, and how one step's time splits.

For each model it times the jitted train step (with the KL teacher on, so all
three parts run) and, as separate programs on the same batch, its parts:

* branch prefill: the frozen base over B x K branch texts (no gradient);
* synthesizer fwd+bwd: re-encode + mapper + merge + LoRA synthesizer over
  prompt + target, CE, gradient w.r.t. mapper and LoRA (branch caches given);
* teacher: the base over the text-concatenation prompt + target (forward only).

  python experiments/bench_train.py --models tiny,qwen05 --out results/bench_train.json
  python experiments/bench_train.py --models smollm2,qwen05 --stage stage1 --out ...

`tiny` is the shipped synthetic base (random weights of the same shape if it
is not there); `qwen05` is Qwen2.5-Coder-0.5B-Instruct and `smollm2` SmolLM2-135M-Instruct
from their converted folders. Batches are synthetic-suite examples under each config's
budgets, or with --stage the first fitting traces of that real-data stage
(`psynth_jax/configs/stages.py`: the files experiments/build_stage1.py wrote) under its
budgets. Next to each time: its floor, the step's FLOPs (XLA's cost analysis of the
compiled step) over the matmul rate measured at the model's shapes in the same run.
Times are medians over --repeats runs after one warm-up (compile) run.
Refuses to run on a loaded machine (1-minute load > 1.0 at the start) unless
--force, which marks the JSON "forced": true. The JSON is {"meta", "rows"}.
"""

import importlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from psynth_jax.eval import bench_meta, limits
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import init_params
from psynth_jax.synthesis import latent_hidden
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching, data, losses, trainer
from psynth_jax.train import step as step_lib

flags.DEFINE_list("models", ["tiny", "qwen05"], "tiny | qwen05 | smollm2")
flags.DEFINE_string("stage", "", "stage1 | stage2: real traces under that stage's budgets")
flags.DEFINE_integer("repeats", 3, "timed runs per program")
flags.DEFINE_string("out", "", "write the results as JSON here")
flags.DEFINE_bool("force", False, 'run on a loaded machine (the JSON is marked "forced")')
FLAGS = flags.FLAGS


def _config(name: str, arg: str):
  return importlib.import_module(f"psynth_jax.configs.{name}").get_config(arg)


_CONFIGS = {"qwen05": "qwen2_5_coder_0_5b", "smollm2": "smollm2_135m"}


def _setup(model: str):
  """(config, base params, tokenizer) or None if the weights are missing."""
  if model == "tiny":
    if FLAGS.stage:
      raise app.UsageError("--stage needs a real model (qwen05, smollm2)")
    config = _config("synthetic", "tiny,kl")
    if os.path.isdir(config.model.path):
      from psynth_jax.language_model import load_pretrained

      return config, load_pretrained(config.model.path).params, SuiteTokenizer()
    # The shipped base's shape (psynth_jax.tasks.synthetic_pretrain.PretrainConfig), random weights.
    shape = dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4)
    config.model.init.update(shape, num_kv_heads=4, head_dim=64)
    return config, init_params(ModelConfig(**config.model.init.to_dict())), None
  if model not in _CONFIGS:
    raise app.UsageError(f"unknown model {model!r}: tiny, {', '.join(_CONFIGS)}")
  if model == "smollm2" and not FLAGS.stage:
    raise app.UsageError("smollm2 trains on the real-data stages only: pass --stage stage1")
  config = _config(_CONFIGS[model], f"{FLAGS.stage},kl" if FLAGS.stage else "kl")
  path = os.path.expanduser(config.model.path)
  if not os.path.isdir(path):
    return None
  from psynth_jax.language_model import load_pretrained

  lm = load_pretrained(path)
  return config, lm.params, lm.tokenizer


def _records(config, tokenizer):
  """Trace records for the batch: the stage's train file, else synthetic-suite problems."""
  if FLAGS.stage:
    return data.read_jsonl(config.data.train_jsonl)
  examples = synthetic.generate("train", 64, 0, None, 2, config.batch.max_branches)
  records = [data.gold_trace(synthetic.TASK, e.problem()) for e in examples]
  if not isinstance(tokenizer, SuiteTokenizer):
    for record, example in zip(records, examples, strict=True):
      record["target"] = example.answer  # the tokenizer's own eos is appended instead
  return records


def _time(fn, *args) -> tuple[float, float]:
  """(first call incl. compile, median of repeats) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t0)
  return first, statistics.median(runs)


def bench(model: str) -> dict | None:
  setup = _setup(model)
  if setup is None:
    print(f"{model}: weights not found, skipped")
    return None
  config, base, tokenizer = setup
  tokenizer = tokenizer or SuiteTokenizer()
  spec = trainer.batch_spec(config)
  b = config.batch.batch_size
  records = _records(config, tokenizer)
  eos = tokenizer.eos_token_ids[0]
  batcher = batching.Batcher(tokenizer, spec, 0, eos)
  fitting = [r for r in records if batcher.encode(r)[0] is not None][:b]
  host, _ = batcher(fitting, b)
  batch = jax.tree.map(jnp.asarray, host)
  step_cfg = trainer.step_config(config)
  optimizer = step_lib.make_optimizer(trainer.optimizer_config(config), step_cfg.trainable)
  mapper = Mapper.create(config.mapper.kind, base.config.num_layers, config.mapper.features)
  lora = LoRAWeights.init(base.config, LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha))
  state = step_lib.init_state(mapper, lora, optimizer)

  prefill = jax.jit(
    lambda base, bt: step_lib.encode_branch_batch(base, bt.branch_tokens, bt.branch_mask)
  )
  branches = prefill(base, batch)

  @jax.jit
  def synth_fwd_bwd(params, base, branches, bt):
    def loss(params):
      x = latent_hidden(
        base,
        branches,
        bt.tokens,
        bt.mask,
        params["mapper"],
        params["lora"],
        spec.branch_rows,
        bt.num_workers,
      )
      logits = base.module().unembed(losses.gather_positions(x, bt.score_pos))
      return losses.cross_entropy(logits, bt.labels, bt.weights)

    return jax.value_and_grad(loss)(params)

  teacher = jax.jit(step_lib.teacher_logits)
  full = jax.jit(
    lambda s, base, bt: step_lib.train_step(
      s, base, bt, config=step_cfg, optimizer_config=trainer.optimizer_config(config)
    )
  )

  # The floor: XLA's FLOP count of each program over the matmul rate at the model's shapes.
  c = base.config
  gflops = limits.matmul_gflops(512, c.hidden_size, c.intermediate_size, str(c.dtype))
  costs = {
    "branch_prefill": limits.program_cost(prefill, base, batch),
    "synth_fwd_bwd": limits.program_cost(synth_fwd_bwd, state.params, base, branches, batch),
    "teacher_fwd": limits.program_cost(teacher, base, batch),
    "full_step": limits.program_cost(full, state, base, batch),
  }
  parts = {
    "branch_prefill": _time(prefill, base, batch),
    "synth_fwd_bwd": _time(synth_fwd_bwd, state.params, base, branches, batch),
    "teacher_fwd": _time(teacher, base, batch),
    "full_step": _time(full, state, base, batch),
  }
  counts = batching.token_counts(host)
  tokens = counts["branch_tokens"] + counts["synth_tokens"] + counts["teacher_tokens"]
  step_s = parts["full_step"][1]
  split_total = sum(parts[k][1] for k in ("branch_prefill", "synth_fwd_bwd", "teacher_fwd"))
  return {
    "model": model,
    "params_M": round(sum(x.size for x in jax.tree.leaves(base)) / 1e6, 1),
    "batch": b,
    "device": str(jax.devices()[0].device_kind),
    "tokens_per_step": counts,
    "step_s": step_s,
    "compile_and_first_step_s": parts["full_step"][0],
    "examples_per_s": b / step_s,
    "tokens_per_s": tokens / step_s,
    "target_tokens_per_s": counts["target_tokens"] / step_s,
    "split_s": {k: parts[k][1] for k in ("branch_prefill", "synth_fwd_bwd", "teacher_fwd")},
    "matmul_gflops": gflops,
    "tflop": {k: v["flops"] / 1e12 for k, v in costs.items()},
    "compute_floor_s": {k: v["flops"] / (gflops * 1e9) for k, v in costs.items()},
    "time_over_floor": {
      k: parts[k][1] / max(v["flops"] / (gflops * 1e9), 1e-12) for k, v in costs.items()
    },
    "split_fraction": {
      k: parts[k][1] / split_total for k in ("branch_prefill", "synth_fwd_bwd", "teacher_fwd")
    },
  }


def main(argv):
  del argv
  run = bench_meta.start(force=FLAGS.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  results = [r for model in FLAGS.models if (r := bench(model)) is not None]
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  print(
    "| model | params | batch | step s | floor s (TFLOP / matmul rate) | time / floor |"
    " examples/s | tokens/s | prefill | synth fwd+bwd | teacher |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    f = r["split_fraction"]
    floor = r["compute_floor_s"]["full_step"]
    print(
      f"| {r['model']} | {r['params_M']}M | {r['batch']} | {r['step_s']:.3f} |"
      f" {floor:.3f} ({r['tflop']['full_step']:.2f} / {r['matmul_gflops']:.0f} GFLOP/s) |"
      f" {r['time_over_floor']['full_step']:.2f} | {r['examples_per_s']:.2f} |"
      f" {r['tokens_per_s']:.0f} | {f['branch_prefill']:.0%} |"
      f" {f['synth_fwd_bwd']:.0%} | {f['teacher_fwd']:.0%} |"
    )
  bench_meta.print_warning(meta)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"meta": {**meta, "repeats": FLAGS.repeats}, "rows": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
