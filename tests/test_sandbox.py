"""The sandbox that runs model-written code: results, limits and isolation.

The isolation tests need bubblewrap. Elsewhere they skip when it is missing;
under CI (CI=true, which installs it in `.ci/run`) a missing or unusable
bubblewrap fails them, so that CI never passes without having checked it.
"""

import glob
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from psynth_jax.eval import sandbox


@pytest.fixture
def isolated():
  """The sandbox's `Isolation`, when programs really run isolated (see the module docstring)."""
  iso = sandbox.isolation()
  if not iso.sandboxed:
    message = f"programs run without bubblewrap isolation: {iso.reason}"
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)
  return iso


def run(source: str, timeout_s: float = 10.0, **limits) -> sandbox.ExecutionResult:
  return sandbox.execute(textwrap.dedent(source), timeout_s, **limits)


def sandbox_processes() -> list[str]:
  """Live processes of any sandbox uid."""
  uids = range(sandbox.UID_BASE, sandbox.UID_BASE + sandbox.UID_SPAN)
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if os.stat(f"/proc/{pid}").st_uid in uids and sandbox._alive(pid):
        pids.append(pid)
    except OSError:
      pass
  return pids


# --- results, whatever the isolation ----------------------------------------------


def test_pass_fail_and_output_captured():
  ok = run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
  assert (ok.status, ok.stdout, ok.stderr) == ("passed", "out\n", "err\n")
  wrong = run("assert 1 + 1 == 3, 'arithmetic'")
  assert wrong.status == "failed" and "AssertionError: arithmetic" in wrong.stderr
  assert run("import sys; sys.exit(2)").status == "failed"


def test_infinite_loop_times_out():
  t0 = time.monotonic()
  result = run("print('started', flush=True)\nwhile True:\n  pass", timeout_s=1.0)
  assert result.status == "timeout" and result.stdout == "started\n"
  assert time.monotonic() - t0 < 5


def test_cpu_limit_is_a_timeout():
  t0 = time.monotonic()
  assert run("while True:\n  pass", timeout_s=20.0, cpu_time_s=1).status == "timeout"
  assert time.monotonic() - t0 < 10  # the CPU limit, not the wall clock, stopped it


def test_fallback_is_guarded_and_says_so(monkeypatch):
  """Without bwrap: rlimits and the reliability guard, `sandboxed=False`, one loud warning."""
  monkeypatch.setattr(
    sandbox, "_isolation", sandbox.Isolation(False, sys.executable, reason="test")
  )
  monkeypatch.setattr(sandbox, "_warned", False)
  with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
    ok = run("print(sum(range(10)))")
  assert (ok.status, ok.stdout, ok.sandboxed) == ("passed", "45\n", False)
  guarded = run("import os\nos.system('true')")
  assert guarded.status == "failed" and "NoneType" in guarded.stderr
  assert run("import subprocess\nsubprocess.run(['true'])").status == "failed"
  assert run("while True:\n  pass", timeout_s=1.0).status == "timeout"
  bomb = run("x = bytearray(64 << 30)", memory_bytes=512 << 20)
  assert bomb.status == "failed" and "MemoryError" in bomb.stderr


# --- isolation ---------------------------------------------------------------------


def test_sandboxed_results_say_so(isolated):
  result = run("import os\nprint(os.getuid(), os.getcwd(), sorted(os.environ))")
  uid, cwd, env = result.stdout.split(" ", 2)
  assert result.sandboxed and cwd == sandbox.WORKDIR
  assert env.strip() == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"  # nothing of ours leaks in
  if isolated.switch_user:
    assert int(uid) >= sandbox.UID_BASE


def test_interpreter_must_be_runnable_by_the_sandbox_user(isolated, tmp_path):
  """A Python the sandbox user cannot reach (here behind a 0700 directory, like a venv in
  root's home) is refused by the probe, and the chosen one does run."""
  if not isolated.switch_user:
    pytest.skip("only root switches to a separate sandbox user")
  hidden = tempfile.mkdtemp(prefix="psynth-hidden-")  # 0700, owned by root
  try:
    os.symlink(isolated.interpreter, os.path.join(hidden, "python3"))
    hidden_python = os.path.join(hidden, "python3")
    assert sandbox._try_interpreter(hidden_python, True, isolated.bwrap_options) is not None
  finally:
    os.unlink(os.path.join(hidden, "python3"))
    os.rmdir(hidden)
  assert sandbox._try_interpreter(isolated.interpreter, True, isolated.bwrap_options) is None


