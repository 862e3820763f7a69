"""Database diagnosis scenarios: a real PostgreSQL with MARBLE's anomalies induced, and gold labels.

  with Scenario(("VACUUM", "LOCK_CONTENTION"), seed=3) as env:   # ~5 s with its own server
    env.gold                          # ("LOCK_CONTENTION", "VACUUM")
    env.problem()                     # a Problem: MARBLE_DB.instruction / .score apply
    boxes = db_tools.expert_toolboxes(env.agent)
    env.evidence()                    # what the catalog views show, per label (tests)
  # clients closed, database dropped, server stopped and removed

  specs = scenario_specs(20, seed=0)  # every single anomaly and pair, then again, seeded
  with PostgresServer() as server:    # one server for many scenarios: a database each
    for spec in specs:
      with spec.scenario(server) as env: ...

The anomaly types are those of MARBLE's released database set (`MARBLE_LABELS`), induced
the way its `anomaly_trigger/anomaly.py` does, smaller, by real concurrent clients of the
`app` role (pgbench and psycopg), each on its own table of a small domain schema:
  INSERT_LARGE_DATA  pgbench clients insert thousands of rows per statement.
  LOCK_CONTENTION    pgbench clients update a few hot rows inside transactions that stay
                     open; then one session holds a row lock, idle in its transaction, and
                     others wait on it for as long as the scenario lasts.
  VACUUM             80% of a table deleted, then scanned by pgbench clients; with
                     autovacuum off the dead rows stay.
  REDUNDANT_INDEX    indexes that duplicate the primary key, or repeat or prefix one
                     another, created and maintained by an update workload, never scanned.
  FETCH_LARGE_DATA   pgbench clients fetch whole tables, every row, repeatedly.
Before the anomalies, table statistics are reset (then ANALYZE), statement history is
reset, and a light normal workload runs (point reads, single-row writes) so the views are
not empty apart from the anomaly. Setup statements are not in the history
(`postgres.ADMIN_OPTIONS`). Every workload has finished when `__enter__` returns: what is
left is idle sessions and lock waiters, so no CPU load runs while an agent is timed, and
the evidence stays put while agents look (they record nothing: see `postgres`).

`Scenario.from_problem` runs one of MARBLE's own tasks (`tasks.agents.MARBLE_DB.load`): its
`init_sql`, then its anomalies on MARBLE's `table1`-style tables, scaled down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import subprocess
import time
from collections.abc import Mapping, Sequence

from psynth_jax.agents.db_schema import DOMAINS, Column, Table
from psynth_jax.agents.postgres import PostgresServer
from psynth_jax.tasks.agents import MARBLE_LABELS, cause_label
from psynth_jax.tasks.base import Problem

ANOMALIES = MARBLE_LABELS
NUM_PREDICTIONS = 2  # the synthesizer names at most 2 root causes, as MARBLE's tasks ask
CASES = [(a,) for a in ANOMALIES] + list(itertools.combinations(ANOMALIES, 2))  # 5 + 10

# What `evidence()` calls present (the workloads below exceed these several times over).
MIN_INSERT_ROWS_PER_CALL = 1000
MIN_FETCH_ROWS_PER_CALL = 5000
MIN_DEAD_TUPLES, MIN_DEAD_RATIO = 1000, 0.5


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much each workload does. The default keeps a scenario to seconds on one core."""

  rows: tuple[int, int] = (8000, 16000)  # rows each table starts with: uniform in this range
  clients: int = 2  # concurrent pgbench clients per workload
  normal_transactions: int = 20
  insert_rows: int = 2000  # per INSERT statement
  insert_transactions: int = 5  # per client
  lock_transactions: int = 10  # per client, each holding a hot row's lock lock_hold_ms
  lock_hold_ms: int = 50
  lock_waiters: int = 2  # sessions left waiting on the held row lock
  delete_fraction: float = 0.8
  scan_transactions: int = 10  # per client, over the bloated table
  index_updates: int = 20  # per client, maintaining the redundant indexes
  fetch_transactions: int = 3  # per client, each fetching a whole table


@dataclasses.dataclass(frozen=True)
class ScenarioSpec:
  anomalies: tuple[str, ...]
  seed: int
  domain: str

  def scenario(self, server: PostgresServer | None = None, scale: Scale = Scale()) -> Scenario:
    return Scenario(self.anomalies, self.seed, self.domain, server, scale)


def scenario_specs(n: int, seed: int = 0) -> list[ScenarioSpec]:
  """`n` scenarios: the 15 cases (each anomaly alone, each pair) in a seeded order, repeated
  as needed, each with its own seed and a seeded domain."""
  rng = random.Random(seed)
  cases = []
  while len(cases) < n:
    cases += rng.sample(CASES, len(CASES))
  domains = sorted(DOMAINS)
  return [ScenarioSpec(c, seed * 1000 + i, rng.choice(domains)) for i, c in enumerate(cases[:n])]


