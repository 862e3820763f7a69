"""The disposable PostgreSQL server, MARBLE's anomalies on it, the agents' read-only tools,
and MARBLE's scoring.

The server tests need PostgreSQL (Debian `postgresql`) and psycopg; without them they skip,
except under CI (CI=true, where `.ci/run` installs the package): there they fail, so CI
never passes without having run them.
"""

import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from psynth_jax.agents import db_scenarios, db_tools, postgres
from psynth_jax.agents.db_scenarios import ANOMALIES, CASES, Scenario
from psynth_jax.tasks import agents
from psynth_jax.tasks.base import Problem

MARBLE = os.path.join(
  os.path.dirname(__file__), "fixtures", "bench", "marble", "database_main.jsonl"
)


def _need_postgres():
  if why := postgres.available():
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI must run the PostgreSQL tests: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def server():
  _need_postgres()
  with postgres.PostgresServer() as s:
    yield s


def _gone(pid: int, root: str) -> bool:
  """The process has exited (or is a zombie nobody reaped) and its directory is removed."""
  try:
    with open(f"/proc/{pid}/status") as f:
      running = "\nState:\tZ" not in f.read()
  except FileNotFoundError:
    running = False
  return not running and not os.path.exists(root)


def _port_free(port: int) -> bool:
  """Nothing listens on `port` (SO_REUSEADDR: the closed connections' TIME_WAIT do not count)."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


# --- the server ------------------------------------------------------------------------------


def test_server_runs_unprivileged_in_its_own_dir(server):
  with open(f"/proc/{server.pid}/status") as f:
    uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
  assert uid == (pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid())
  assert server.version >= postgres.MIN_VERSION
  with server.conn().connect() as conn:
    show = lambda name: conn.execute(f"SHOW {name}").fetchone()[0]  # noqa: E731
    assert show("data_directory").startswith(server.root + os.sep)
    assert show("unix_socket_directories") == server.root
    assert show("port") == str(server.port)
    assert "pg_stat_statements" in show("shared_preload_libraries")
    assert show("autovacuum") == "off"
  with server.conn("agent").connect() as conn:
    assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
    assert conn.execute(
      "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone() == (False,)


def test_a_failure_inside_the_block_leaves_nothing_running():
  _need_postgres()
  with pytest.raises(RuntimeError, match="a failing test"):
    with postgres.PostgresServer() as s:
      pid, root, port = s.pid, s.root, s.port
      raise RuntimeError("a failing test")
  assert _gone(pid, root) and _port_free(port)


def test_sigterm_and_sigkill_leave_no_server(tmp_path):
  _need_postgres()
  script = textwrap.dedent("""
    import sys, time
    from psynth_jax.agents.postgres import PostgresServer
    with PostgresServer() as s:
      print(s.pid, s.root, flush=True)
      time.sleep(120)
  """)
  for sig in (signal.SIGTERM, signal.SIGKILL):
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid, root = child.stdout.readline().split()
    child.send_signal(sig)
    child.wait(30)
    # After SIGKILL no Python code runs: the kernel stops the server (pdeathsig) and only
    # the directory is left, which we remove here.
    left = "/nonexistent" if sig == signal.SIGKILL else root
    deadline = time.monotonic() + 20
    while not _gone(int(pid), left) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert _gone(int(pid), left), f"the server outlived the process killed by {sig!r}"
    subprocess.run(["rm", "-rf", root], check=True)


def test_a_failing_anomaly_cleans_up(server, monkeypatch):
  seen = {}

  def half_induced(env, table):
    db_scenarios._lock_contention(env, table)  # locks held, waiters blocked
    seen.update(name=env.name, pid=env.server.pid, root=env.server.root)
    raise RuntimeError("induction failed")

  monkeypatch.setitem(db_scenarios.INDUCE, "LOCK_CONTENTION", half_induced)
  with pytest.raises(RuntimeError, match="induction failed"):  # on the shared server
    with Scenario("LOCK_CONTENTION", seed=1, server=server):
      pass
  with server.conn().connect() as conn:
    assert conn.execute(
      "SELECT count(*) FROM pg_database WHERE datname = %s", (seen["name"],)
    ).fetchone() == (0,)
    assert conn.execute(
      "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
    ).fetchone() == (0,)
  with pytest.raises(RuntimeError, match="induction failed"):  # on a server of its own
    with Scenario("LOCK_CONTENTION", seed=1):
      pass
  assert _gone(seen["pid"], seen["root"])


# --- the anomalies -----------------------------------------------------------------------------


def _line(text: str, start: str) -> list[str]:
  """The cells of the first output line that starts with `start`."""
  return next(line for line in text.splitlines() if line.startswith(start)).split(" | ")


# Per cause: its expert, the tool and arguments it reads, and what the output shows there
# about the anomaly's table.
SEEN_BY = {
  "INSERT_LARGE_DATA": (
    "workload",
    "pg_stat_statements",
    {"contains": "INSERT"},
    lambda text, t: float(_line(text, f"INSERT INTO {t} ")[-1]) >= 1000,  # rows per call
  ),
  "LOCK_CONTENTION": (
    "lock",
    "pg_locks",
    {"only_waiting": True},
    lambda text, t: any(f"| {t} |" in line and "| False |" in line for line in text.splitlines()),
  ),
  "VACUUM": (
    "vacuum",
    "pg_stat_user_tables",
    {},
    lambda text, t: float(_line(text, f"{t} |")[3]) > 0.7,  # dead_ratio
  ),
  "REDUNDANT_INDEX": (
    "index",
    "pg_indexes",
    {},
    lambda text, t: (
      bool(_line(text, f"{t} | {t}_id_idx |"))  # a second index on the key
      and sum(
        line.split(" | ")[3] == "0" for line in text.splitlines() if line.startswith(f"{t} | ")
      )
      >= 3
    ),
  ),
  "FETCH_LARGE_DATA": (
    "query",
    "pg_stat_statements",
    {"order_by": "rows"},
    lambda text, t: float(_line(text, f"SELECT * FROM {t} |")[-1]) > 1000,  # rows per call
  ),
}


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
def test_each_anomaly_alone_and_in_pairs_is_visible_in_the_catalog_views(server, case):
  with Scenario(case, seed=len(case) * 10 + CASES.index(case), server=server) as env:
    assert env.busy_backends() == 0  # no workload runs while the model is timed
    evidence = env.evidence()
    assert {label for label, e in evidence.items() if e["present"]} == set(case), evidence
    boxes = db_tools.expert_toolboxes(env.agent)
    for label in case:
      expert, tool, args, shows = SEEN_BY[label]
      assert tool in boxes[expert]
      text = boxes[expert].call(tool, args).text
      assert shows(text, env.targets[label].name), text
    if "VACUUM" in case:
      v = evidence["VACUUM"]
      assert v["table"] == env.targets["VACUUM"].name and v["last_autovacuum"] is None
      assert v["dead_ratio"] > 0.7
    if "LOCK_CONTENTION" in case:
      assert evidence["LOCK_CONTENTION"]["waiting_locks"] >= env.scale.lock_waiters
      activity = boxes["lock"].call("pg_stat_activity", {}).text
      assert "idle in transaction" in activity and "| Lock |" in activity
    if "REDUNDANT_INDEX" in case:
      t = env.targets["REDUNDANT_INDEX"].name
      assert f"{t}_id_idx" in evidence["REDUNDANT_INDEX"]["redundant"]
    # The evidence stays put while agents work: they record no history and no counters.
    for box in boxes.values():
      for tool in box.names():
        if tool not in ("explain", "sql"):
          box.call(tool, {})
      box.call("sql", {"query": f"SELECT count(*) FROM {env.tables[0].name}"})
    time.sleep(0.2)
    assert env.evidence() == evidence


def test_scenarios_side_by_side_keep_their_own_evidence(server):
  """Episodes batched together: each scenario's database has its own history and locks."""
  with Scenario("INSERT_LARGE_DATA", seed=7, server=server) as first:
    with Scenario(("LOCK_CONTENTION", "FETCH_LARGE_DATA"), seed=8, server=server) as second:
      for env in (first, second):
        present = {label for label, e in env.evidence().items() if e["present"]}
        assert present == set(env.gold)
      text = db_tools.database_tools(first.agent)["pg_stat_statements"]({}).text
      assert (
        "SELECT * FROM" in text
        and f"SELECT * FROM {second.targets['FETCH_LARGE_DATA'].name} |" not in text
      )


