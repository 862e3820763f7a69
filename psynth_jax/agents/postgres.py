"""A disposable PostgreSQL server: its own temp dir, a free port, stopped and removed on exit.

  with PostgresServer() as server:          # initdb + start: a few seconds
    info = server.create_database("shop")   # -> {"admin": ConnInfo, "app": ..., "agent": ...}
    with info["admin"].connect() as conn: ...
  # stopped, its directory removed, also when the block raised

Everything the server writes is inside one `tempfile.mkdtemp` directory (data dir, Unix
socket, log); nothing else on the machine is touched, and no Debian cluster is used.
`initdb` refuses to run as root, so as root the server runs as the unprivileged `postgres`
user (the Debian package creates it) through `setpriv`; the directory is handed to that
user first. Otherwise it runs as the caller.

Roles (passwords are random per server; `scram-sha-256` on 127.0.0.1 only):
  postgres  the superuser: setup and checks. Its connections here do not record into
            `pg_stat_statements` (`ADMIN_OPTIONS`), so only the workloads' statements do.
  app       the application: owns the scenario tables and runs the workloads.
  agent     what diagnosing agents connect as: no superuser, no ownership, only the
            built-in `pg_read_all_data` (SELECT) and `pg_read_all_stats` (every session's
            query text). Its sessions default to read-only with a statement timeout, and
            record neither statements nor table counters, so agents observe without
            changing the evidence (`psynth_jax.agents.db_tools` adds a read-only
            transaction per call on top of this).

Cleanup on every exit path: `stop()` runs from the context manager's exit (any exception),
from `atexit`, and on SIGTERM while a server is up: a handler (set from the main thread)
stops every live server, then does what SIGTERM did before it (by default: terminate the
process, as if no handler were there). If the Python process is killed outright, the
kernel sends the postmaster SIGQUIT (immediate shutdown; `setpriv --pdeathsig`); only the
temp dir is then left behind. That signal follows the *thread* that started the server:
start it from a thread that outlives the server.

Settings are for a small disposable server: no fsync, no JIT, and autovacuum off, so that
neither removes anomaly evidence (dead tuples) nor loads the CPU while an agent's time to
first token is measured.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping

BIN_ROOT = "/usr/lib/postgresql"
MIN_VERSION = 15  # pg_stat_force_next_flush(); Debian 12 ships 15
RUN_AS = "postgres"  # the unprivileged user that runs the server when we are root
ADMIN_USER, APP_USER, AGENT_USER = "postgres", "app", "agent"
# libpq `options` for the superuser's own sessions: setup and checks stay out of the
# statement history the agents read.
ADMIN_OPTIONS = "-c pg_stat_statements.track=none"
AGENT_STATEMENT_TIMEOUT = "5s"  # the role default; db_tools sets a tighter one per call

SETTINGS = {
  "listen_addresses": "'127.0.0.1'",
  "shared_preload_libraries": "'pg_stat_statements'",
  "pg_stat_statements.track": "'top'",
  "pg_stat_statements.max": "5000",  # room for many scenario databases at once
  "track_io_timing": "on",
  "autovacuum": "off",  # see the module docstring
  "jit": "off",
  "fsync": "off",
  "synchronous_commit": "off",
  "full_page_writes": "off",
  "max_connections": "40",
  "shared_buffers": "64MB",
  "log_lock_waits": "on",
  "deadlock_timeout": "200ms",
}


class PostgresUnavailable(RuntimeError):
  """No usable PostgreSQL installation here."""


INSTALL_HINT = (
  "install PostgreSQL's server (Debian: `apt-get install -y postgresql`; it provides"
  f" {BIN_ROOT}/<major>/bin and the `postgres` user) and `pip install 'psycopg[binary]'`"
)


@dataclasses.dataclass(frozen=True)
class ConnInfo:
  """How to reach one database as one role."""

  host: str
  port: int
  user: str
  password: str = dataclasses.field(repr=False)
  dbname: str = "postgres"
  options: str = ""  # libpq `options` (-c setting=value ...)

  def kwargs(self) -> dict:
    kw = dict(host=self.host, port=self.port, user=self.user, password=self.password)
    return kw | {"dbname": self.dbname} | ({"options": self.options} if self.options else {})

  def connect(self, **kwargs):
    import psycopg  # the `bench` extra

    return psycopg.connect(**self.kwargs(), connect_timeout=10, **kwargs)

  def environ(self) -> dict[str, str]:
    """libpq environment variables for command-line clients (pgbench, psql)."""
    env = dict(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user)
    env |= dict(PGPASSWORD=self.password, PGDATABASE=self.dbname)
    return env | ({"PGOPTIONS": self.options} if self.options else {})


def find_bindir(bindir: str | None = None) -> str:
  """`bindir`, else $PSYNTH_PG_BINDIR, else the newest /usr/lib/postgresql/<major>/bin."""
  bindir = bindir or os.environ.get("PSYNTH_PG_BINDIR")
  candidates = [bindir] if bindir else glob.glob(os.path.join(BIN_ROOT, "*", "bin"))
  found = [d for d in candidates if os.access(os.path.join(d, "initdb"), os.X_OK)]
  if not found:
    where = candidates or [BIN_ROOT]
    raise PostgresUnavailable(f"no PostgreSQL server binaries in {where}: {INSTALL_HINT}")
  best = max(found, key=major_version)
  if 0 < major_version(best) < MIN_VERSION:
    raise PostgresUnavailable(
      f"PostgreSQL {major_version(best)} in {best} is older than {MIN_VERSION}"
    )
  return best


def major_version(bindir: str) -> int:
  """The major version a Debian-style bin dir is for (/usr/lib/postgresql/15/bin -> 15), or 0."""
  name = os.path.basename(os.path.dirname(os.path.abspath(bindir)))
  return int(name) if name.isdigit() else 0


def available() -> str | None:
  """Why a server cannot start here, or None when it can."""
  try:
    find_bindir()
    import psycopg  # noqa: F401
  except (PostgresUnavailable, ImportError) as e:
    return f"{e}" if isinstance(e, PostgresUnavailable) else f"no psycopg: {INSTALL_HINT}"
  if os.geteuid() == 0:
    try:
      pwd.getpwnam(RUN_AS)
    except KeyError:
      return f"running as root needs the unprivileged user {RUN_AS!r}: {INSTALL_HINT}"
    if shutil.which("setpriv") is None:
      return "running as root needs `setpriv` (util-linux) to drop to the postgres user"
  return None


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _reachable_by_others(path: str) -> bool:
  """Whether every directory above `path` can be traversed by any user."""
  path = os.path.abspath(path)
  while True:
    if not os.stat(path).st_mode & 0o001:
      return False
    if path == os.path.dirname(path):
      return True
    path = os.path.dirname(path)


# Servers started and not yet stopped, for the SIGTERM handler.
_LIVE: set[PostgresServer] = set()
_PREVIOUS_SIGTERM = None  # the handler ours replaced, while ours is installed


def _on_sigterm(signum, frame) -> None:
  """Stops every live server, then does what SIGTERM did before (by default: terminate)."""
  for server in list(_LIVE):
    server.stop()
  previous = _PREVIOUS_SIGTERM
  _restore_sigterm()
  if callable(previous):
    previous(signum, frame)
  elif previous in (signal.SIG_DFL, None):
    os.kill(os.getpid(), signum)


def _install_sigterm() -> None:
  global _PREVIOUS_SIGTERM
  if threading.current_thread() is not threading.main_thread():
    return  # signal handlers are set from the main thread only; atexit and pdeathsig remain
  if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
    _PREVIOUS_SIGTERM = signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_sigterm() -> None:
  if threading.current_thread() is not threading.main_thread():
    return
  if signal.getsignal(signal.SIGTERM) is _on_sigterm:
    signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM or signal.SIG_DFL)


class PostgresServer:
  """One PostgreSQL server in a temp dir; see the module docstring.

  Args:
    bindir: the server's binaries (default: `find_bindir()`).
    base_dir: where the temp dir goes (default: the system's; when running as root and the
      postgres user cannot reach it, /tmp).
    settings: postgresql.conf settings on top of `SETTINGS` (values as written in the file).
    start_timeout: seconds to wait for the server to accept connections.
  """

  def __init__(
    self, bindir=None, base_dir=None, settings: Mapping[str, str] = (), start_timeout=60
  ):
    self.bindir = find_bindir(bindir)
    self.version = major_version(self.bindir)
    self.base_dir = base_dir
    self.settings = {**SETTINGS, **dict(settings)}
    self.start_timeout = start_timeout
    self.root: str | None = None  # the temp dir
    self.port: int | None = None
    self.process: subprocess.Popen | None = None
    self._passwords = {u: secrets.token_hex(16) for u in (ADMIN_USER, APP_USER, AGENT_USER)}
    self._lock = threading.RLock()  # stop() may re-enter from a signal

  # --- paths and roles --------------------------------------------------------------------

  @property
  def datadir(self) -> str:
    return os.path.join(self.root, "data")

  @property
  def log_path(self) -> str:
    return os.path.join(self.root, "server.log")

  @property
  def pid(self) -> int | None:
    return self.process.pid if self.process else None

  def conn(self, user: str = ADMIN_USER, dbname: str = "postgres") -> ConnInfo:
    options = ADMIN_OPTIONS if user == ADMIN_USER else ""
    return ConnInfo("127.0.0.1", self.port, user, self._passwords[user], dbname, options)

  def log_tail(self, chars: int = 3000) -> str:
    try:
      with open(self.log_path, errors="replace") as f:
        return f.read()[-chars:]
    except OSError:
      return ""

  # --- lifecycle ---------------------------------------------------------------------------

  def __enter__(self) -> PostgresServer:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self) -> None:
    if why := available():
      raise PostgresUnavailable(why)
    if self.root is not None:
      raise RuntimeError("this server is already started")
    atexit.register(self.stop)
    _LIVE.add(self)
    _install_sigterm()
    try:
      self._make_root()
      self._initdb()
      for attempt in range(3):  # the free port can be taken between choosing and binding
        self.port = free_port()
        self._write_conf()
        if self._launch():
          break
        if attempt == 2 or "could not bind" not in self.log_tail():
          raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")
      self._make_roles()
    except BaseException:
      self.stop()
      raise

  def stop(self) -> None:
    """Stops the server (fast shutdown, then immediate, then SIGKILL) and removes its dir.
    Safe to call more than once, and from any state."""
    with self._lock:
      # Fields are cleared only once done, so a stop interrupted by a signal is redone.
      if self.process is not None and self.process.poll() is None:
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
          self.process.send_signal(sig)
          try:
            self.process.wait(wait)
            break
          except subprocess.TimeoutExpired:
            continue
      self.process = None
      if self.root is not None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
      atexit.unregister(self.stop)
      _LIVE.discard(self)
      if not _LIVE:
        _restore_sigterm()

  # --- steps -------------------------------------------------------------------------------

  def _as_server_user(self) -> list[str]:
    """Command prefix that runs a server binary as its user, dying with this thread."""
    prefix = ["setpriv", "--pdeathsig", "QUIT"] if shutil.which("setpriv") else []
    if os.geteuid() == 0:
      prefix += ["--reuid", RUN_AS, "--regid", RUN_AS, "--init-groups"]
    return prefix

  def _server_env(self) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": self.root}

  def _make_root(self) -> None:
    base = self.base_dir or tempfile.gettempdir()
    if os.geteuid() == 0 and self.base_dir is None and not _reachable_by_others(base):
      base = "/tmp"
    self.root = tempfile.mkdtemp(prefix="psynth-pg-", dir=base)
    if os.geteuid() == 0:
      user = pwd.getpwnam(RUN_AS)
      os.chown(self.root, user.pw_uid, user.pw_gid)
      if not _reachable_by_others(os.path.dirname(self.root)):
        raise PostgresUnavailable(f"the {RUN_AS} user cannot reach {self.root}: pass base_dir=")

  def _chown(self, path: str) -> None:
    if os.geteuid() == 0:
      user = pwd.getpwnam(RUN_AS)
      os.chown(path, user.pw_uid, user.pw_gid)

  def _initdb(self) -> None:
    pwfile = os.path.join(self.root, "pwfile")
    with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
      f.write(self._passwords[ADMIN_USER] + "\n")
    self._chown(pwfile)
    cmd = [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", ADMIN_USER]
    cmd += ["--pwfile", pwfile, "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C"]
    cmd += ["--no-sync", "--no-instructions"]
    result = subprocess.run(
      self._as_server_user() + cmd,
      cwd=self.root,
      env=self._server_env(),
      capture_output=True,
      text=True,
      timeout=120,
    )
    os.unlink(pwfile)
    if result.returncode != 0:
      raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

  def _write_conf(self) -> None:
    lines = dict(self.settings, port=str(self.port), unix_socket_directories=f"'{self.root}'")
    with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
      f.write("\n# psynth_jax.agents.postgres (a later line wins)\n")
      f.writelines(f"{k} = {v}\n" for k, v in lines.items())

  def _launch(self) -> bool:
    """Starts the postmaster as our child; True once it accepts connections."""
    import psycopg

    with open(self.log_path, "ab") as log:
      self.process = subprocess.Popen(
        [*self._as_server_user(), os.path.join(self.bindir, "postgres"), "-D", self.datadir],
        cwd=self.root,
        env=self._server_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    deadline = time.monotonic() + self.start_timeout
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        self.process = None
        return False
      try:
        self.conn().connect().close()
        return True
      except psycopg.OperationalError:
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not accept connections in {self.start_timeout}s")

  def _make_roles(self) -> None:
    p = self._passwords
    with self.conn().connect(autocommit=True) as conn:
      conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{p[APP_USER]}'")
      conn.execute(
        f"CREATE ROLE {AGENT_USER} LOGIN PASSWORD '{p[AGENT_USER]}' CONNECTION LIMIT 16"
        " IN ROLE pg_read_all_data, pg_read_all_stats"
      )
      for setting, value in (
        ("default_transaction_read_only", "on"),
        ("statement_timeout", AGENT_STATEMENT_TIMEOUT),
        ("lock_timeout", "1s"),
        ("idle_in_transaction_session_timeout", "10s"),
        ("pg_stat_statements.track", "none"),  # agents observe, they leave no history
        ("track_counts", "off"),  # nor table scan counters
      ):
        conn.execute(f"ALTER ROLE {AGENT_USER} SET {setting} = '{value}'")

  def create_database(self, name: str) -> dict[str, ConnInfo]:
    """A fresh database owned by `app`, with pg_stat_statements, that only app and agent
    (and the superuser) may connect to. Returns its ConnInfo per role: "admin", "app",
    "agent"."""
    if not name.isidentifier() or name != name.lower():
      raise ValueError(f"database names here are lowercase identifiers, got {name!r}")
    with self.conn().connect(autocommit=True) as conn:
      conn.execute(f"CREATE DATABASE {name} OWNER {APP_USER}")
      conn.execute(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")  # CONNECT and TEMP
      conn.execute(f"GRANT CONNECT ON DATABASE {name} TO {APP_USER}, {AGENT_USER}")
    with self.conn(dbname=name).connect(autocommit=True) as conn:
      conn.execute("CREATE EXTENSION pg_stat_statements")
      conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    roles = {"admin": ADMIN_USER, "app": APP_USER, "agent": AGENT_USER}
    return {role: self.conn(user, name) for role, user in roles.items()}

  def drop_database(self, name: str) -> None:
    """Drops it, ending any session still connected to it."""
    if self.process is None:
      return
    with self.conn().connect(autocommit=True) as conn:
      conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
