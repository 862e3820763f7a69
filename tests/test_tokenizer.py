"""Tokenizer: same ids, text and chat prompts as transformers' AutoTokenizer.

The comparisons need transformers (the hf extra) and are skipped without it; the
error tests use only this package. The suite's SuiteTokenizer must give the ids
the shipped models were trained on, here and in every library that loads its file.
"""

import importlib.util
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from psynth_jax import testing
from psynth_jax.eval import shipped
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.tokenizer import Tokenizer

needs_transformers = pytest.mark.skipif(
  importlib.util.find_spec("transformers") is None, reason="needs transformers (the hf extra)"
)

CORPUS, SPECIALS = testing.BPE_CORPUS, testing.BPE_SPECIALS
MESSAGES = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": 'What is 2+2? <b>bold</b> & "quotes"'},
  {"role": "assistant", "content": "4"},
  {"role": "user", "content": "And 東京?"},
]
TOOLS = [{"name": "search", "description": "Finds <things> & 'stuff'", "parameters": {"q": "str"}}]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
  return testing.bpe_tokenizer_folder(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def wordlevel_folder(tmp_path_factory):
  """A WordLevel tokenizer; template in chat_template.jinja, tokens in special_tokens_map."""
  folder = tmp_path_factory.mktemp("wordlevel")
  words = "hello world , . ! ? do n't it 's what is 2+2 be brief and 東京 4".split()
  vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *words])}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # Joins words with spaces; its own clean-up is off so that ours (transformers') is tested.
  backend.decoder = decoders.WordPiece(cleanup=False)
  backend.add_special_tokens(["<unk>", "<s>", "</s>"])
  backend.save(str(folder / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  special = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}
  (folder / "special_tokens_map.json").write_text(json.dumps(special))
  (folder / "chat_template.jinja").write_text(
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
  )
  return folder


def _hf(folder):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(folder)


@needs_transformers
@pytest.mark.parametrize("text", [*CORPUS, "<|im_start|>user\nhi<|im_end|>", "unseen ß words"])
def test_bpe_encode_decode_match_transformers(bpe_folder, text):
  ours, theirs = Tokenizer.from_folder(bpe_folder), _hf(bpe_folder)
  ids = ours.encode(text)
  assert ids == theirs.encode(text, add_special_tokens=False)
  assert ours.encode(text, add_special_tokens=True) == theirs.encode(text)
  for skip in (True, False):
    assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
      ids, skip_special_tokens=skip
    )
  assert ours.decode(ids, skip_special_tokens=False) == text


@needs_transformers
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_bpe_chat_template_matches_transformers(bpe_folder, generation_prompt, tools):
  ours, theirs = Tokenizer.from_folder(bpe_folder), _hf(bpe_folder)
  for messages in (MESSAGES, MESSAGES[1:2]):
    got = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools)
    want = theirs.apply_chat_template(
      messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
    )
    assert got == want
  assert "<things>" in ours.apply_chat_template(MESSAGES, tools=TOOLS)  # tojson does not escape


@needs_transformers
def test_bpe_special_ids(bpe_folder):
  ours = Tokenizer.from_folder(bpe_folder)
  im_end, eot = ours.token_id("<|im_end|>"), ours.token_id("<|endoftext|>")
  assert ours.eos_token_ids == (im_end, eot)
  assert ours.pad_token_id == eot == _hf(bpe_folder).pad_token_id
  assert ours.vocab_size == len(_hf(bpe_folder))


def test_template_errors_surface(bpe_folder):
  import jinja2

  ours = Tokenizer.from_folder(bpe_folder)
  with pytest.raises(jinja2.TemplateError, match="bad role robot"):
    ours.apply_chat_template([{"role": "robot", "content": "beep"}])


@needs_transformers
def test_wordlevel_matches_transformers(wordlevel_folder):
  ours, theirs = Tokenizer.from_folder(wordlevel_folder), _hf(wordlevel_folder)
  text = "hello world , do n't what is 2+2 ? it 's 4 ."
  ids = ours.encode(text)
  assert ids == theirs.encode(text, add_special_tokens=False)
  assert ours.decode(ids) == theirs.decode(ids) == "hello world, don't what is 2+2? it's 4."
  got = ours.apply_chat_template(MESSAGES[1:3])
  assert got == theirs.apply_chat_template(
    MESSAGES[1:3], add_generation_prompt=True, tokenize=False
  )
  assert got.startswith("<s>user: ")
  assert ours.eos_token_ids == (ours.token_id("</s>"),)
  assert ours.pad_token_id is None


