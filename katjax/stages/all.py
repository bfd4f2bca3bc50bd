"""`--stage=all`: eval(base) -> mid -> eval -> SFT -> eval -> RFT -> eval -> RL -> eval.

    python -m katjax.launch --stage=all --config=configs/pipeline_tiny.py --workdir=DIR

The miniature of the KAT report's figure 5 (DESIGN.md section 8). `pipeline.stages` picks
the stages (a subsequence of base, mid, sft, rft, rl; e.g. "base,sft,rl"). The base model
is `config.init_from` (a Hugging Face folder or a workdir) when set, with its own tokenizer
(`config.tokenizer`, "" = init_from's); with neither set it is the seeded random init and
the run trains a compact BPE (configs/pipeline_tiny.py). One workdir:

    DIR/tokenizer.json   compact BPE trained on the mid corpus (before anything else, so
                         the base model is evaluated with the vocabulary every stage uses;
                         only when neither config.tokenizer nor config.init_from is set)
    DIR/data/            mid corpus, SFT expert episodes (JSONL)
    DIR/<stage>/         checkpoints/, logs/, eval.json (the stage's held-out metrics)
    DIR/results.json     {"stages": [{"stage", "success", "ci95", "mean_turns",
                          "parallel_call_share", "wall_s"}, ...]}
    DIR/figure5.png      success per stage with its 95% interval, and the RL reward curve

Each stage starts from the previous stage's workdir (`init_from`; the first training stage
from the params base was evaluated with); a stage with `pipeline.<stage>_steps=0` is left out (no
training, no evaluation). A stage whose eval.json exists is finished: a rerun skips it (and
says so) and the next stage starts from its checkpoint; a finished stage without a
checkpoint is a ValueError naming the folder. Ctrl-C
leaves the running stage's last checkpoint, from which a rerun resumes it. Before anything
trains, the held-out tasks are checked against every training stage's tasks (overlap:
ValueError).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

import jax
import tqdm

from katjax import model as kmodel
from katjax.data import load_mid, load_sft, lookup
from katjax.data.bpe import train_and_save
from katjax.data.jsonl import write_jsonl
from katjax.envs.base import make_env
from katjax.stages import eval as eval_stage
from katjax.stages import figure
from katjax.train.config import PIPELINE_STAGES as STAGES
from katjax.train.config import parse

__all__ = ["STAGES", "run", "prepare", "train_stage", "upweight_args", "with_fields"]


def run(config, workdir: str, *, until: str = "") -> dict:
  """Runs (or resumes) the stages up to and including `until`; returns {"stages": [...]}.

  until: the last stage to run ("" = the last of pipeline.stages; e.g. "sft" for a workdir
  that later stages start from: `katjax.stages.flow_learning`). results.json and the figure
  are written only by a run to the last stage, so a partial run never overwrites a complete
  run's record.
  """
  p = config.pipeline
  stages = parse(config).pipeline.stage_list()
  until = until or stages[-1]
  if until not in stages:
    raise ValueError(f"until={until!r} is not one of pipeline.stages {stages}")
  workdir = os.path.abspath(workdir)
  paths = prepare(config, workdir)
  config = with_fields(config, tokenizer=paths["tokenizer"])
  tokenizer = _tokenizer(paths["tokenizer"])
  cfg = parse(config).model
  from katjax.model.hf import check_vocab
  check_vocab(tokenizer, cfg)  # base is evaluated before any stage checks it
  held = eval_stage.heldout_tasks(config)  # checks against the RL / RFT tasks
  lookup.check_disjoint(held, _sft_tasks(config), what="eval (vs SFT data)")
  print(f"[all] stages {', '.join(stages)}; tokenizer {paths['tokenizer']}; base "
        f"{config.init_from or 'random init (train.seed)'}")
  results, sampler = [], None
  for i, stage in enumerate(stages[:stages.index(until) + 1]):
    sdir = os.path.join(workdir, stage)
    done = os.path.join(sdir, "eval.json")
    if os.path.exists(done):
      with open(done) as f:
        results.append(json.load(f))
      print(f"[all] {stage}: finished in an earlier run, skipped ({done})")
      continue
    if stage != "base" and getattr(p, f"{stage}_steps") == 0:
      print(f"[all] {stage}: pipeline.{stage}_steps=0, left out (params pass through)")
      continue
    trained = [s for s in stages[:i] if s == "base" or getattr(p, f"{s}_steps") > 0]
    prev = _finished_workdir(workdir, trained[-1], config) if trained else config.init_from
    t0 = time.perf_counter()
    params, extra = train_stage(stage, config, sdir, prev)
    sampler = eval_sampler(sampler, cfg, params, config, tokenizer)
    bar = tqdm.tqdm(total=config.rl.max_turns, desc=f"eval {stage}", dynamic_ncols=True)
    # per_task: eval.json keeps which held-out tasks the stage solved, so two stages can
    # be compared on the same tasks (`eval.paired`), not only by their intervals.
    metrics = eval_stage.evaluate(sampler, tokenizer, held, config.eval, config.rl,
                                  on_turn=lambda _: bar.update(1), per_task=True)
    bar.close()
    metrics.update(extra, stage=stage, wall_s=time.perf_counter() - t0)
    os.makedirs(sdir, exist_ok=True)
    with open(done, "w") as f:
      json.dump(metrics, f, indent=1)
    print(eval_stage.format_metrics(stage, metrics))
    results.append(metrics)
  keys = ("stage", "success", "ci95", "mean_turns", "parallel_call_share", "wall_s")
  out = {"stages": [{k: r[k] for k in keys} for r in results]}
  if until != stages[-1]:
    return out
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(figure.table(results))
  png = figure.draw(results, os.path.join(workdir, "figure5.png"))
  print(f"[all] results.json and {os.path.basename(png)} in {workdir}")
  return out


def eval_sampler(sampler, cfg, params, config, tokenizer):
  """The evaluation sampler with `params` in it: created on the first call, else given the
  new weights. One placement for every stage's params (training leaves them mesh-sharded),
  so one sampler's compiled programs serve every evaluation."""
  params = jax.device_put(jax.device_get(params), jax.devices()[0])
  if sampler is None:
    from katjax.rollout.sampler import Sampler
    return Sampler(cfg, params, max_len=config.rl.max_tokens, tokenizer=tokenizer,
                   max_batch=256)
  sampler.update_weights(params)
  return sampler


