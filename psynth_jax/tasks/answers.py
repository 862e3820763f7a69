"""Reading a model's final answer out of free text, and comparing it with the gold one.

Shared by the benchmark tasks (`mathqa`, `multiple_choice`), with the few
steps of reading their files that both take (`read_jsonl`, `load_rows`). Every answer function takes whatever a model wrote — truncated,
answer-less, full of LaTeX — and returns `None` or `False` rather than raising:
a completion without an answer scores 0, it never stops an evaluation.

Math answers (`math_equal`) are compared after `canonical` rewrites the usual
spellings of one value to one string (`$18.00`, `18`; `\\dfrac12`, `\\frac{1}{2}`;
`10,\\!080`, `10080`; `90^\\circ`, `90`), then, when both sides are numbers,
by value (`1/2` == `0.5` == `\\frac{1}{2}`). It is not a computer algebra
system: `\\sqrt{8}` and `2\\sqrt{2}` differ.

Choice answers (`extract_choice`) look for a letter only where a model states
one (see its docstring for the order); a capital "A" opening a sentence is never
read as option A.
"""

from __future__ import annotations

import math
import re

# `\boxed{`, `\boxed {`, `\fbox{`; `\boxed 5` (no braces) is read up to the next space or `$`.
_BOX = re.compile(r"\\(?:boxed|fbox)\b\s*")
# A number as written in prose: thousands groups (`1,000`) or plain digits, an
# optional decimal part; a minus only where it cannot be subtraction (`5-3`).
_NUMBER = re.compile(r"(?:(?<![\w)}\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)\.\d+")
_PLAIN = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """The content of the brace group opening at `text[start]` and the index after it."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1 : i], i + 1
  return None  # unbalanced: the output was cut off inside the box


def last_boxed(text: str | None) -> str | None:
  """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`), nested braces kept.

  A box left open at the end (a truncated output) is skipped, so an earlier
  complete box still counts.
  """
  if not text:
    return None
  found = None
  for match in _BOX.finditer(text):
    start = match.end()
    if start < len(text) and text[start] == "{":
      group = _braced(text, start)
      if group is not None:
        found = group[0]
    elif bare := re.match(r"[^\s$]+", text[start:]):
      found = bare.group(0)
  return found


def last_number(text: str | None) -> str | None:
  """The last number written in `text` (`1,000`, `-3`, `2.5`), as written; None if none."""
  if not text:
    return None
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _unwrap(text: str, command: str) -> str:
  """`\\command{x}` -> `x`, brace-aware (the content may hold braces itself)."""
  out, i = [], 0
  pattern = re.compile(r"\\" + command + r"\s*(?=\{)")
  while match := pattern.search(text, i):
    group = _braced(text, match.end())
    if group is None:
      break
    out.append(text[i : match.start()] + group[0])
    i = group[1]
  out.append(text[i:])
  return "".join(out)


def canonical(answer: str) -> str:
  """One string per common spelling of a math answer (see the module docstring).

  Removes: surrounding `$`, spaces, `\\left`/`\\right`, LaTeX spacing (`\\!`, `\\,`),
  `\\$` and `$`, `%` and `\\%` (so `50%` reads as 50, the way GSM8K writes
  percentages as plain numbers), degrees (`^\\circ`, `^{\\circ}`, `°`), a unit in
  `\\text{}` after a number (`5\\text{ cm}`), a trailing full stop, thousands
  commas (`1,000`) and a lone variable's `x=` prefix. Unwraps `\\text{}`,
  `\\textbf{}`, `\\mbox{}`; spells `\\dfrac`/`\\tfrac` as `\\frac` and gives
  `\\frac43`, `\\sqrt2` their braces.
  """
  s = answer.strip()
  s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox)\{\s*[a-zA-Z ]+\}(\^\d)?$", "", s)  # a trailing unit
  for command in ("text", "textbf", "textrm", "mathrm", "mbox", "boxed"):
    s = _unwrap(s, command)
  s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
  s = re.sub(r"\\[!,;:> ]", "", s)
  s = re.sub(r"\^\s*\{?\\circ\}?|°|\\circ", "", s)
  s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
  s = re.sub(r"\\[dt]frac", r"\\frac", s)
  s = re.sub(r"\s+", "", s).rstrip(".")
  s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac(\d)(?=\{)", r"\\frac{\1}", s)
  s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
  s = re.sub(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])", lambda m: m.group(1).replace(",", ""), s)
  if re.fullmatch(r"[a-zA-Z]=[^=]+", s):
    s = s[2:]
  return s


def normalize_number(answer: str | None) -> float | None:
  """The number an answer string denotes (after `canonical`), or None if it is not one.

  Reads integers and decimals (`18.00` -> 18.0), thousands commas, and simple
  fractions `a/b` and `\\frac{a}{b}` (with `\\dfrac`, a leading minus), so fractions
  compare by value.
  """
  if answer is None:
    return None
  s = canonical(answer)
  try:
    if _PLAIN.fullmatch(s):
      return float(s)
    if match := _FRACTION.fullmatch(s):
      sign, num, den, num2, den2 = match.groups()
      value = float(num or num2) / float(den or den2)
      return -value if sign else value
  except (ValueError, ZeroDivisionError):
    return None
  return None


def math_equal(pred: str | None, gold: str, *, rel_tol: float = 1e-6) -> bool:
  """Whether a predicted math answer equals the gold one: same canonical string, or same value
  within `rel_tol` (absolute 1e-9 near zero)."""
  if pred is None or not pred.strip():
    return False
  if canonical(pred) == canonical(gold):
    return True
  a, b = normalize_number(pred), normalize_number(gold)
  return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def _letter_of(text: str, letters: str, *, alone: bool = False) -> str | None:
  """The option letter a short answer names: `C`, `(C)`, `C.`, `\\text{C}`, `**C**`, and
  unless `alone`, a letter opening its option's text (`C) 10 eV`, `C. 10 eV`)."""
  s = _unwrap(_unwrap(text.strip(), "text"), "textbf").strip().strip("*$").strip()
  match = re.fullmatch(r"\(?([A-Z])\)?[.:]?", s)
  if not match and not alone:
    match = re.match(r"\(?([A-Z])(?:\)|[.:])\s", s)
  if match and match.group(1) in letters:
    return match.group(1)
  return None


# "The answer is (C)", "Answer: **C**", "the final answer is option C"; the keyword in any case,
# the letter a capital not followed by more of a word ("Answer: The ..." is no letter).
_STATED = re.compile(
  r"\b(?i:answer)(?:\s+(?i:is|would\s+be|should\s+be))?[\s:：*_]*(?:(?i:option|choice)\s*)?"
  r"[\s:：*_$(\\]*([A-Z])(?![\w'])"
)
# "the correct option is C", "best choice: (B)": only with "correct"/"best"/"right" before it,
# since "option D is wrong" names an option the model rejects.
_BEST = re.compile(
  r"(?i:correct|best|right)\s+(?i:option|choice)(?:\s+(?i:is))?[\s:：*_$(\\]*([A-Z])(?![\w'])"
)


def extract_choice(text: str | None, letters: str = "ABCD") -> str | None:
  """The option letter a completion answers with, or None.

  In this order:
    1. the last `\\boxed{}` when it names a letter (`\\boxed{C}`, `\\boxed{(C)}`,
       `\\boxed{\\text{C}}`, `\\boxed{C. 10 eV}`);
    2. the last explicit statement with "answer": "answer is (C)", "Answer: **C**",
       "final answer: option C" (keyword in any case, the letter a capital); then
       the last "correct option is C" / "best choice: (C)";
    3. the last line, when it is a letter alone (`C`, `(C)`, `**C.**`); not a
       line opening with a letter ("B. ..."): that may be a restated option list.
  A letter anywhere else in prose ("A patient presents...") is never an answer.
  """
  if not text:
    return None
  boxed = last_boxed(text)
  if boxed is not None and (letter := _letter_of(boxed, letters)):
    return letter
  for pattern in (_STATED, _BEST):
    for letter in reversed(pattern.findall(text)):
      if letter in letters:
        return letter
  lines = [line for line in text.strip().splitlines() if line.strip()]
  if lines and (letter := _letter_of(lines[-1], letters, alone=True)):
    return letter
  return None
