"""Tools over an episode's local files: `parse_file` (pdf, docx, xlsx, csv, text) and `python`.

  box = Toolbox([parse_file_tool(workdir), python_tool(["workdir/shipments.xlsx"])])
  box.call("parse_file", {"path": "shipments.xlsx"}).text
  box.call("python", {"code": "print(sum([3, 4]))"}).text       # "7"

`parse_file` reads a file under one root folder (an episode's workdir, a GAIA split's
folder) through maintained parsers: pypdf (text per page), python-docx (paragraphs and
tables in document order), openpyxl (every sheet; cached values, not formulas), the csv
module; .txt / .md / .json / .jsonl / .py / .xml / .html as text. Tables are rendered one
row a line with cells joined by " | "; whole-number floats are written as integers. A
missing, unsupported, corrupt or out-of-root file is an error observation that says which.

`python` runs a program with `psynth_jax.eval.sandbox.execute` (no network, a throwaway
directory, rlimits; the sandbox's interpreter has the standard library only) and shows
its stdout, then its stderr. A program that fails or times out is an error observation
with the tail of its traceback. Files given to `python_tool` (up to `SHARED_BYTES` in
all; larger ones are left out) are written into each program's working directory first:
one line is prepended to the program, so its traceback line numbers are one more than the
code's. A program given as one markdown code block runs without its fences.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import os
import re
from collections.abc import Sequence

from psynth_jax.agents.tools import Tool

PARSE_CHARS = 8000  # a parsed file: a table of some hundred rows
PYTHON_CHARS = 3000
TRACEBACK_CHARS = 1500  # the end of a failing program's stderr: where the error is
SHARED_BYTES = 2 << 20  # files copied into the python tool's directory, in all
TEXT_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".jsonld", ".py", ".xml", ".html", ".tsv")
TABLE_SEP = " | "


def cell(value) -> str:
  """One table cell as text: "" for empty, 12.0 -> "12", dates in ISO form."""
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, datetime.datetime | datetime.date | datetime.time):
    return value.isoformat()
  return str(value).strip()


def _rows(rows) -> list[str]:
  out = []
  for row in rows:
    cells = [cell(v) for v in row]
    while cells and not cells[-1]:
      cells.pop()
    if cells:
      out.append(TABLE_SEP.join(cells))
  return out


def _pdf(path: str) -> str:
  import pypdf

  reader = pypdf.PdfReader(path)
  pages = [page.extract_text() or "" for page in reader.pages]
  if len(pages) == 1:
    return pages[0].strip()
  return "\n\n".join(f"--- page {n} ---\n{text.strip()}" for n, text in enumerate(pages, 1))


def _docx(path: str) -> str:
  import docx

  parts = []
  for block in docx.Document(path).iter_inner_content():
    if isinstance(block, docx.table.Table):
      parts.append("\n".join(_rows([c.text for c in row.cells] for row in block.rows)))
    elif block.text.strip():
      parts.append(block.text.strip())
  return "\n\n".join(parts)


def _xlsx(path: str) -> str:
  import openpyxl

  book = openpyxl.load_workbook(path, read_only=True, data_only=True)
  try:
    sheets = [(s.title, _rows(s.iter_rows(values_only=True))) for s in book.worksheets]
  finally:
    book.close()
  if len(sheets) == 1:
    return "\n".join(sheets[0][1])
  return "\n\n".join(f"## sheet {title}\n" + "\n".join(rows) for title, rows in sheets)


def _text(path: str) -> str:
  with open(path, encoding="utf-8-sig") as f:  # a non-UTF-8 file is an error, not mojibake
    return f.read()


def _csv(path: str) -> str:
  delimiter = "\t" if path.lower().endswith(".tsv") else ","
  return "\n".join(_rows(csv.reader(_text(path).splitlines(), delimiter=delimiter)))


PARSERS = {".pdf": _pdf, ".docx": _docx, ".xlsx": _xlsx, ".xlsm": _xlsx, ".csv": _csv}
PARSERS.update({s: _text for s in TEXT_SUFFIXES})
PARSERS[".tsv"] = _csv


def parse_file(path: str, root: str) -> str:
  """The text of the file `path` (relative to `root`, or absolute inside it).

  Raises:
    PermissionError: the path leads outside `root`.
    FileNotFoundError: no such file (the message lists the files there are).
    ValueError: an unsupported type, or a file its parser cannot read.
  """
  root = os.path.realpath(root)
  full = os.path.realpath(os.path.join(root, path))
  if os.path.commonpath([root, full]) != root:
    raise PermissionError(f"{path!r} is outside the files this task may read")
  if not os.path.isfile(full):
    names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    raise FileNotFoundError(f"no file {path!r}; files: {', '.join(names) or 'none'}")
  suffix = os.path.splitext(full)[1].lower()
  if suffix not in PARSERS:
    raise ValueError(f"cannot read {suffix or 'suffix-less'} files; parse_file reads {_kinds()}")
  try:
    text = PARSERS[suffix](full)
  except Exception as e:  # each parser has its own errors: say which file and why
    raise ValueError(f"{path!r} is not a readable {suffix} file ({type(e).__name__}: {e})") from e
  return text if text.strip() else f"({path} has no text)"


def _kinds() -> str:
  return ", ".join(sorted(PARSERS))


def parse_file_tool(root: str, *, max_chars: int = PARSE_CHARS) -> Tool:
  def parse(path: str) -> str:
    return parse_file(path, root)

  return Tool(
    "parse_file",
    "Reads a local file (pdf, docx, xlsx, csv or text) and returns its text; tables come"
    " one row a line, cells separated by ' | '.",
    {"path": str},
    parse,
    descriptions={"path": "the file's name, e.g. the attached file of the task"},
    max_chars=max_chars,
  )


class ProgramError(RuntimeError):
  """A program run by the python tool failed or ran out of time."""


def _strip_fence(code: str) -> str:
  """A program given as one markdown code block, without its fences."""
  match = re.fullmatch(r"\s*```[\w+-]*\n(.*?)\n?```\s*", code, re.DOTALL)
  return match.group(1) if match else code


def _shared(paths: Sequence[str]) -> dict[str, bytes]:
  """Base name -> content of the files, in order, while they fit in `SHARED_BYTES`."""
  shared, total = {}, 0
  for path in paths:
    size = os.path.getsize(path)
    if total + size <= SHARED_BYTES:
      with open(path, "rb") as f:
        shared[os.path.basename(path)] = f.read()
      total += size
  return shared


def run_python(code: str, *, timeout_s: float = 10.0, files: dict[str, bytes] | None = None):
  """stdout (then stderr, if any) of `code` run in the sandbox; raises `ProgramError`."""
  from psynth_jax.eval import sandbox

  program = _strip_fence(code)
  if files:
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    program = (
      "import base64 as _b, pathlib as _p; [_p.Path(n).write_bytes(_b.b64decode(d)) for n, d"
      f" in {json.dumps(encoded)}.items()]; del _b, _p\n" + program
    )
  result = sandbox.execute(program, timeout_s)
  out = result.stdout.rstrip()
  if result.status == "timeout":
    raise ProgramError(f"the program ran past its {timeout_s:g} s limit and was stopped" + (
      f"; its output so far:\n{out[-TRACEBACK_CHARS:]}" if out else ""))  # fmt: skip
  err = result.stderr.rstrip()[-TRACEBACK_CHARS:]
  if result.status != "passed":
    shown = f"stdout:\n{out[-TRACEBACK_CHARS:]}\n" if out else ""
    raise ProgramError(f"the program failed\n{shown}{err}")
  if err:
    out = f"{out}\n[stderr]\n{err}"
  return out or "(the program printed nothing: print the values you need)"


def python_tool(
  files: Sequence[str] = (), *, timeout_s: float = 10.0, max_chars: int = PYTHON_CHARS
) -> Tool:
  """The python tool; `files` (paths) are read now and given to every program it runs."""
  shared = _shared(files)
  where = f" Its working directory holds {', '.join(shared)}." if shared else ""

  def python(code: str) -> str:
    return run_python(code, timeout_s=timeout_s, files=shared)

  return Tool(
    "python",
    "Runs a Python 3 program (standard library only, no network, a"
    f" {timeout_s:g} s limit) and returns what it prints.{where}",
    {"code": str},
    python,
    descriptions={"code": "the program; print the results"},
    max_chars=max_chars,
  )