def test_marble_tasks_run_in_the_environment(server):
  problem = agents.MARBLE_DB.load(MARBLE)[2]  # VACUUM and FETCH_LARGE_DATA, its own init_sql
  with Scenario.from_problem(problem, server=server) as env:
    assert env.problem() is problem and env.gold == ("FETCH_LARGE_DATA", "VACUUM")
    present = {label for label, e in env.evidence().items() if e["present"]}
    assert present == {"FETCH_LARGE_DATA", "VACUUM"}
    tables = db_tools.database_tools(env.agent)["sql"](
      {"query": "SELECT relname FROM pg_stat_user_tables"}
    ).text
    assert "widgets" in tables and "table1" in tables and "table2" in tables


def test_scenario_specs_cover_every_case_and_are_seeded():
  specs = db_scenarios.scenario_specs(20, seed=0)
  assert sorted(s.anomalies for s in specs[:15]) == sorted(CASES)  # all 15 before repeats
  assert specs == db_scenarios.scenario_specs(20, seed=0) != db_scenarios.scenario_specs(20, seed=1)
  env = specs[0].scenario()  # nothing starts before `with`
  problem = env.problem()
  assert problem.answer == ",".join(sorted(specs[0].anomalies)) and env.server is None
  assert problem.meta["num_predictions"] == 2 and all(a in problem.question for a in ANOMALIES)
  assert "naming the 2 most likely" in agents.MARBLE_DB.instruction(problem)
  with pytest.raises(ValueError, match="anomalies are one or more of"):
    Scenario("MISSING_INDEXES")