def test_missing_tokenizer_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_folder(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(ValueError, match="tokenizer.json"):
    Tokenizer.from_folder(tmp_path)


@pytest.mark.slow
@needs_transformers
def test_real_qwen_tokenizer_matches_transformers():
  from psynth_jax.convert.weights import fetch_qwen_coder

  folder = fetch_qwen_coder()
  ours, theirs = Tokenizer.from_folder(folder), _hf(folder)
  for text in [*CORPUS, "<|im_start|>user\nprint('hi')<|im_end|>\n"]:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  for tools in (None, TOOLS):
    want = theirs.apply_chat_template(
      MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(MESSAGES, tools=tools) == want
  assert ours.eos_token_ids == (151645, 151643)
  assert ours.pad_token_id == 151643


# ---------------------------------------------------------------- SuiteTokenizer

# Outside the suite: unknown and uppercase words, numbers over MAX_NUMBER, unicode,
# special tokens inside text, runs of spaces and newlines.
ODD_TEXTS = [
  "",
  "Zed!<eos> <pad>x\n\n  ",
  "Oslo NORWAY 1000 12345 -7 3.14",
  "café 東京 🙂 e\u0301 \u00a0",
  "a<eos>b <bos><sep><unk> <eos",
  "   many   spaces\n\n\nand lines\n",
  "oslo => norway<eos>",
]


def _suite_texts(n=12):
  for split in ("train", "test"):
    for ex in synthetic.generate(split, n, seed=3):
      yield synthetic.synth_prompt_text(ex)
      yield synthetic.text_synthesis_prompt_text(ex)
      yield synthetic.target_text(ex)
      yield from (synthetic.worker_prompt_text(ex, i) for i in range(len(ex.branches)))


@pytest.fixture(scope="module")
def suite():
  return SuiteTokenizer()


@pytest.fixture(scope="module")
def suite_file(suite, tmp_path_factory):
  return suite.save(str(tmp_path_factory.mktemp("suite")))


def test_suite_round_trips_suite_texts(suite):
  for text in _suite_texts():
    ids = suite.encode(text)
    assert suite.unk_token_id not in ids
    assert suite.decode(ids, skip_special_tokens=False) == text
    assert suite.decode(ids) == text.replace("<eos>", "")
    assert suite.encode(text, add_special_tokens=True) == [suite.bos_token_id, *ids]


def test_suite_odd_texts(suite):
  v, unk = suite.vocab, suite.unk_token_id
  assert suite.encode("") == [] and suite.encode("", add_special_tokens=True) == [1]
  # Specials inside text are their own ids; a piece outside the vocabulary is one <unk>.
  assert suite.encode("x<eos> 7") == [unk, suite.eos_token_id, v[" 7"]]
  assert suite.encode("Oslo 1000") == [unk, unk, unk]
  assert suite.encode("  => mali?\n") == [v[" "], v[" =>"], v[" mali"], v["?"], v["\n"]]
  ids = suite.encode("<bos>oslo<eos>")
  assert suite.decode(ids) == "oslo"
  assert suite.decode(ids, skip_special_tokens=False) == "<bos>oslo<eos>"
  assert suite.decode(np.asarray(ids, np.int32)) == "oslo"


def test_suite_save_is_the_shipped_tokenizer(suite_file):
  """The shipped models were trained on these ids: the saved file may not drift."""
  with open(suite_file) as f, open(f"{shipped.SYNTHETIC_BASE}/tokenizer.json") as g:
    assert json.load(f) == json.load(g)


def test_suite_saved_file_gives_same_ids(suite, suite_file):
  loaded = tokenizers.Tokenizer.from_file(suite_file)
  assert loaded.get_vocab_size() == suite.vocab_size
  for text in [*_suite_texts(4), *ODD_TEXTS]:
    for special in (False, True):
      ids = suite.encode(text, add_special_tokens=special)
      assert loaded.encode(text, add_special_tokens=special).ids == ids
      for skip in (False, True):
        assert loaded.decode(ids, skip_special_tokens=skip) == suite.decode(ids, skip)


def test_suite_transformers_gives_same_ids(suite, suite_file):
  transformers = pytest.importorskip("transformers")
  theirs = transformers.PreTrainedTokenizerFast(
    tokenizer_file=suite_file, clean_up_tokenization_spaces=False
  )
  for text in [*_suite_texts(4), *ODD_TEXTS]:
    ids = suite.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs.encode(text) == suite.encode(text, add_special_tokens=True)
    assert theirs.decode(ids, skip_special_tokens=False) == suite.decode(ids, False)
    assert theirs.decode(ids, skip_special_tokens=True) == suite.decode(ids)
