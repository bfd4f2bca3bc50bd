"""The one run-config schema: every stage's fields, declared once with their types and defaults.

A run config has two forms. Config files and `--config.x=y` overrides edit a locked
`ml_collections.ConfigDict` built from `base_config()` (a misspelt field fails where it is
written, naming it). Code reads the frozen, typed `RunConfig` that `parse(config)` returns:
`parse` is the one place a config is validated (every name known, every value of its
declared type, each section's own checks), and the launcher calls it when it loads a config.

Sections (each a frozen dataclass below, or the existing one it reuses):

    tokenizer   "byte", a tokenizer.json path, or "" = the tokenizer of init_from
    init_from   "" (random init), a previous stage's workdir, or a Hugging Face folder
    model       katjax.model.ModelConfig
    data        DataConfig (mid / sft)
    optimizer   katjax.train.state.OptimizerConfig (total_steps 0: train.steps)
    train       TrainConfig (steps, cadence of logs and checkpoints)
    mesh        MeshConfig
    rl          RLConfig, with rl.loss (PolicyLossConfig less `norm`) and rl.rft (RFTConfig)
    serve       ServeConfig
    export      ExportConfig
    eval        EvalConfig
    pipeline    PipelineConfig (--stage=all)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import ml_collections

from katjax.core.losses import PolicyLossConfig
from katjax.model.config import ModelConfig
from katjax.train.state import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """JSONL files of the LM stages ("" = the embedded synthetic data) and the packing."""

  train_file: str = ""
  eval_file: str = ""
  seq_len: int = 512
  batch_size: int = 4
  seed: int = 0
  on_error: Literal["skip", "raise"] = "skip"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps and the one log / eval / checkpoint cadence every training stage uses."""

  steps: int = 30
  micro_batches: int = 1
  seed: int = 0
  log_every: int = 5
  eval_every: int = 15  # 0: never (mid / sft)
  eval_batches: int = 2
  checkpoint_every: int = 15
  keep: int = 2
  async_checkpoint: bool = True
  peak_flops: float = 0.0  # per device, for MFU; 0: looked up from the device kind
  # Per device, GiB the RL tree step may use: at start the stage compiles its step and stops,
  # naming rl.row_tokens and the largest row that fits, if the step's peak exceeds it.
  # 0: the device's own limit (memory_stats bytes_limit on GPU / TPU); no check on CPU.
  memory_budget_gib: float = 0.0

  def __post_init__(self):
    for name in ("steps", "micro_batches", "log_every", "checkpoint_every", "keep"):
      if getattr(self, name) < (0 if name == "steps" else 1):
        raise ValueError(f"config.train.{name}={getattr(self, name)} must be positive")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes (-1: all remaining devices)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Devices a tree row's tokens are split over (context parallelism: the RL tree step's
  # attention runs as a ring over them, `katjax.model.ring_attention`); rl.row_tokens must
  # be a multiple of it.
  sequence: int = 1

  def __post_init__(self):
    if not isinstance(self.sequence, int) or self.sequence < 1:
      raise ValueError(f"config.mesh.sequence={self.sequence!r} must be a positive int")


ASYNC_TIS_CAP = 2.0  # rl.mode="async": min(pi_prox / pi_behav, 2) when rl.loss.tis_cap is None


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """rl.loss: the policy-loss options of core.losses.PolicyLossConfig except `norm`, which
  is rl.norm (one normalisation for the tree weights, the loss and pruning)."""

  eps_low: float = 0.2
  eps_high: float = 0.28
  dual_clip: float | None = None
  kl_coef: float = 0.0
  kl_type: Literal["k1", "k3"] = "k3"
  # Truncated importance weight min(pi_prox / pi_behav, tis_cap) against the sampler's
  # logprobs. None: off in rl.mode="sync" (pi_prox = pi_behav up to numerics) and
  # ASYNC_TIS_CAP in rl.mode="async", where it is part of the decoupled objective
  # (DESIGN.md section 6): without it, one-version-stale rollouts at lr 2e-3 drove the
  # pipeline's policy into never-ending turns (docs/benchmarks.md, "Async learning").
  tis_cap: float | None = None


