"""The synthetic suite's closed word-level tokenizer."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

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
  prompt, in a branch and in an answer. `save` writes the same tokenizer for
  Hugging Face `tokenizers`.
  """

  pad_token_id, bos_token_id, eos_token_id, sep_token_id, unk_token_id = range(5)
  PATTERN = "|".join(re.escape(t) for t in SPECIAL_TOKENS) + r"| ?=>| ?[a-z]+| ?[0-9]+|[\s\S]"

  def __init__(self):
    words = ("=>", *WORDS, *(str(n) for n in range(MAX_NUMBER + 1)))
    pieces = SPECIAL_TOKENS + tuple(PUNCTUATION) + words + tuple(" " + w for w in words)
    self.vocab = {piece: i for i, piece in enumerate(pieces)}
    self._pieces = list(self.vocab)
    self._split = re.compile(self.PATTERN)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    return (self.eos_token_id,)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids; with add_special_tokens, <bos> first."""
    ids = [self.bos_token_id] if add_special_tokens else []
    ids.extend(self.vocab.get(piece, self.unk_token_id) for piece in self._split.findall(text))
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of ids; specials (ids below len(SPECIAL_TOKENS)) are dropped unless asked for."""
    first = len(SPECIAL_TOKENS) if skip_special_tokens else 0
    return "".join(self._pieces[int(i)] for i in ids if int(i) >= first)

  def save(self, folder: str) -> str:
    """Writes `tokenizer.json` (+ transformers config) to folder; returns the json path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(vocab=self.vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(self.PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", self.bos_token_id)]
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tokenizer.save(path)
    # Lets transformers' AutoTokenizer load the folder too.
    config = {f"{t[1:-1]}_token": t for t in SPECIAL_TOKENS}
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return path