def prepare(config, workdir: str) -> dict:
  """Writes (once; deterministic) what the listed stages need: the BPE tokenizer (only when
  neither config.tokenizer nor config.init_from names one) and the mid / SFT data.
  Returns {"tokenizer": a tokenizer.json path or "byte", "mid", "sft": JSONL paths of the
  listed LM stages}."""
  p = config.pipeline
  stages = parse(config).pipeline.stage_list()
  data = os.path.join(workdir, "data")
  os.makedirs(data, exist_ok=True)
  paths = {s: os.path.join(data, f"{s}.jsonl") for s in ("mid", "sft") if s in stages}
  bpe = not (config.tokenizer or config.init_from)
  if bpe:
    paths["tokenizer"] = os.path.join(workdir, "tokenizer.json")
  else:  # the pretrained model's own tokenizer (config.tokenizer "" = init_from's)
    from katjax.train.init_from import tokenizer_of
    paths["tokenizer"] = config.tokenizer or tokenizer_of(config.init_from)
  docs = None
  if (bpe and not os.path.exists(paths["tokenizer"])) or (
      "mid" in paths and not os.path.exists(paths["mid"])):
    docs = lookup.mid_corpus(p.mid_docs, seed=config.data.seed)
  if bpe and not os.path.exists(paths["tokenizer"]):
    tok = train_and_save(docs, p.vocab_size, paths["tokenizer"])
    if tok.vocab_size > config.model.vocab_size:
      raise ValueError(f"pipeline.vocab_size={p.vocab_size} gave {tok.vocab_size} ids > "
                       f"config.model.vocab_size={config.model.vocab_size}")
  if "mid" in paths and not os.path.exists(paths["mid"]):
    write_jsonl(paths["mid"], [{"text": d} for d in docs])
  if "sft" in paths and not os.path.exists(paths["sft"]):
    rng = random.Random(config.data.seed)
    env = make_env(config.rl.env)
    chats = []
    for task in _sft_tasks(config):
      messages, tools = env.reset(task)
      chats.append({"id": task["id"], "messages": messages + lookup.expert_episode(task, rng),
                    "tools": tools})
    write_jsonl(paths["sft"], chats)
  return paths


# --- stages -----------------------------------------------------------------------------------


