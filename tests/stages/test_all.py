"""--stage=all pieces that need no training: data preparation and the held-out guarantees."""

import json

import ml_collections
import pytest

from katjax.data import lookup


def _config(tmp_path=None, **eval_fields):
  import sys, os
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs"))
  import pipeline_tiny
  c = pipeline_tiny.get_config()
  c.rl.num_tasks = 400
  c.pipeline.sft_episodes = 300
  c.pipeline.mid_docs = 300
  c.eval.num_tasks = 100
  c.eval.update(eval_fields)
  return c


def _content(question, results):
  """Task content seen in training text: the question and every looked-up value, sorted."""
  return (question, tuple(sorted(results)))


def test_heldout_tasks_never_appear_in_training_data(tmp_path):
  from katjax.stages import all as all_stage
  from katjax.stages.eval import heldout_tasks, train_tasks
  config = _config()
  paths = all_stage.prepare(config, str(tmp_path))
  held = heldout_tasks(config)
  held_content = {_content(lookup.question(t), t["table"].values()) for t in held}
  seen = set()
  with open(paths["sft"]) as f:
    for line in f:
      msgs = json.loads(line)["messages"]
      question = next(m["content"] for m in msgs if m["role"] == "user")
      results = {m["content"] for m in msgs if m["role"] == "tool"} - {"Submitted."}
      seen.add(_content(question, results))
  for t in train_tasks(config):  # RFT / RL tasks
    seen.add(_content(lookup.question(t), t["table"].values()))
  assert len(seen) > 300 and not held_content & seen
  with open(paths["mid"]) as f:  # mid: no held-out question, no tool result after a call
    mid = [json.loads(line)["text"] for line in f]
  prompts = {d.split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for d in mid
             if "<|im_start|>user\nget" in d or "<|im_start|>user\nchain" in d}
  held_prompts_only = {lookup.question(t) for t in held} - {
      lookup.question(t) for t in lookup.generate_tasks(3000, "train", seed=9)}
  assert prompts and not prompts & held_prompts_only


def test_eval_split_overlapping_training_is_an_error(tmp_path):
  from katjax.stages.eval import heldout_tasks, train_tasks
  config = _config()
  leaked = train_tasks(config)[5]
  path = tmp_path / "eval.jsonl"
  path.write_text("".join(json.dumps(t) + "\n" for t in
                          lookup.generate_tasks(10, "heldout") + [leaked]))
  config.eval.tasks_file = str(path)
  with pytest.raises(ValueError, match="overlaps the training data"):
    heldout_tasks(config)