def test_redundant_index_rule():
  indexes = [
    ("t", "t_pkey", "1", True),
    ("t", "t_id_idx", "1", False),  # the primary key again
    ("t", "t_a_idx", "2", False),
    ("t", "t_a_b_idx", "2 3", False),  # makes t_a_idx redundant, not the other way round
    ("t", "t_expr_idx", "0", False),  # an expression index: not compared
    ("u", "u_a_idx", "2", False),  # another table
    ("u", "u_a_key", "2", True),  # unique on the same column: u_a_idx is redundant
  ]
  assert db_scenarios._redundant_indexes(indexes) == ["t_a_idx", "t_id_idx", "u_a_idx"]


# --- the agents' tools ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(server):
  """A scenario whose evidence includes held locks, shared by the tool tests."""
  with Scenario(("LOCK_CONTENTION", "REDUNDANT_INDEX"), seed=5, server=server) as env:
    yield env


def _state(env) -> dict:
  """What a write would change, read as the superuser."""
  with env.admin.connect() as conn:
    rows = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
    counts = {
      t.name: rows(f"SELECT count(*), sum(hashtext({t.name}::text)) FROM {t.name}")
      for t in env.tables
    }
    return {
      "rows": counts,
      "relations": rows(
        "SELECT relname, relkind FROM pg_class"
        " WHERE relnamespace = 'public'::regnamespace ORDER BY 1"
      ),
      "large_objects": rows("SELECT count(*) FROM pg_largeobject_metadata"),
      "statements": rows("SELECT count(*), sum(calls) FROM pg_stat_statements"),
      "analyzed": rows("SELECT relname, last_analyze FROM pg_stat_user_tables ORDER BY 1"),
      "roles": rows("SELECT rolname, rolsuper FROM pg_roles ORDER BY 1"),
      "evidence": env.evidence(),
    }


def test_agent_tools_cannot_write(locked, tmp_path):
  env, t = locked, locked.targets["LOCK_CONTENTION"].name
  tools = db_tools.database_tools(env.agent)
  before = _state(env)
  outside = tmp_path / "escaped"
  os.chmod(tmp_path, 0o777)
  writes = [
    f"INSERT INTO {t} (id) VALUES (999999)",
    f"UPDATE {t} SET id = id + 100000",
    f"DELETE FROM {t}",
    f"TRUNCATE {t}",
    f"DROP TABLE {t}",
    "CREATE TABLE escaped (a int)",
    "CREATE TEMP TABLE escaped (a int)",
    f"CREATE INDEX ON {t} (id)",
    f"ALTER TABLE {t} ADD COLUMN escaped int",
    f"VACUUM FULL {t}",
    f"WITH d AS (DELETE FROM {t} RETURNING 1) SELECT count(*) FROM d",
    f"DO $$ BEGIN INSERT INTO {t} (id) VALUES (999999); END $$",
    # Escapes from the read-only transaction.
    "SET TRANSACTION READ WRITE",
    "SET transaction_read_only = off",
    "SELECT set_config('transaction_read_only', 'off', false)",
    f"SET TRANSACTION READ WRITE; INSERT INTO {t} (id) VALUES (999999)",
    f"COMMIT; INSERT INTO {t} (id) VALUES (999999)",
    f"ROLLBACK; BEGIN READ WRITE; DELETE FROM {t}",
    "SET default_transaction_read_only = off; CREATE TABLE escaped (a int)",
    "SET pg_stat_statements.track = 'all'",
    # Erasing or disturbing the evidence, or reaching outside the database.
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
    "SELECT pg_stat_statements_reset()",
    "SELECT pg_stat_reset()",
    f"SELECT nextval('{t}_id_seq')",
    f"COPY (SELECT 1) TO '{outside}'",
    f"COPY {t} FROM PROGRAM 'touch {outside}'",
    "ALTER ROLE agent SUPERUSER",
    "GRANT app TO agent",
    "ALTER SYSTEM SET autovacuum = on",
    "SELECT pg_reload_conf()",
    "CHECKPOINT",
  ]
  for sql in writes:
    assert tools["sql"]({"query": sql}).error, sql
  for sql in writes[:12]:
    assert tools["explain"]({"sql": sql, "analyze": True}).error, sql
    assert tools["explain"]({"sql": f"SELECT 1; {sql}"}).error, sql
  # Accepted but without effect: rolled back, a session that ends with the call, a no-op.
  for sql in (
    "SELECT lo_create(0)",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "COMMIT",
    f"ANALYZE {t}",  # "only table or database owner can analyze it": skipped
    "SELECT pg_advisory_lock(1)",
  ):
    tools["sql"]({"query": sql})
    assert tools["sql"]({"query": f"INSERT INTO {t} (id) VALUES (999999)"}).error
  assert _state(env) == before
  assert not outside.exists()


