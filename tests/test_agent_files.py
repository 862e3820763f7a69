"""parse_file on each format written by its own writer library; corrupt, unsupported, missing
and out-of-root files are error observations; the python tool runs in the sandbox."""

import csv

import pytest

from psynth_jax.agents import files


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """One small file of each kind, written by the libraries that write them."""
  folder = tmp_path_factory.mktemp("files")
  with open(folder / "table.csv", "w", newline="") as f:
    csv.writer(f).writerows([["name", "count"], ["owl", 3], ["hare, mountain", 12]])

  import openpyxl

  book = openpyxl.Workbook()
  book.active.title = "counts"
  book.active.append(["name", "count", "mass"])
  book.active.append(["owl", 3, 1.5])
  book.active.append(["hare", 12.0, None])
  book.create_sheet("notes").append(["checked", True])
  book.save(folder / "book.xlsx")

  import docx

  doc = docx.Document()
  doc.add_heading("Survey", level=1)
  doc.add_paragraph("Counted at dawn.")
  table = doc.add_table(rows=2, cols=2)
  for row, values in zip(table.rows, (("name", "count"), ("fox", "2")), strict=True):
    for cell, value in zip(row.cells, values, strict=True):
      cell.text = value
  doc.add_paragraph("Weather: fog.")
  doc.save(folder / "report.docx")

  from fpdf import FPDF

  pdf = FPDF()
  pdf.set_font("Helvetica", size=12)
  for text in ("First page: owl | 3", "Second page: hare | 12"):
    pdf.add_page()
    pdf.cell(text=text)
  pdf.output(str(folder / "pages.pdf"))

  (folder / "notes.txt").write_text("plain text\nsecond line\n")
  (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is no pdf")
  (folder / "broken.docx").write_bytes(b"not a zip file")
  (folder / "broken.xlsx").write_bytes(b"not a zip file either")
  (folder / "latin1.csv").write_bytes("caf\xe9,1\n".encode("latin-1"))
  (folder / "image.png").write_bytes(b"\x89PNG\r\n")
  return folder


def _parse(root, path):
  return files.parse_file_tool(str(root))({"path": path})


def test_each_format_is_read_by_its_parser(root):
  assert _parse(root, "table.csv").text == "name | count\nowl | 3\nhare, mountain | 12"
  assert _parse(root, "book.xlsx").text == (
    "## sheet counts\nname | count | mass\nowl | 3 | 1.5\nhare | 12\n\n## sheet notes\nchecked | True"
  )
  assert _parse(root, "report.docx").text == (
    "Survey\n\nCounted at dawn.\n\nname | count\nfox | 2\n\nWeather: fog."
  )
  pdf = _parse(root, "pages.pdf").text
  assert pdf.startswith("--- page 1 ---\nFirst page: owl | 3") and "--- page 2 ---" in pdf
  assert pdf.endswith("Second page: hare | 12")
  assert _parse(root, "notes.txt").text == "plain text\nsecond line\n"
  assert not any(_parse(root, n).error for n in ("table.csv", "book.xlsx", "pages.pdf"))
  assert _parse(root, str(root / "table.csv")).text.startswith("name")  # absolute, inside


def test_bad_files_are_error_observations(root):
  for name, reason in (
    ("broken.pdf", "'broken.pdf' is not a readable .pdf file"),
    ("broken.docx", "'broken.docx' is not a readable .docx file"),
    ("broken.xlsx", "'broken.xlsx' is not a readable .xlsx file"),
    ("latin1.csv", "'latin1.csv' is not a readable .csv file (UnicodeDecodeError"),
    ("image.png", "cannot read .png files; parse_file reads .csv, .docx"),
    ("missing.csv", "no file 'missing.csv'; files: book.xlsx, broken.docx"),
    ("../outside.csv", "is outside the files this task may read"),
    ("/etc/passwd", "is outside the files this task may read"),
  ):
    obs = _parse(root, name)
    assert obs.error and obs.text.startswith("Error: parse_file raised"), (name, obs)
    assert reason in obs.text, (name, obs.text)


def test_a_big_table_is_cut_and_the_cut_recorded(tmp_path):
  (tmp_path / "big.csv").write_text("\n".join(f"{i},{i * i}" for i in range(5000)))
  obs = files.parse_file_tool(str(tmp_path), max_chars=500)({"path": "big.csv"})
  assert obs.truncated and obs.full_chars > 50_000 and obs.text.startswith("0 | 0\n1 | 1\n")


def test_python_runs_in_the_sandbox_and_failures_are_observations(root):
  tool = files.python_tool([str(root / "table.csv")], timeout_s=2)
  assert "table.csv" in tool.description
  ok = tool({"code": "print(sum(range(10)))"})
  assert not ok.error and ok.text == "45"
  fenced = tool({"code": "```python\nprint('fenced')\n```"})
  assert fenced.text == "fenced"
  reads = tool(
    {"code": "import csv\nrows = list(csv.reader(open('table.csv')))\nprint(rows[2][1])"}
  )
  assert reads.text == "12"
  assert "printed nothing" in tool({"code": "x = 1"}).text
  warned = tool({"code": "import sys\nprint(1)\nprint('careful', file=sys.stderr)"})
  assert not warned.error and warned.text == "1\n[stderr]\ncareful"
  crash = tool({"code": "print('before')\n1 / 0"})
  assert crash.error and "ProgramError: the program failed" in crash.text
  assert "before" in crash.text and crash.text.rstrip().endswith("division by zero")
  slow = tool({"code": "print('started', flush=True)\nwhile True:\n  pass"})
  assert slow.error and "ran past its 2 s limit" in slow.text and "started" in slow.text
  sandboxed = files.python_tool()({"code": "import os\nprint(os.path.exists('table.csv'))"})
  assert sandboxed.text == "False"  # only the files given are there


def test_cells_are_written_plainly():
  import datetime

  assert [files.cell(v) for v in (None, 3.0, 2.5, " x ", datetime.date(2021, 3, 4))] == [
    "",
    "3",
    "2.5",
    "x",
    "2021-03-04",
  ]