def test_table_and_figure_from_stage_metrics(tmp_path):
  from katjax.stages import figure
  from katjax.stages.eval import wilson_interval
  results = []
  for i, stage in enumerate(["base", "mid", "sft", "rft", "rl"]):
    k = 10 * i
    results.append({"stage": stage, "success": k / 100, "ci95": list(wilson_interval(k, 100)),
                    "mean_turns": 1.0 + i / 2, "mean_tool_calls": float(i),
                    "parallel_call_share": i / 10, "tokens_per_episode": 300.0, "wall_s": 1.0,
                    "success_by_level": {"1": k / 50, "4": 0.0}})
  results[-1]["reward_curve"] = {"1": 0.2, "2": 0.3}
  text = figure.table(results)
  assert text.splitlines()[2].startswith("base") and "0.400" in text.splitlines()[-1]
  png = figure.draw(results, str(tmp_path / "f.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_sft_arg_weight_upweights_exactly_the_copied_keys_and_values(tmp_path):
  from katjax.data import load_sft
  from katjax.stages import all as all_stage
  config = _config()
  config.pipeline.sft_episodes = 40
  paths = all_stage.prepare(config, str(tmp_path))
  tok = all_stage._tokenizer(paths["tokenizer"])
  plain = load_sft(paths["sft"], tok, 768)
  heavy = all_stage.upweight_args(plain, tok, 5)
  assert all_stage.upweight_args(plain, tok, 1) is plain
  copied = set(lookup.KEYS) | {str(v) for v in range(10, 100)}
  t, w = plain.rows["targets"], plain.rows["weights"]
  n_args = 0
  for r in range(t.shape[0]):  # per token, from the decoded text (not the code's id set)
    for j in range(t.shape[1]):
      is_arg = bool(w[r, j]) and tok.decode([int(t[r, j])]) in copied
      n_args += is_arg
      assert heavy.rows["weights"][r, j] == w[r, j] * (5 if is_arg else 1)
  # every episode copies at least one key and one value; the format stays most tokens
  assert 2 * 40 <= n_args < w.sum() / 4
  with pytest.raises(ValueError, match="sft_arg_weight"):
    all_stage.upweight_args(plain, tok, 0)


def test_stage_list_from_a_pretrained_base_chains_init_from(tmp_path, monkeypatch):
  """pipeline.stages="base,sft,rl" with init_from a HF folder: base is evaluated with that
  folder's params and tokenizer (no BPE, no mid data), SFT starts from the folder, RL from
  SFT's workdir. Training and evaluation are stubbed: this is the chaining logic only."""
  import jax
  import numpy as np
  from katjax import model as kmodel
  from katjax.model.tokenizer import ByteTokenizer
  from katjax.stages import all as all_stage
  from katjax.stages import eval as eval_stage
  from katjax.train import init_from
  from katjax.train.config import parse
  config = _config()
  config.pipeline.stages = "base,sft,rl"
  config.pipeline.sft_episodes = 20
  cfg = parse(config).model
  pretrained = kmodel.init(cfg, jax.random.PRNGKey(7))
  hf_dir = str(tmp_path / "hf")
  kmodel.to_hf(cfg, pretrained, hf_dir, tokenizer=ByteTokenizer())
  config.init_from = hf_dir  # config.tokenizer stays "": the folder's tokenizer.json

  train, calls = all_stage.train_stage, []

  def fake_train(stage, c, sdir, prev):
    calls.append((stage, prev, c.init_from, c.tokenizer))
    if stage == "base":
      return train(stage, c, sdir, prev)
    return pretrained, ({"reward_curve": {"1": 0.0}} if stage == "rl" else {})

  evaluated = []

  def fake_evaluate(sampler, tokenizer, tasks, ev, rl, on_turn=None, per_task=False):
    evaluated.append(tokenizer.vocab_size)
    return {"n_tasks": len(tasks), "k": 1, "success": 0.5, "ci95": [0.4, 0.6],
            "mean_turns": 2.0, "mean_tool_calls": 2.0, "parallel_call_share": 0.0,
            "tokens_per_episode": 100.0, "success_by_level": {"1": 0.5}, "finish_reasons": {},
            **({"solved": [True] * len(tasks)} if per_task else {})}

  monkeypatch.setattr(all_stage, "train_stage", fake_train)
  monkeypatch.setattr(eval_stage, "evaluate", fake_evaluate)
  monkeypatch.setattr(init_from, "latest_step", lambda workdir: 1)  # stubbed stages save none
  monkeypatch.setattr(all_stage, "_base_params", _recording(all_stage._base_params, calls))
  work = tmp_path / "run"
  out = all_stage.run(config, str(work))

  assert [s["stage"] for s in out["stages"]] == ["base", "sft", "rl"]
  tok_json = str(tmp_path / "hf" / "tokenizer.json")
  base_params = calls[1]
  assert [c[:2] for c in (calls[0], calls[2], calls[3])] == [
      ("base", hf_dir), ("sft", hf_dir), ("rl", str(work / "sft"))]
  assert all(c[3] == tok_json for c in (calls[0], calls[2], calls[3]))
  from katjax.model.tokenizer import Tokenizer
  assert evaluated == [Tokenizer.from_file(tok_json).vocab_size] * 3  # the folder's (261)
  # base is the folder's params, not the seeded random init
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                   base_params, pretrained))
  assert not (work / "tokenizer.json").exists() and not (work / "data" / "mid.jsonl").exists()
  assert (work / "data" / "sft.jsonl").exists() and (work / "results.json").exists()
  # A rerun finds every listed stage finished and trains nothing.
  n = len(calls)
  assert [s["stage"] for s in all_stage.run(config, str(work))["stages"]] == [
      "base", "sft", "rl"]
  assert len(calls) == n


def _recording(fn, calls):
  def wrapped(config):
    params = fn(config)
    calls.append(params)
    return params
  return wrapped