_COUNTER = itertools.count()


class Scenario:
  """One database with `anomalies` induced; a context manager (see the module docstring).

  Args:
    anomalies: one or more of `ANOMALIES` (any spelling `cause_label` reads).
    seed: fixes the domain (unless given), which table gets which anomaly, and the data.
    domain: a key of `DOMAINS`.
    server: a started server to use (a fresh database in it); default: a server of its own.
    scale: how much each workload does.
  """

  def __init__(self, anomalies, seed=0, domain=None, server=None, scale=Scale(), *, _marble=None):
    anomalies = [anomalies] if isinstance(anomalies, str) else list(anomalies)
    self.gold = tuple(sorted({cause_label(a) for a in anomalies}))
    if bad := [a for a in self.gold if a not in ANOMALIES] or not self.gold:
      raise ValueError(f"anomalies are one or more of {ANOMALIES}, got {bad or anomalies}")
    self.seed, self.scale, self._server, self._marble = seed, scale, server, _marble
    rng = random.Random(seed)
    self.domain = domain or rng.choice(sorted(DOMAINS))
    if _marble is None:  # each anomaly on its own table of the domain, seeded
      self.tables = DOMAINS[self.domain].tables
      self.targets = dict(zip(self.gold, rng.sample(self.tables, len(self.gold)), strict=True))
    else:  # MARBLE's own layout: table1, table2, ... one per anomaly
      self.tables = tuple(_marble_table(i, a) for i, a in enumerate(_marble.meta["anomalies"]))
      self.targets = {cause_label(a): t for a, t in zip(anomalies, self.tables, strict=True)}
    self.rows = {t.name: rng.randint(*scale.rows) for t in self.tables}
    self.name = f"scenario_{next(_COUNTER)}_{os.getpid()}"
    self.server = self.admin = self.app = self.agent = None
    self._held = []  # the lock holder and its waiters: open until __exit__
    self._stack = contextlib.ExitStack()

  @classmethod
  def from_problem(cls, problem: Problem, server=None, scale=Scale()) -> Scenario:
    """One of MARBLE's tasks (`MARBLE_DB.load`): its init_sql and anomalies."""
    if not problem.meta.get("anomalies"):
      raise ValueError(f"problem {problem.id!r} has no environment anomalies to induce")
    anomalies = [a["anomaly"] for a in problem.meta["anomalies"]]
    return cls(anomalies, server=server, scale=scale, _marble=problem)

  # --- lifecycle ---------------------------------------------------------------------------

  def __enter__(self) -> Scenario:
    try:
      self.server = self._server or self._stack.enter_context(PostgresServer())
      roles = self.server.create_database(self.name)
      self._stack.callback(self.server.drop_database, self.name)
      self.admin, self.app, self.agent = roles["admin"], roles["app"], roles["agent"]
      self._setup()
      self._pgbench("normal", self._normal_script(), self.scale.normal_transactions, clients=1)
      for label in self.gold:
        INDUCE[label](self, self.targets[label])
      self._wait_for_clients()
    except BaseException:
      self._stack.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _setup(self) -> None:
    with self.admin.connect(autocommit=True) as conn:
      conn.execute(f"SET ROLE {self.app.user}")
      conn.execute("SELECT setseed(%s)", (random.Random(self.seed).uniform(-1, 1),))
      if self._marble is not None and self._marble.meta.get("init_sql", "").strip():
        conn.execute(self._marble.meta["init_sql"])
      for table in self.tables:
        conn.execute(table.create())
        conn.execute(table.insert_many(self.rows[table.name]))
        if table.index:
          conn.execute(
            f"CREATE INDEX {table.name}_{table.index}_idx ON {table.name} ({table.index})"
          )
      conn.execute("RESET ROLE")
      # The load's counters are flushed at the next idle moment (not a second later), then
      # cleared; ANALYZE then sets the live-row counts the counters start from.
      conn.execute("SELECT pg_stat_force_next_flush()")
      conn.execute("SELECT pg_stat_reset()")
      conn.execute("ANALYZE")
      # This database's statement history only: others on the server may be mid-episode.
      conn.execute(
        "SELECT pg_stat_statements_reset(0, oid, 0) FROM pg_database"
        " WHERE datname = current_database()"
      )

  def _normal_script(self) -> str:
    lines = []
    for t in self.tables:
      lines += [
        f"\\set id random(1, {self.rows[t.name]})",
        f"SELECT * FROM {t.name} WHERE id = :id;",
      ]
      if t.index:
        lines.append(f"SELECT count(*) FROM {t.name} WHERE {t.index} = :id % 1000;")
    first = self.tables[0]
    return "\n".join([*lines, f"{first.insert_one()};", f"{first.update('id = :id', column=-1)};"])

  def _pgbench(self, name: str, script: str, transactions: int, clients: int | None = None) -> None:
    """Runs `script` with pgbench as the app role, to completion (seconds)."""
    path = os.path.join(self.server.root, f"{self.name}_{name}.sql")
    with open(path, "w") as f:
      f.write(script + "\n")
    clients = clients or self.scale.clients
    cmd = [os.path.join(self.server.bindir, "pgbench"), "-n", "-c", str(clients), "-j", "1"]
    cmd += ["-t", str(transactions), "-f", path, f"--random-seed={self.seed}"]
    env = dict(os.environ, **self.app.environ(), PGAPPNAME="app")
    try:
      result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
      os.unlink(path)
    if result.returncode != 0:
      raise RuntimeError(f"pgbench ({name}) failed:\n{result.stderr[-2000:]}")

  def _connect_app(self, autocommit: bool):
    conn = self.app.connect(autocommit=autocommit, application_name="app")
    self._stack.callback(conn.close)
    return conn

  def _wait_for_clients(self, timeout: float = 30) -> None:
    """Until every finished client's backend has exited (its statistics are then flushed)."""
    held = {c.info.backend_pid for c in self._held}
    deadline = time.monotonic() + timeout
    with self.admin.connect(autocommit=True) as conn:
      while time.monotonic() < deadline:
        pids = {
          p
          for (p,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
            (self.name, self.app.user),
          )
        }
        if pids <= held:
          return
        time.sleep(0.05)
    raise RuntimeError(f"workload sessions still open after {timeout}s")

  # --- what the views show -----------------------------------------------------------------

  def problem(self) -> Problem:
    """The task as a Problem (MARBLE_DB's prompts and score apply); MARBLE's own for
    `from_problem`."""
    if self._marble is not None:
      return self._marble
    labels = ", ".join(f"'{a}'" for a in ANOMALIES)
    question = (
      f"This database is used by {DOMAINS[self.domain].description}. Its tables:"
      f" {', '.join(t.name for t in self.tables)}.\nRecently, during operation, the database"
      " has seen performance issues. Use SQL queries to find out what is wrong and the"
      f" reason that caused it. The root cause can be one or two of the following: {labels}."
    )
    meta = {
      "family": "single_cause" if len(self.gold) == 1 else "multi_cause",
      "labels": list(ANOMALIES),
      "num_predictions": NUM_PREDICTIONS,
      "domain": self.domain,
      "seed": self.seed,
      "anomalies": [{"anomaly": a, "table": self.targets[a].name} for a in self.gold],
    }
    return Problem(f"pg-{self.seed:05d}", question, ",".join(self.gold), meta)

  def evidence(self) -> dict[str, dict]:
    """Per label, what the catalog views show, read as the superuser, and whether it is
    `present` (the thresholds above). Induced anomalies are present; the others are not."""
    per_call = (
      "SELECT coalesce(max(rows / greatest(calls, 1)), 0) FROM pg_stat_statements"
      " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
      " AND query ILIKE %s"
    )
    with self.admin.connect(autocommit=True) as conn:
      q = lambda sql, *args: conn.execute(sql, args).fetchall()  # noqa: E731
      insert, fetch = q(per_call, "insert%")[0][0], q(per_call, "select%")[0][0]
      waiting = q(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND a.datname = current_database()"
      )[0][0]
      tables = q(
        "SELECT relname, n_live_tup, n_dead_tup, last_autovacuum, n_tup_ins"
        " FROM pg_stat_user_tables ORDER BY relname"
      )
      indexes = q(
        "SELECT c.relname, i.indexrelid::regclass::text, i.indkey::text, i.indisunique"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND i.indpred IS NULL"
      )
    dead_table, live, dead, last_autovacuum, _ = max(tables, key=lambda t: t[2])
    ratio = dead / max(live + dead, 1)
    inserted = max(tables, key=lambda t: t[4])
    redundant = _redundant_indexes(indexes)
    return {
      "INSERT_LARGE_DATA": {
        "present": insert >= MIN_INSERT_ROWS_PER_CALL,
        "insert_rows_per_call": insert,
        "table": inserted[0],
        "n_tup_ins": inserted[4],
      },
      "LOCK_CONTENTION": {"present": waiting >= 1, "waiting_locks": waiting},
      "VACUUM": {
        "present": dead >= MIN_DEAD_TUPLES and ratio >= MIN_DEAD_RATIO,
        "table": dead_table,
        "n_dead_tup": dead,
        "n_live_tup": live,
        "dead_ratio": ratio,
        "last_autovacuum": last_autovacuum,
      },
      "REDUNDANT_INDEX": {"present": bool(redundant), "redundant": redundant},
      "FETCH_LARGE_DATA": {
        "present": fetch >= MIN_FETCH_ROWS_PER_CALL,
        "select_rows_per_call": fetch,
      },
    }

  def busy_backends(self) -> int:
    """Sessions of this database running a statement other than waiting on a lock (the
    caller's own excepted): 0 once `__enter__` has returned."""
    with self.admin.connect(autocommit=True) as conn:
      return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND"
        " state = 'active' AND wait_event_type IS DISTINCT FROM 'Lock'"
        " AND pid <> pg_backend_pid()"
      ).fetchone()[0]