def test_agent_statements_time_out(locked):
  slow = db_tools.database_tools(locked.agent, timeout_ms=300)
  start = time.monotonic()
  obs = slow["sql"]({"query": "SELECT pg_sleep(5)"})
  assert obs.error and "statement timeout" in obs.text and time.monotonic() - start < 3
  obs = slow["sql"]({"query": "SET statement_timeout = 0"})  # the next call is a new session
  assert slow["sql"]({"query": "SELECT pg_sleep(5)"}).error


def test_tool_outputs_are_bounded_tables(locked):
  tools = db_tools.database_tools(locked.agent)
  text = tools["sql"]({"query": "SELECT g FROM generate_series(1, 100) g"}).text
  assert text.splitlines()[:2] == ["g", "1"]
  assert text.endswith(f"(100 rows (first {db_tools.MAX_ROWS} shown))")
  text = tools["sql"]({"query": "SELECT 7 AS n, repeat('x', 500) AS long"}).text
  assert text.splitlines()[1] == "7 | " + "x" * (db_tools.MAX_CELL - 3) + "..."
  assert tools["sql"]({"query": "SHOW autovacuum"}).text == "autovacuum\noff\n(1 row)"
  obs = tools["pg_stat_statements"]({"order_by": "DROP TABLE x"})
  assert obs.error and "order_by is one of" in obs.text
  assert tools["sql"]({"query": "SELEC 1"}).error  # a syntax error is an observation
  plan = tools["explain"]({"sql": f"SELECT * FROM {locked.tables[1].name} WHERE id < 10"}).text
  assert "Index Scan" in plan or "Seq Scan" in plan


def test_expert_toolboxes_follow_marble_roles():
  from psynth_jax.agents.postgres import ConnInfo

  boxes = db_tools.expert_toolboxes(ConnInfo("127.0.0.1", 1, "agent", "x"))
  assert sorted(e.cause for e in db_tools.EXPERTS.values()) == sorted(ANOMALIES)
  assert set(boxes) == set(db_tools.EXPERTS)
  for name, box in boxes.items():
    assert box.names() == list(db_tools.EXPERTS[name].tools) and "sql" in box
    for schema in box.schemas():
      assert schema["type"] == "function" and schema["function"]["description"]
  every = {t for box in boxes.values() for t in box.names()}
  assert every == {
    "pg_stat_statements",
    "pg_stat_activity",
    "pg_locks",
    "pg_stat_user_tables",
    "pg_indexes",
    "explain",
    "sql",
  }


# --- MARBLE's scoring ----------------------------------------------------------------------------


def test_marble_scoring_on_hand_made_cases():
  task = agents.MARBLE_DB
  pair = Problem("p", "q", "LOCK_CONTENTION,VACUUM", {"num_predictions": 2})
  single = Problem("s", "q", "REDUNDANT_INDEX", {"num_predictions": 2})
  cases = [
    ("ROOT CAUSES: VACUUM, LOCK_CONTENTION", pair, 1.0),
    ("ROOT CAUSES: lock contention, vacuum", pair, 1.0),
    ("ROOT CAUSES: VACUUM, INSERT_LARGE_DATA", pair, 0.5),
    ("ROOT CAUSES: VACUUM, INSERT_LARGE_DATA, LOCK_CONTENTION", pair, 0.5),  # at most 2 count
    ("ROOT CAUSES: FETCH_LARGE_DATA", pair, 0.0),
    ("ROOT CAUSES: VACUUM, REDUNDANT_INDEX", single, 1.0),  # the gold one among the two
    ("ROOT CAUSES: VACUUM, LOCK_CONTENTION, REDUNDANT_INDEX", single, 0.0),
    ("no answer line, nothing named", single, 0.0),
  ]
  scores = [task.score(c, p) for c, p, _ in cases]
  assert scores == [s for _, _, s in cases] and all(isinstance(s, float) for s in scores)
  assert [task.correct(c, p) for c, p, _ in cases] == [s == 1.0 for s in scores]
  assert agents.marble_accuracy(scores) == 3 / 8  # correct: every gold cause named
  assert agents.marble_accuracy([]) == 0.0
