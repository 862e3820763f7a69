"""Text <-> token ids and chat prompts, on the `tokenizers` library alone.

A model folder (HF or converted) holds tokenizer.json, tokenizer_config.json
and optionally chat_template.jinja, special_tokens_map.json and
generation_config.json. The chat template is rendered the way transformers
renders it (sandboxed jinja2, trim_blocks + lstrip_blocks, `raise_exception`,
a non-HTML-escaping `tojson`, special tokens as variables), so prompts match
`AutoTokenizer.apply_chat_template(..., tokenize=False)` character for
character. No transformers or torch at runtime.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' `clean_up_tokenization`, in its order.
CLEAN_UP_SPACES = (
  (" .", "."),
  (" ?", "?"),
  (" !", "!"),
  (" ,", ","),
  (" ' ", "'"),
  (" n't", "n't"),
  (" 'm", "'m"),
  (" 's", "'s"),
  (" 've", "'ve"),
  (" 're", "'re"),
)


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config stores it: a string, or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


def _strftime_now(fmt: str) -> str:
  return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
  """Compiles a chat template in the environment transformers uses."""
  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


class Tokenizer:
  """A folder's tokenizer: encode, decode, chat template and special token ids."""

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    tokenizer_config: dict[str, Any] | None = None,
    special_tokens: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    chat_template: str | None = None,
  ):
    self.backend = backend
    self.config = dict(tokenizer_config or {})
    self.generation_config = dict(generation_config or {})
    self.chat_template = chat_template
    # special_tokens_map.json (older folders) fills what tokenizer_config lacks.
    tokens = {**(special_tokens or {}), **self.config}
    self.special_tokens = {
      name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(tokens.get(name)))
    }
    self._template = compile_chat_template(chat_template) if chat_template else None

  @classmethod
  def from_folder(cls, path: str | Path) -> Tokenizer:
    """Loads tokenizer.json and its companion files from a model folder."""
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
      raise FileNotFoundError(f"missing tokenizer file {tokenizer_file}")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise ValueError(f"cannot read {tokenizer_file}: {e}") from e
    config = _read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
      template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: use the default one
      template = {t["name"]: t["template"] for t in template}.get("default")
    return cls(
      backend,
      config,
      _read_json(folder / "special_tokens_map.json"),
      _read_json(folder / "generation_config.json"),
      template,
    )

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    # transformers applies this WordPiece-era clean-up only when asked, and never to BPE.
    if self.config.get("clean_up_tokenization_spaces") and not isinstance(
      self.backend.model, tokenizers.models.BPE
    ):
      for before, after in CLEAN_UP_SPACES:
        text = text.replace(before, after)
    return text

  def apply_chat_template(
    self,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **kwargs,
  ) -> str:
    """Renders messages ([{'role': ..., 'content': ...}]) with the folder's chat template."""
    if self._template is None:
      raise ValueError("this tokenizer has no chat template")
    variables = {**self.special_tokens, **kwargs}
    return self._template.render(
      messages=messages,
      tools=tools,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **variables,
    )

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """Every id that ends generation: generation_config's eos ids, then the eos token's."""
    ids = self.generation_config.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = self.special_tokens.get("eos_token")
    if eos is not None and (eos_id := self.token_id(eos)) is not None:
      ids.append(eos_id)
    return tuple(dict.fromkeys(ids))  # de-duplicated, order kept

  @property
  def pad_token_id(self) -> int | None:
    """The pad token's id (tokenizer config, else generation config); None if neither has one."""
    pad = self.special_tokens.get("pad_token")
    if pad is not None and (pad_id := self.token_id(pad)) is not None:
      return pad_id
    return self.generation_config.get("pad_token_id")
