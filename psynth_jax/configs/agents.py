r"""Agent benchmark configs for `psynth agents` (ReAct workers and synthesizers with tools).

  psynth agents --config psynth_jax/configs/agents.py:gaia_offline --model DIR \
    --workdir runs/agents/gaia_offline --limit 20
  psynth agents --config psynth_jax/configs/agents.py:marble_db_offline --model DIR \
    --workdir runs/agents/db --limit 20 --adapter ps=runs/train/export

The argument is an agent task: `gaia_offline` (generated, levels 1-3), `gaia` (a local copy,
`--set path=.../metadata.jsonl`), `marble_db_offline` (generated PostgreSQL scenarios) or
`marble_db` (MARBLE's `database_main.jsonl`). The reference's budgets are 4096 tokens per
turn and 5 tool steps; the token defaults here are smaller for a CPU.
"""

from ml_collections import ConfigDict


def get_config(task: str = "gaia_offline") -> ConfigDict:
  return ConfigDict(
    dict(
      task=task,
      path="",  # the task's problems from this local file; "" = generated / packaged
      limit=0,  # 0: every problem (the generated sets: gaia_offline 60, marble_db_offline 20)
      num_workers=3,  # GAIA-style workers; database episodes have one per expert (5)
      memory="final",  # worker memory: final | turns | full
      max_steps=5,
      worker_tokens=256,
      answer_tokens=256,
      capacity=6144,  # cache rows per conversation (prompts, tool responses, outputs)
      # Every agent's last turn (after max_steps tool steps) cannot call: the tool-call
      # opener is banned and the whole output is the answer (psynth_jax/agents/react.py).
      final_without_calls=False,
      single_agent=True,
      text_synthesis=True,
      naive_merge=True,
      batch_episodes=8,  # GAIA-style episodes whose workers share one batched cache
      dtype="",
    )
  )
