"""The synthetic suite's closed word-level tokenizer."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from psynth_jax.tasks.synthetic import MAX_NUMBER, PUNCTUATION, SPECIAL_TOKENS, WORDS


class SuiteTokenizer:
  """Closed word-level vocabulary of the suite: one id per special token, punctuation
  character (space and newline included), "=>", and word or number 0..MAX_NUMBER,
  each of the last three also with a leading space (as GPT-2's "Ġword").

  Text is cut into special-token strings, then words, digit runs and "=>" (each
  taking the space before it, if any), then single characters; a piece outside
  the vocabulary maps to <unk>. `decode(encode(text)) == text` for every suite
  text. A word is one token that knows it starts a word, so the token before it
  is the previous word, not a space: copying and lookups need half the
  positions of a space-as-token vocabulary and a fifth of a character one,
  which is what lets a tiny model learn the suite in minutes. The prompt formats
  end in ":" and completions start with a space, so a word has the same id in a
  prompt, in a branch and in an answer.

  One Hugging Face `tokenizers` WordLevel tokenizer does the encoding, the
  decoding and is what `save` writes, so the shipped `tokenizer.json` cannot
  drift from the ids the models were trained on.
  """

  pad_token_id, bos_token_id, eos_token_id, sep_token_id, unk_token_id = range(5)
  PATTERN = "|".join(re.escape(t) for t in SPECIAL_TOKENS) + r"| ?=>| ?[a-z]+| ?[0-9]+|[\s\S]"

  def __init__(self):
    words = ("=>", *WORDS, *(str(n) for n in range(MAX_NUMBER + 1)))
    pieces = SPECIAL_TOKENS + tuple(PUNCTUATION) + words + tuple(" " + w for w in words)
    self.vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.WordLevel(vocab=self.vocab, unk_token="<unk>"))
    # Every character matches the pattern, so no text is left between the pieces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(self.PATTERN), behavior="isolated")
    # Pieces carry their own spaces: decoding concatenates them.
    tokenizer.decoder = decoders.Fuse()
    # Added as specials, "<eos>" inside text is cut out before the pattern runs and
    # decode drops them when skip_special_tokens.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", self.bos_token_id)]
    )
    self._tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    return (self.eos_token_id,)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids; with add_special_tokens, <bos> first."""
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of ids; specials (ids below len(SPECIAL_TOKENS)) are dropped unless asked for."""
    ids = [int(i) for i in ids]
    if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
      raise ValueError(f"ids {bad[:5]} are outside the suite vocabulary [0, {self.vocab_size})")
    return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def save(self, folder: str) -> str:
    """Writes `tokenizer.json` (+ transformers config) to folder; returns the json path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    self._tokenizer.save(path)
    # Lets transformers' AutoTokenizer load the folder too.
    config = {f"{t[1:-1]}_token": t for t in SPECIAL_TOKENS}
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return path