@dataclasses.dataclass(frozen=True)
class RFTConfig:
  """rl.rft (used by --stage=rft): reward relative to the teacher, deviation monitor."""

  metric: Literal["lcs", "edit"] = "lcs"
  outcome_weight: float = 0.5
  monitor: bool = True
  patience: int = 2
  schema_patience: int = 1
  min_similarity: float = 0.2
  teacher_branch: bool = True


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Agentic RL (rl, rft): tasks, group rollouts, agent limits, the pruned tree batch."""

  env: str = "arithmetic"
  tasks_file: str = ""
  num_tasks: int = 64
  task_seed: int = 0
  tasks_per_step: int = 2
  group_size: int = 4
  temperature: float = 1.0
  top_p: float = 1.0
  max_turns: int = 2
  max_new_tokens: int = 48
  max_tokens: int = 1280
  num_rows: int = 2
  row_tokens: int = 2048
  norm: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
  prune_selector: str = "entropy"
  # Schedule: "sync" alternates rollouts and steps; "async" is SeamlessFlow (katjax.flow):
  # up to `eta` policy versions ahead, `rollout_slots` episodes at once on the engine.
  mode: Literal["sync", "async"] = "sync"
  eta: int = 1
  rollout_slots: int = 8
  # Where async tasks run: "thread" (this process) or "ray" (episodes as Ray tasks holding
  # the custom resource katjax_agents; the trainer stays in this process). ray_address ""
  # starts a local Ray instance; "auto" or "ray://host:10001" joins a cluster (README).
  scheduler: Literal["thread", "ray"] = "thread"
  ray_address: str = ""
  loss: LossConfig = LossConfig()
  rft: RFTConfig = RFTConfig()

  def __post_init__(self):
    if self.eta < 0:
      raise ValueError(f"config.rl.eta={self.eta} must be >= 0 (the staleness bound in policy "
                       f"versions; 0 is the synchronous schedule)")
    if self.rollout_slots < 1:
      raise ValueError(f"config.rl.rollout_slots={self.rollout_slots} must be >= 1")
    if self.scheduler == "ray" and self.mode != "async":
      raise ValueError(f"config.rl.scheduler='ray' needs config.rl.mode='async' (the "
                       f"synchronous loop runs in one process), got mode={self.mode!r}")

  def policy_loss(self) -> PolicyLossConfig:
    """The core loss config, with rl.norm as its normalisation (and, in async mode, the
    behaviour weight capped at ASYNC_TIS_CAP unless rl.loss.tis_cap says otherwise)."""
    loss = dataclasses.asdict(self.loss)
    if self.mode == "async" and loss["tis_cap"] is None:
      loss["tis_cap"] = ASYNC_TIS_CAP
    return PolicyLossConfig(**loss, norm=self.norm)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """--stage=serve: checkpoint "" = init_from (or random weights of config.model)."""

  checkpoint: str = ""
  host: str = "127.0.0.1"
  port: int = 8000
  model_name: str = "katjax"
  max_len: int = 0  # 0: the model's own context (stages/serve.py)
  max_batch: int = 16
  max_queue: int = 64
  chunk: int = 32
  duration_s: float = 0.0  # > 0: stop after this many seconds (tests, demos)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """--stage=export: write init_from's params as a Hugging Face folder at `path`."""

  path: str = ""
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (--stage=eval)."""

  num_tasks: int = 64
  seed: int = 0
  temperature: float = 0.0  # 0: greedy
  samples: int = 1  # pass@k
  tasks_file: str = ""  # JSONL of evaluation tasks; "": the generated held-out split


PIPELINE_STAGES = ("base", "mid", "sft", "rft", "rl")  # --stage=all's order


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """--stage=all: which stages run, the BPE it trains, the LM stages' data sizes, and per
  stage its steps (0 leaves the stage out) and peak learning rate."""

  # Comma-separated, in PIPELINE_STAGES order (each stage starts from the one before it);
  # e.g. "base,sft,rl" for a pretrained model that brings its own tokenizer (no mid).
  stages: str = ",".join(PIPELINE_STAGES)
  vocab_size: int = 640
  mid_docs: int = 3000
  sft_episodes: int = 2000
  mid_steps: int = 40
  mid_lr: float = 3e-3
  sft_steps: int = 120
  sft_lr: float = 2e-3
  # SFT loss weight of the answer-bearing tokens (keys and values the expert copies into
  # lookup/submit arguments) relative to the format tokens (1: plain SFT)
  sft_arg_weight: int = 1
  rft_steps: int = 10
  rft_lr: float = 5e-4
  rl_steps: int = 20
  rl_lr: float = 5e-4

  def __post_init__(self):
    self.stage_list()  # a bad list fails when the config is parsed, before anything runs

  def stage_list(self) -> tuple[str, ...]:
    """`stages` as a tuple; ValueError naming an unknown, repeated or misordered stage."""
    names = tuple(s.strip() for s in self.stages.split(","))
    where = f"config.pipeline.stages={self.stages!r}"
    if not self.stages.strip() or "" in names:
      raise ValueError(f"{where}: expected comma-separated stage names from "
                       f"{', '.join(PIPELINE_STAGES)}, with no empty entry")
    unknown = [s for s in names if s not in PIPELINE_STAGES]
    if unknown:
      raise ValueError(f"{where}: unknown stage(s) {unknown}; known: "
                       f"{', '.join(PIPELINE_STAGES)}")
    if len(set(names)) != len(names):
      raise ValueError(f"{where}: a stage is listed twice")
    if list(names) != sorted(names, key=PIPELINE_STAGES.index):
      raise ValueError(f"{where}: stages must keep the order {', '.join(PIPELINE_STAGES)} "
                       f"(each starts from the previous one's params)")
    return names


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole run: what `parse` returns and every stage reads."""

  tokenizer: str = "byte"
  init_from: str = ""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  rl: RLConfig = RLConfig()
  serve: ServeConfig = ServeConfig()
  export: ExportConfig = ExportConfig()
  eval: EvalConfig = EvalConfig()
  pipeline: PipelineConfig = PipelineConfig()