def _redundant_indexes(indexes: Sequence[tuple]) -> list[str]:
  """Indexes another index on the same table makes redundant: its key columns are a leading
  prefix of the other's (or equal to them), and it enforces no uniqueness the other lacks.
  Rows are (table, index, indkey as text, unique); expression indexes are left out."""
  out = set()
  for (table, name, keys, unique), (table2, _, keys2, unique2) in itertools.permutations(
    indexes, 2
  ):
    a, b = keys.split(), keys2.split()
    if table != table2 or "0" in a + b or b[: len(a)] != a:
      continue
    if not unique or (unique2 and a == b):
      out.add(name)
  return sorted(out)


# --- the anomalies -----------------------------------------------------------------------------


def _insert_large_data(env: Scenario, t: Table) -> None:
  s = env.scale
  env._pgbench("insert", f"{t.insert_many(s.insert_rows)};", s.insert_transactions)


def _lock_contention(env: Scenario, t: Table) -> None:
  s = env.scale
  script = (
    f"\\set id random(1, 3)\nBEGIN;\n{t.update('id = :id')};\n\\sleep {s.lock_hold_ms} ms\nEND;"
  )
  env._pgbench("lock", script, s.lock_transactions)
  holder = env._connect_app(autocommit=False)
  holder.execute(t.update("id = 1"))  # and stays idle in its transaction
  waiters = [env._connect_app(autocommit=True) for _ in range(s.lock_waiters)]
  for w in waiters:
    w.pgconn.send_query(t.update("id = 1").encode())  # blocks on the holder's row lock
  env._held = [holder, *waiters]
  with env.admin.connect(autocommit=True) as conn:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      pids = [w.info.backend_pid for w in waiters]
      blocked = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
        (pids,),
      ).fetchone()[0]
      if blocked == len(waiters):
        return
      time.sleep(0.05)
  raise RuntimeError("the lock waiters did not block")


