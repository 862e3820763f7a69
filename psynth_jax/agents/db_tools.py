"""Read-only database tools for the diagnosing expert agents, and which expert gets which.

  boxes = expert_toolboxes(env.agent)        # {expert: Toolbox}, env a db_scenarios.Scenario
  boxes["lock"].call("pg_locks", {"only_waiting": True}).text
  boxes["index"].call("explain", {"sql": "SELECT * FROM orders WHERE id = 7"}).text
  EXPERTS["lock"].profile                     # the expert's role, for its prompt

Tools (all `Tool`s, outputs bounded): `pg_stat_statements`, `pg_stat_activity`, `pg_locks`,
`pg_stat_user_tables`, `pg_indexes` (fixed queries over the catalog views, with a few
arguments), `explain` (EXPLAIN [ANALYZE] of one statement) and `sql` (one statement of the
agent's own, as MARBLE's agents write theirs).

Every call, fixed or the agent's own, runs the same way (`run_readonly`), so an agent
cannot write, whatever it sends:
  * a fresh connection as the `agent` role: no superuser, owns nothing, may only read
    (see `psynth_jax.agents.postgres`); no session state survives from one call to the next;
  * a READ ONLY transaction whose snapshot is taken first (the statement that sets the
    timeouts), so `SET TRANSACTION READ WRITE` / `SET transaction_read_only = off` are
    refused ("must be set before any query");
  * `statement_timeout` and `lock_timeout` set for that transaction;
  * the agent's text sent as one prepared statement (extended protocol), so a second
    command after a `;` is refused by the server, not by a parser of ours;
  * rolled back at the end.
What comes back is a small text table: at most `MAX_ROWS` rows, each value cut to
`MAX_CELL` characters, and a line saying how many rows there were.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from collections.abc import Mapping, Sequence

from psynth_jax.agents.postgres import ConnInfo
from psynth_jax.agents.tools import Tool, Toolbox

TIMEOUT_MS = 3000  # per statement an agent sends
LOCK_TIMEOUT_MS = 1000
MAX_ROWS = 20
MAX_CELL = 160
MAX_CHARS = 3000

# The statements the application ran in this database, not the server's other databases.
_THIS_DB = "dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
_ORDERS = ("total_exec_time", "mean_exec_time", "calls", "rows")


def run_readonly(
  conn: ConnInfo, sql: str, params: Sequence | None = None, timeout_ms: int = TIMEOUT_MS
) -> tuple[list[str], list[tuple], int, str]:
  """Runs one statement read-only (see the module docstring).

  Returns:
    (column names, the first MAX_ROWS rows, the row count, the command status).
  """
  with conn.connect(autocommit=False) as c:
    c.read_only = True  # psycopg begins the transaction with BEGIN READ ONLY
    try:
      with c.cursor() as cur:
        cur.execute(
          "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
          (f"{timeout_ms}ms", f"{LOCK_TIMEOUT_MS}ms"),
        )
        cur.execute(sql, params, prepare=True)
        columns = [d.name for d in cur.description or ()]
        rows = cur.fetchmany(MAX_ROWS) if cur.description else []
        return columns, rows, max(cur.rowcount, len(rows)), cur.statusmessage or ""
    finally:
      c.rollback()


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float | decimal.Decimal):
    return f"{float(value):.6g}"
  if isinstance(value, datetime.datetime):
    return value.isoformat(sep=" ", timespec="seconds")
  text = " ".join(str(value).split())  # query texts: one line
  return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def render(columns: Sequence[str], rows: Sequence[tuple], count: int, status: str) -> str:
  """A text table: header, rows, and the row count (or the command status)."""
  if not columns:
    return f"OK: {status}"
  lines = [" | ".join(columns)]
  lines += [" | ".join(_cell(v) for v in row) for row in rows]
  shown = f" (first {len(rows)} shown)" if count > len(rows) else ""
  lines.append(f"({count} row{'s' * (count != 1)}{shown})")
  return "\n".join(lines)


def _query(conn: ConnInfo, timeout_ms: int):
  def run(sql: str, params: Sequence | None = None) -> str:
    return render(*run_readonly(conn, sql, params, timeout_ms))

  return run


def database_tools(conn: ConnInfo, timeout_ms: int = TIMEOUT_MS) -> dict[str, Tool]:
  """Every tool, each bound to `conn` (the agent role's ConnInfo), by name."""
  run = _query(conn, timeout_ms)

  def pg_stat_statements(order_by: str = "total_exec_time", contains: str = "", limit: int = 10):
    if order_by not in _ORDERS:
      raise ValueError(f"order_by is one of {list(_ORDERS)}, got {order_by!r}")
    return run(
      "SELECT query, calls, round(total_exec_time::numeric, 2) AS total_ms,"
      " round(mean_exec_time::numeric, 2) AS mean_ms, rows,"
      " round(rows::numeric / greatest(calls, 1), 1) AS rows_per_call"
      f" FROM pg_stat_statements WHERE {_THIS_DB} AND query ILIKE %s"
      f" ORDER BY {order_by} DESC LIMIT %s",
      (f"%{contains}%", max(1, min(limit, MAX_ROWS))),
    )

  def pg_stat_activity():
    return run(
      "SELECT pid, usename, application_name, state, wait_event_type, wait_event,"
      " pg_blocking_pids(pid) AS blocked_by,"
      " round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_seconds,"
      " round(extract(epoch FROM now() - query_start)::numeric, 1) AS query_seconds, query"
      " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
      " ORDER BY xact_start NULLS LAST"
    )

  def pg_locks(only_waiting: bool = False):
    return run(
      "SELECT l.pid, l.locktype, c.relname AS relation, l.mode, l.granted,"
      " pg_blocking_pids(l.pid) AS blocked_by,"
      " round(extract(epoch FROM now() - l.waitstart)::numeric, 1) AS waiting_seconds,"
      " a.query FROM pg_locks l"
      " LEFT JOIN pg_class c ON c.oid = l.relation"
      " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
      " WHERE l.pid <> pg_backend_pid() AND a.datname = current_database()"
      " AND (NOT %s OR NOT l.granted) AND l.locktype <> 'virtualxid'"
      " ORDER BY l.granted, l.pid",
      (only_waiting,),
    )

  def pg_stat_user_tables(table: str = ""):
    return run(
      "SELECT relname, n_live_tup, n_dead_tup,"
      " round(n_dead_tup::numeric / greatest(n_live_tup + n_dead_tup, 1), 3) AS dead_ratio,"
      " n_tup_ins, n_tup_upd, n_tup_del, seq_scan, seq_tup_read, idx_scan,"
      " pg_size_pretty(pg_total_relation_size(relid)) AS total_size,"
      " last_vacuum, last_autovacuum, last_analyze, vacuum_count, autovacuum_count"
      " FROM pg_stat_user_tables WHERE %s = '' OR relname = %s ORDER BY relname",
      (table, table),
    )

  def pg_indexes(table: str = ""):
    return run(
      "SELECT i.tablename, i.indexname, i.indexdef, s.idx_scan, s.idx_tup_read,"
      " pg_size_pretty(pg_relation_size(s.indexrelid)) AS size"
      " FROM pg_indexes i JOIN pg_stat_user_indexes s"
      " ON s.schemaname = i.schemaname AND s.indexrelname = i.indexname"
      " WHERE %s = '' OR i.tablename = %s ORDER BY i.tablename, i.indexname",
      (table, table),
    )

  def explain(sql: str, analyze: bool = False):
    options = "ANALYZE, BUFFERS" if analyze else "COSTS"
    return run(f"EXPLAIN ({options}) {sql}")

  def sql(query: str):
    return run(query)

  table_arg = {"table": "a table name; empty for every table"}
  return {
    t.name: t
    for t in (
      Tool(
        "pg_stat_statements",
        "Statements the application ran (from pg_stat_statements): calls, total and mean"
        " execution time in ms, rows returned or affected.",
        {"order_by": str, "contains": str, "limit": int},
        pg_stat_statements,
        required=(),
        descriptions={
          "order_by": f"one of {', '.join(_ORDERS)} (default total_exec_time)",
          "contains": "keep statements whose text contains this, e.g. INSERT",
          "limit": f"how many (at most {MAX_ROWS})",
        },
        max_chars=MAX_CHARS,
      ),
      Tool(
        "pg_stat_activity",
        "The other sessions on this database: state, what each waits for, who blocks it,"
        " transaction age, current query.",
        {},
        pg_stat_activity,
        max_chars=MAX_CHARS,
      ),
      Tool(
        "pg_locks",
        "Locks held and awaited (pg_locks), with the blocking sessions and the waiting time.",
        {"only_waiting": bool},
        pg_locks,
        required=(),
        descriptions={"only_waiting": "show only locks not yet granted"},
        max_chars=MAX_CHARS,
      ),
      Tool(
        "pg_stat_user_tables",
        "Per table: live and dead rows, inserts / updates / deletes, sequential and index"
        " scans, size, and when it was last vacuumed and analyzed.",
        {"table": str},
        pg_stat_user_tables,
        required=(),
        descriptions=table_arg,
        max_chars=MAX_CHARS,
      ),
      Tool(
        "pg_indexes",
        "Index definitions with how often each index was scanned and its size.",
        {"table": str},
        pg_indexes,
        required=(),
        descriptions=table_arg,
        max_chars=MAX_CHARS,
      ),
      Tool(
        "explain",
        "The query plan of one SQL statement; with analyze, run it (read-only) and show"
        " actual times and rows.",
        {"sql": str, "analyze": bool},
        explain,
        required=("sql",),
        descriptions={"sql": "one statement, without EXPLAIN", "analyze": "execute it too"},
        max_chars=MAX_CHARS,
      ),
      Tool(
        "sql",
        "Run one read-only SQL statement of your own (e.g. a SELECT on a catalog view) and"
        " see up to 20 rows.",
        {"query": str},
        sql,
        descriptions={"query": "one SQL statement"},
        max_chars=MAX_CHARS,
      ),
    )
  }


@dataclasses.dataclass(frozen=True)
class Expert:
  """One worker agent's role: the root cause it examines, its brief and its tools."""

  cause: str
  profile: str
  tools: tuple[str, ...]


# MARBLE's database agents: one per candidate root cause, each told which views to read
# (the `profile`s of multiagentbench/database/database_main.jsonl, in our words and tools).
EXPERTS: Mapping[str, Expert] = {
  "workload": Expert(
    "INSERT_LARGE_DATA",
    "You explore whether INSERT_LARGE_DATA is a root cause: look for INSERTs that write"
    " many rows or take long (pg_stat_statements) and tables that grew fast"
    " (pg_stat_user_tables).",
    ("pg_stat_statements", "pg_stat_user_tables", "sql"),
  ),
  "lock": Expert(
    "LOCK_CONTENTION",
    "You explore whether LOCK_CONTENTION is a root cause: look for sessions waiting on"
    " locks and the sessions that block them (pg_locks, pg_stat_activity).",
    ("pg_locks", "pg_stat_activity", "sql"),
  ),
  "vacuum": Expert(
    "VACUUM",
    "You explore whether VACUUM is a root cause: look for tables with many dead rows that"
    " were never vacuumed, and for large DELETEs or VACUUM runs (pg_stat_user_tables,"
    " pg_stat_statements).",
    ("pg_stat_user_tables", "pg_stat_statements", "sql"),
  ),
  "index": Expert(
    "REDUNDANT_INDEX",
    "You explore whether REDUNDANT_INDEX is a root cause: look for indexes that duplicate"
    " or prefix others and are never scanned (pg_indexes), and how queries use them"
    " (explain).",
    ("pg_indexes", "pg_stat_user_tables", "explain", "sql"),
  ),
  "query": Expert(
    "FETCH_LARGE_DATA",
    "You explore whether FETCH_LARGE_DATA is a root cause: look for SELECTs that return"
    " many rows per call or scan whole tables (pg_stat_statements, explain).",
    ("pg_stat_statements", "explain", "sql"),
  ),
}


def expert_toolboxes(
  conn: ConnInfo, experts: Mapping[str, Expert] = EXPERTS, timeout_ms: int = TIMEOUT_MS
) -> dict[str, Toolbox]:
  """Each expert's Toolbox, its tools bound to `conn` (the agent role's ConnInfo)."""
  tools = database_tools(conn, timeout_ms)
  return {name: Toolbox(tools[t] for t in expert.tools) for name, expert in experts.items()}
