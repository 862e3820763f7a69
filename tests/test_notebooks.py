"""The Colab notebooks: their shape (badge, install cell, parameters, no outputs) and a CPU run.

Every `colab/*.ipynb` is picked up. Each one is executed top to bottom with
nbclient in a fresh kernel (2 emulated CPU devices, so the mesh and the
sharded weights are exercised) in a temporary working directory; the
papermill convention shrinks it: a cell tagged `injected-parameters` holding
`CI_PARAMETERS[name]` is inserted right after the cell tagged `parameters`
(a notebook without an entry runs with its own defaults). Any failing cell
fails the test. The kernels share one JAX compilation cache for the session,
so programs that several notebooks compile (e.g. initialising the same tiny
model) compile once.

A notebook that imports a `psynth_jax` module (or a name from one) that does
not exist fails at once, naming it: after a move, the notebooks must follow.
Anything else that goes wrong is a failure too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
ORG_REPO = "psynth-jax/psynth_jax"
INSTALL = f"git+https://github.com/{ORG_REPO}"
CELL_TIMEOUT_S = 300
KERNEL_DEVICES = 2

# CI sizes, per notebook (file stem). Every name must be set in the notebook's parameters cell.
CI_PARAMETERS: dict[str, dict[str, object]] = {
  "00_quickstart": dict(NUM_EXAMPLES=3, TTFT_EXAMPLES=1, LENGTHS=(16,)),
  "01_convert_hf_weights": dict(MAX_NEW_TOKENS=4, TINY_LAYERS=2, TINY_HIDDEN=64, TINY_VOCAB=128),
  "02_workers_and_mapper": dict(
    NUM_WORKERS=3, WORKER_TOKENS=8, TINY_LAYERS=2, TINY_HIDDEN=64, TINY_VOCAB=128
  ),
  "03_train_parallel_synthesis": dict(
    NUM_STEPS=4,
    BATCH_SIZE=2,
    TRAIN_EXAMPLES=16,
    MAX_WORKERS=2,
    LORA_RANK=2,
    LOG_EVERY=1,
    CHECKPOINT_EVERY=2,
    EVAL_EXAMPLES=2,
    WORKER_TOKENS=8,
    ANSWER_TOKENS=4,
    TTFT_EXAMPLES=0,
    TINY_LAYERS=1,
    TINY_HIDDEN=32,
  ),
  "04_ttft_benchmark": dict(
    KS=(2,),
    LENGTHS=(16,),
    PROMPT_TOKENS=8,
    REPEATS=1,
    TINY_LAYERS=2,
    TINY_HIDDEN=64,
    TINY_VOCAB=128,
  ),
  "05_agent_workflows": dict(WORKER_TOKENS=4, ANSWER_TOKENS=4, MAX_STEPS=1, CAPACITY=4096),
}


def _read(path: Path):
  return nbformat.read(path, as_version=4)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _tags(cell) -> list[str]:
  return list(cell.metadata.get("tags", []))


def _python_source(cell) -> str:
  """The cell's source with IPython magics / shell lines replaced by `pass`."""
  lines = []
  for line in cell.source.splitlines():
    stripped = line.lstrip()
    indent = line[: len(line) - len(stripped)]
    lines.append(f"{indent}pass" if stripped.startswith(("%", "!")) else line)
  return "\n".join(lines)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in _tags(c)]
  assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
  return cells[0]


def _assigned_names(cell) -> set[str]:
  tree = ast.parse(_python_source(cell))
  return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}


def _psynth_imports(nb) -> list[tuple[str, str | None]]:
  """(module, imported name or None) for every `psynth_jax` import in the notebook."""
  found = []
  for cell in _code_cells(nb):
    for node in ast.walk(ast.parse(_python_source(cell))):
      if isinstance(node, ast.Import):
        found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "psynth_jax"]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split(".")[0] == "psynth_jax":
          found += [(node.module, a.name) for a in node.names]
  return found


def _module_exists(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def _missing_pieces(nb) -> list[str]:
  """Dotted names of psynth_jax modules (or names in them) that the notebook needs but do not exist."""
  missing = []
  for module, name in _psynth_imports(nb):
    if not _module_exists(module):
      missing.append(module)
    elif name is not None and not _module_exists(f"{module}.{name}"):
      # Importing an existing module must work; only an absent name counts as "not yet".
      if not hasattr(importlib.import_module(module), name):
        missing.append(f"{module}.{name}")
  return sorted(set(missing))


def _ids(paths):
  return [p.stem for p in paths]


def test_colab_folder_has_notebooks():
  assert NOTEBOOKS, f"no notebooks in {COLAB}"
  assert set(CI_PARAMETERS) <= {p.stem for p in NOTEBOOKS}, "CI_PARAMETERS names a missing notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_layout(path: Path):
  nb = _read(path)
  nbformat.validate(nb)
  assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), f"{path.name}: name it NN_topic.ipynb"

  first = nb.cells[0]
  badge = f"https://colab.research.google.com/github/{ORG_REPO}/blob/main/colab/{path.name}"
  assert first.cell_type == "markdown" and badge in first.source, (
    f"{path.name}: the first cell must hold an 'Open in Colab' badge linking to {badge}"
  )
  assert "colab-badge.svg" in first.source

  code = _code_cells(nb)
  install = code[0].source
  assert "pip install" in install and INSTALL in install and "[tpu]" in install, (
    f"{path.name}: the first code cell must pip install psynth_jax[tpu] from {INSTALL}"
  )
  assert 'find_spec("psynth_jax") is None' in install, (
    f"{path.name}: the install cell must be skipped where psynth_jax is importable"
  )
  assert any("jax.devices()" in c.source and "make_mesh" in c.source for c in code), (
    f"{path.name}: needs a cell that prints jax.devices() and builds the mesh"
  )

  params = _parameters_cell(nb)
  assert params.cell_type == "code"
  overrides = set(CI_PARAMETERS.get(path.stem, {}))
  unknown = overrides - _assigned_names(params)
  assert not unknown, f"{path.name}: CI overrides {sorted(unknown)} are not in its parameters cell"

  for i, cell in enumerate(code):
    assert cell.outputs == [] and cell.execution_count is None, (
      f"{path.name}: code cell {i} has stored outputs; strip them"
    )


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={KERNEL_DEVICES}"
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_on_cpu(path: Path, tmp_path: Path, kernel_env: dict[str, str]):
  nb = _read(path)
  missing = _missing_pieces(nb)
  assert not missing, f"{path.name} imports {', '.join(missing)}, which psynth_jax does not have"

  overrides = CI_PARAMETERS.get(path.stem, {})
  if overrides:
    source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in overrides.items()
    )
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(nb.cells.index(_parameters_cell(nb)) + 1, injected)

  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  try:
    client.execute(env=kernel_env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