def _vacuum(env: Scenario, t: Table) -> None:
  s = env.scale
  with env._connect_app(autocommit=True) as conn:
    conn.execute(f"DELETE FROM {t.name} WHERE id <= {int(env.rows[t.name] * s.delete_fraction)}")
  script = f"SELECT count(*) FROM {t.name} WHERE {t.columns[0].name} IS NOT NULL;"
  env._pgbench("scan", script, s.scan_transactions)


def _redundant_index(env: Scenario, t: Table) -> None:
  a, b = t.columns[0].name, t.columns[1].name
  with env._connect_app(autocommit=True) as conn:
    for sql in (
      f"CREATE INDEX {t.name}_id_idx ON {t.name} (id)",  # the primary key again
      f"CREATE INDEX {t.name}_{a}_idx ON {t.name} ({a})",
      f"CREATE INDEX idx_{t.name}_{a} ON {t.name} ({a})",  # the same, another name
      f"CREATE INDEX {t.name}_{a}_{b}_idx ON {t.name} ({a}, {b})",  # {a} alone is its prefix
    ):
      conn.execute(sql)
  script = f"\\set id random(1, {env.rows[t.name]})\n{t.update('id = :id')};"
  env._pgbench("index", script, env.scale.index_updates)


def _fetch_large_data(env: Scenario, t: Table) -> None:
  env._pgbench("fetch", f"SELECT * FROM {t.name};", env.scale.fetch_transactions)


INDUCE = {
  "INSERT_LARGE_DATA": _insert_large_data,
  "LOCK_CONTENTION": _lock_contention,
  "VACUUM": _vacuum,
  "REDUNDANT_INDEX": _redundant_index,
  "FETCH_LARGE_DATA": _fetch_large_data,
}


def _marble_table(i: int, anomaly: Mapping) -> Table:
  """MARBLE's anomaly table (`create_table` in its anomaly.py): `ncolumn` varchar columns of
  `colsize`, and a timestamp; at most 20 columns of 100 characters here."""
  n, size = min(int(anomaly.get("ncolumn", 10)), 20), min(int(anomaly.get("colsize", 100)), 100)
  columns = tuple(Column(f"name{j}", "text", size) for j in range(max(n, 2)))
  return Table(f"table{i + 1}", (*columns, Column("time", "ts")))