def base_config() -> ml_collections.ConfigDict:
  """The locked ConfigDict of every field at its default; config files start from it.

  optimizer.total_steps is 0 here, which `parse` reads as train.steps (the schedule spans
  the run) until a config sets it.
  """
  c = ml_collections.ConfigDict(_as_dict(RunConfig()))
  c.optimizer.total_steps = 0
  c.lock()
  return c


def parse(config) -> RunConfig:
  """Validate `config` (ConfigDict or dict; missing fields take their defaults) -> RunConfig.

  ValueError naming the field for an unknown name, a value of the wrong type, or a value a
  section rejects (e.g. config.model.n_heads not divisible by n_kv_heads).
  """
  if isinstance(config, RunConfig):
    return config
  run = _build(RunConfig, config, "config")
  if run.optimizer.total_steps == 0:  # the base's "as long as the run"
    run = dataclasses.replace(run, optimizer=dataclasses.replace(
        run.optimizer, total_steps=run.train.steps))
  return run


def section(cls, values, where: str):
  """One section (e.g. RFTConfig) from a ConfigDict / dict, validated like `parse`."""
  if isinstance(values, cls):
    return values
  return _build(cls, values, where)


def to_dict(run: RunConfig) -> dict:
  """RunConfig -> plain nested dict (what checkpoints record)."""
  return _as_dict(run, placeholders=False)


# --- helpers -------------------------------------------------------------------------------


def _as_dict(obj, placeholders: bool = True) -> dict:
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = _as_dict(value, placeholders)
    elif value is None and placeholders:  # typed: settable later to a value of that type
      out[f.name] = ml_collections.config_dict.placeholder(_non_none(_hints(type(obj))[f.name]))
    else:
      out[f.name] = value
  return out


def _build(cls, values, where: str):
  items = dict(values.items()) if hasattr(values, "items") else None
  if items is None:
    raise ValueError(f"{where}: expected a section (a dict of fields), got {values!r}")
  hints = _hints(cls)
  unknown = sorted(set(items) - set(hints))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                     f"known: {sorted(hints)}")
  kwargs = {}
  for name, value in items.items():
    typ, path = hints[name], f"{where}.{name}"
    if isinstance(value, ml_collections.FieldReference):
      value = value.get()
    if dataclasses.is_dataclass(typ):
      kwargs[name] = section(typ, value, path)
      continue
    if not _isinstance(value, typ):
      raise ValueError(f"{path}={value!r}: expected {_type_name(typ)}, got "
                       f"{type(value).__name__}")
    kwargs[name] = float(value) if typ is float else value
  try:
    return cls(**kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: {e}") from e


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _isinstance(value, typ) -> bool:
  origin = typing.get_origin(typ)
  if typ is Any:
    return True
  if typ is type(None):
    return value is None
  if origin in (typing.Union, types.UnionType):
    return any(_isinstance(value, t) for t in typing.get_args(typ))
  if origin is Literal:
    return value in typing.get_args(typ)
  if typ is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if typ is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, typ)


def _non_none(typ):
  args = [t for t in typing.get_args(typ) if t is not type(None)]
  return args[0] if args else typ


def _type_name(typ) -> str:
  if typing.get_origin(typ) is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
  if typing.get_origin(typ) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(t) for t in typing.get_args(typ))
  return "None" if typ is type(None) else getattr(typ, "__name__", str(typ))
