"""`marble_db_offline`: generated database-diagnosis episodes on a real PostgreSQL 15.

MARBLE's own set (`marble_db`) is in no package; this task generates its scenarios
(`psynth_jax.agents.db_scenarios`: each of MARBLE's five anomaly types alone and in pairs,
seeded) with MARBLE's prompts and scoring. `load(split="test", limit=None, seed=0,
size=20)`: `size` scenarios drawn by `scenario_specs(size, seed)`; nothing is started until
an episode runs (`psynth_jax.agents.environments.DatabaseEnvironment`). Ids are
"pg-<scenario seed>"; meta as `Scenario.problem` gives (domain, seed, anomalies and tables).
"""

from __future__ import annotations

from psynth_jax.tasks import agents


class MarbleOfflineTask(agents.MarbleDBTask):
  name = "marble_db_offline"

  def load(self, path=None, *, split="test", limit=None, seed=0, size=20):
    from psynth_jax.agents.db_scenarios import scenario_specs

    if path is not None:
      raise ValueError("marble_db_offline is generated, it reads no file; MARBLE's is 'marble_db'")
    if split != "test":
      raise ValueError(f"marble_db_offline has one split, 'test', not {split!r}")
    return [spec.scenario().problem() for spec in scenario_specs(size, seed)][:limit]


MARBLE_DB_OFFLINE = MarbleOfflineTask()