def test_fork_bomb_is_stopped_and_the_host_is_not(isolated):
  bomb = """
    import os, time
    forked = blocked = 0
    for _ in range(3000):
      try:
        pid = os.fork()
      except OSError:
        blocked += 1
        continue
      if pid == 0:  # the child holds its slot until the sandbox is torn down
        time.sleep(60)
        os._exit(0)
      forked += 1
    print(forked, blocked)
  """
  result = run(bomb, timeout_s=10.0)
  assert result.status == "passed", result.stderr
  forked, blocked = map(int, result.stdout.split())
  assert forked < sandbox.MAX_PROCESSES and blocked > 2900
  assert subprocess.run(["true"]).returncode == 0  # the host can still fork
  if isolated.switch_user:
    assert sandbox_processes() == []  # and no sleeper outlived its sandbox


def test_memory_bomb_hits_the_address_space_limit(isolated):
  at_once = run("x = bytearray(64 << 30)", memory_bytes=512 << 20)
  assert at_once.status == "failed" and "MemoryError" in at_once.stderr
  growing = run(
    "chunks = []\nwhile True:\n  chunks.append(bytearray(32 << 20))", memory_bytes=512 << 20
  )
  assert growing.status == "failed" and "MemoryError" in growing.stderr


def test_writes_only_inside_its_own_directory(isolated):
  name = f"psynth-sandbox-test-{uuid.uuid4().hex}"
  outside = [
    os.path.join("/tmp", name),
    os.path.join(os.getcwd(), name),
    os.path.expanduser(f"~/{name}"),
  ]
  program = f"""
    import os
    with open("inside.txt", "w") as f:
      f.write("ok")
    print(open(os.path.join(os.getcwd(), "inside.txt")).read())
    for path in {outside!r}:
      try:
        open(path, "w").close()
        print("WROTE", path)
      except OSError as e:
        print(type(e).__name__)
  """
  result = run(program)
  assert result.status == "passed", result.stderr
  assert result.stdout.split("\n")[0] == "ok" and "WROTE" not in result.stdout
  assert not any(os.path.exists(p) for p in outside)
  big = run("open('big', 'wb').write(b'x' * (2 << 20))", max_file_bytes=1 << 20)
  assert big.status == "failed"  # SIGXFSZ


def test_no_network_not_even_loopback(isolated):
  # The program first checks that it sees no interface but a down loopback, so that
  # nothing can leave this machine even if the sandbox were somehow not in force.
  program = """
    import socket, sys
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
      sys.exit("not in an empty network namespace: not connecting")
    for host in ("127.0.0.1", "1.1.1.1"):
      s = socket.socket()
      s.settimeout(2)
      try:
        s.connect((host, 80))
        sys.exit(f"connected to {host}")
      except OSError as e:
        print(host, type(e).__name__)
  """
  result = run(program)
  assert result.status == "passed", result.stdout + result.stderr
  assert [line.split()[0] for line in result.stdout.splitlines()] == ["127.0.0.1", "1.1.1.1"]


def test_directory_is_fresh_private_and_removed(isolated):
  """Concurrent runs each see only their own directory, and it is gone when they return."""
  marker = f"marker-{uuid.uuid4().hex}"
  pattern = os.path.join(tempfile.gettempdir(), "psynth-sandbox-*", marker)
  program = f"""
    import os, time
    assert os.listdir(".") == ["main.py"], os.listdir(".")
    open({marker!r}, "w").close()
    time.sleep(1.0)
    print(sorted(os.listdir(".")))
  """
  results = []
  threads = [threading.Thread(target=lambda: results.append(run(program))) for _ in range(3)]
  for t in threads:
    t.start()
  deadline = time.monotonic() + 5
  while len(glob.glob(pattern)) < 3 and time.monotonic() < deadline:
    time.sleep(0.02)
  assert len(glob.glob(pattern)) == 3  # three directories at once, on the host
  for t in threads:
    t.join()
  assert [r.status for r in results] == ["passed"] * 3, [r.stderr for r in results]
  assert {r.stdout for r in results} == {f"['main.py', '{marker}']\n"}
  assert glob.glob(pattern) == []


def test_no_new_user_namespaces(isolated):
  if "--disable-userns" not in isolated.bwrap_options:
    pytest.skip("this bwrap (< 0.8) has no --disable-userns")
  program = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
  """
  result = run(program)
  assert result.status == "passed" and result.stdout.split()[0] == "-1", result
