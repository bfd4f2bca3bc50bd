"""JSONL input errors (file:line), chat validation, grain iterator resume, per-host slices."""

import json

import numpy as np
import pytest

from katjax.data import (PackedData, batch_dataset, load_mid, load_sft, make_iterator, read_jsonl,
                         validate_chat, write_default_data)
from katjax.model.tokenizer import ByteTokenizer


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_malformed_line_reported_with_file_and_line(tmp_path):
  p = _write(tmp_path / "d.jsonl", ['{"text": "a"}', '{"text": ', '{"text": "b"}', '[1]'])
  recs, errs = read_jsonl(p, on_error="skip")
  assert [r["text"] for r in recs] == ["a", "b"]
  assert len(errs) == 2 and errs[0].startswith(f"{p}:2:") and errs[1].startswith(f"{p}:4:")
  with pytest.raises(ValueError, match=f"{p}:2"):
    read_jsonl(p, on_error="raise")


def test_unknown_role_and_empty_dataset(tmp_path):
  bad = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant",
                                                            "content": "x"}]}
  with pytest.raises(ValueError, match="unknown role 'wizard'"):
    validate_chat(bad)
  p = _write(tmp_path / "c.jsonl", [json.dumps(bad)])
  with pytest.raises(ValueError, match=f"{p}:1: messages\\[0\\] has unknown role"):
    load_sft(p, ByteTokenizer(), 256, on_error="raise")
  with pytest.raises(ValueError, match="empty dataset"):  # every line bad -> nothing left
    load_sft(p, ByteTokenizer(), 256, on_error="skip")
  empty = _write(tmp_path / "e.jsonl", [""])
  with pytest.raises(ValueError, match="empty dataset"):
    load_mid(empty, ByteTokenizer(), 256)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
  paths = write_default_data(str(tmp_path_factory.mktemp("d")), n_train=60, n_eval=4)
  return load_sft(paths["sft_train"], ByteTokenizer(), 512)


def test_iterator_resumes_exactly(sft_data):
  ds = batch_dataset(sft_data, 4, seed=1)
  it = make_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(len(sft_data))]  # crosses an epoch boundary
  it2 = make_iterator(ds)
  it2.set_state(state)
  for a in expect:
    b = next(it2)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_per_host_slices_are_disjoint_and_cover(sft_data):
  n = 40
  ids = PackedData({"tokens": np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 8), int)},
                   None, [])
  seen = []
  for pi in range(2):
    ds = batch_dataset(ids, 4, seed=0, repeat=False, process_index=pi, process_count=2)
    assert all(len(b["tokens"]) == 2 for b in ds)  # local batch = global / hosts
    seen.append([int(r[0]) for b in ds for r in b["tokens"]])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(n))
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    batch_dataset(sft_data, 4, process_count=3, process_index=0)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    batch_dataset(sft_data, 10 ** 6)


def test_default_data_packs_well(sft_data):
  s = sft_data.stats
  assert s.sequences == 60 and s.efficiency > 0.8 and s.loss_tokens > 0


def test_write_jsonl_is_all_or_nothing(tmp_path):
  """Hosts sharing a workdir all write the default data: a reader must never see a partial
  file, so a writer that fails midway leaves the previous file whole and no temporary."""
  from katjax.data.jsonl import write_jsonl
  path = str(tmp_path / "d.jsonl")
  write_jsonl(path, [{"text": "a"}, {"text": "b"}])

  def broken():
    yield {"text": "c"}
    raise RuntimeError("writer killed")

  with pytest.raises(RuntimeError, match="writer killed"):
    write_jsonl(path, broken())
  assert read_jsonl(path)[0] == [{"text": "a"}, {"text": "b"}]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
  # two writers of the same default data in one directory: both complete, same content
  first = write_default_data(str(tmp_path / "data"), n_train=4, n_eval=2)
  second = write_default_data(str(tmp_path / "data"), n_train=4, n_eval=2)
  assert first == second
  assert len(read_jsonl(first["sft_train"])[0]) == 4
  assert not [p for p in (tmp_path / "data").iterdir() if p.suffix == ".tmp"]