def train_stage(stage, config, sdir, prev):
  """Trains one stage from `prev`: the previous stage's workdir, or for the first training
  stage config.init_from ("" = the seeded random init that base was evaluated with), with
  the stage's `pipeline.<stage>_steps` and `_lr`; returns (params, extra metrics for
  eval.json). config.tokenizer must be the pipeline's (`prepare`)."""
  from katjax.stages.common import make_tokenizer
  from katjax.train.loop import train_lm
  p = config.pipeline
  if stage == "base":
    return _base_params(config), {}
  c = _stage_config(config, getattr(p, f"{stage}_steps"), getattr(p, f"{stage}_lr"))
  with c.unlocked():
    c.init_from = prev or ""
  tok = make_tokenizer(c, sdir)  # checked against the vocabulary, copied into sdir
  if stage in ("mid", "sft"):
    path = os.path.join(os.path.dirname(sdir), "data", f"{stage}.jsonl")
    data = (load_mid if stage == "mid" else load_sft)(path, tok, c.data.seq_len,
                                                      on_error=c.data.on_error)
    if stage == "sft":
      data = upweight_args(data, tok, p.sft_arg_weight)
    print(f"[all] {stage}: {data.stats.sequences} sequences, {data.stats.loss_tokens} loss "
          f"tokens, {c.train.steps} steps")
    summary = train_lm(c, sdir, data, None, tokenizer=tok)
    return summary["state"].params, {"train_loss": summary["losses"]}
  from katjax.stages import rl as rl_stage
  rft = None
  if stage == "rft":
    from katjax.stages.rft import RftRewards
    rft = RftRewards(tok, c.rl.env, c.rl.rft)
  print(f"[all] {stage}: {c.train.steps} steps of {c.rl.tasks_per_step} tasks x "
        f"{c.rl.group_size} rollouts")
  summary = rl_stage.train_rl(c, sdir, rft=rft)
  curve = {str(k): v for k, v in sorted(summary["reward_mean"].items())}
  extra = {"reward_curve": curve, "start_step": summary["start_step"]}
  if "flow" in summary:  # rl.mode="async": staleness, bubble, throughput (stages/rl_flow.py)
    extra["flow"] = summary["flow"]
  return summary["state"].params, extra


def upweight_args(data, tokenizer, weight: int):
  """SFT rows whose trained targets that are a key or a value (one BPE token each, the
  tokens an episode copies from the question or a tool result) weigh `weight` (> 1: copying
  is a few tokens of each episode, the format all the rest, and plain SFT then learns the
  format long before it learns to copy)."""
  if int(weight) != weight or weight < 1:
    raise ValueError(f"pipeline.sft_arg_weight must be an integer >= 1, got {weight!r}")
  if weight == 1:
    return data
  import numpy as np
  from katjax.data.pipeline import PackedData
  ids = set()
  for text in list(lookup.KEYS) + [str(v) for v in range(10, 100)]:
    enc = tokenizer.encode(text)
    if len(enc) == 1:
      ids.add(enc[0])
  rows = dict(data.rows)
  hit = np.isin(rows["targets"], np.fromiter(ids, np.int32)) & (rows["weights"] > 0)
  rows["weights"] = np.where(hit, rows["weights"] * int(weight), rows["weights"]).astype(np.int32)
  return PackedData(rows, data.stats, data.errors)


def _stage_config(config, steps, lr):
  c = with_fields(config)
  with c.unlocked():
    c.train.steps = int(steps)
    c.optimizer.total_steps = int(steps)
    c.optimizer.learning_rate = float(lr)
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, int(steps) // 4)
    c.train.checkpoint_every = min(c.train.checkpoint_every, int(steps))
  return c


def _base_params(config):
  """The base model: config.init_from's params, else the random init a stage with empty
  init_from starts from (katjax.train.trainer.Trainer.setup's key for the same
  train.seed)."""
  cfg = parse(config).model
  if config.init_from:
    from katjax.train.init_from import load_params
    return load_params(cfg, config.init_from, None)
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.train.seed))
  return kmodel.init(cfg, init_key)


def _finished_workdir(workdir, stage, config):
  """What the next stage initialises from: config.init_from after base ("" = the random
  init), else the stage's workdir (ValueError when the stage finished but its checkpoint
  is gone)."""
  if stage == "base":
    return config.init_from
  from katjax.train.init_from import latest_step
  sdir = os.path.join(workdir, stage)
  if latest_step(sdir) is None:
    raise ValueError(f"stage {stage!r} is marked finished ({sdir}/eval.json) but has no "
                     f"checkpoint in {sdir}/checkpoints: delete {sdir} to rerun it")
  return sdir


def _sft_tasks(config):
  """SFT's tasks: the first pipeline.sft_episodes of the training split RL also uses."""
  return eval_stage.train_tasks(config)[:config.pipeline.sft_episodes]


def with_fields(config, **fields):
  """A deep copy of config with top-level fields replaced."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for k, v in fields.items():
      setattr(c, k, v)
  return c


def _tokenizer(path):
  from katjax.model.tokenizer import ByteTokenizer, Tokenizer
  return ByteTokenizer() if path == "byte" else Tokenizer.from_file(path)

