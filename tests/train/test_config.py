"""The config schema: every config file parses; a misspelt or mistyped field in any section
is an error naming it, whether written in a config file, given as a dict or overridden."""

import dataclasses
import importlib.util
import os

import ml_collections
import pytest

from katjax.train import config as schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))

# One field of each section (nested ones too) and a value of the wrong type for it.
FIELDS = {"model": ("d_model", "wide"), "data": ("seq_len", 1.5), "optimizer": ("b1", "x"),
          "train": ("steps", "ten"), "mesh": ("fsdp", 2.0), "rl": ("temperature", "hot"),
          "rl.loss": ("eps_low", "low"), "rl.rft": ("monitor", "yes"),
          "serve": ("port", "80"), "export": ("path", 3), "eval": ("samples", "1"),
          "pipeline": ("sft_steps", "many")}


def load(name, *variant):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                   f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(*variant)


def _section(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


def test_every_section_is_declared():
  assert {f.name for f in dataclasses.fields(schema.RunConfig)} == {
      "tokenizer", "init_from", "model", "data", "optimizer", "train", "mesh", "rl", "serve",
      "export", "eval", "pipeline"}
  # Every section with fields appears in FIELDS: the tests below cover each of them.
  sections = {k.split(".")[0] for k in FIELDS}
  assert sections == {f.name for f in dataclasses.fields(schema.RunConfig)
                      if dataclasses.is_dataclass(f.default)}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_parses_from_the_base(name):
  c = load(name)
  run = schema.parse(c)
  assert run.optimizer.total_steps == run.train.steps  # the schedule follows the run length
  # Built from the base: every declared field is present, nothing else.
  assert set(c.keys()) == {f.name for f in dataclasses.fields(schema.RunConfig)}
  assert set(c.rl.rft.keys()) == {f.name for f in dataclasses.fields(schema.RFTConfig)}


def test_total_steps_follows_train_steps_until_set():
  c = load("tiny")
  c.train.steps = 7
  assert schema.parse(c).optimizer.total_steps == 7
  c.optimizer.total_steps = 11
  assert schema.parse(c).optimizer.total_steps == 11 and schema.parse(c).train.steps == 7


@pytest.mark.parametrize("where", sorted(FIELDS))
def test_misspelt_field_is_an_error_naming_it(where):
  field, _ = FIELDS[where]
  # In a config file (the locked base): the assignment itself fails.
  with pytest.raises(AttributeError, match=field + "z"):
    setattr(_section(load("rft_tiny"), where), field + "z", 1)
  # In a plain dict / unlocked ConfigDict: parse names the full path.
  raw = load("rft_tiny").to_dict()
  _section(raw, where)[field + "z"] = 1
  with pytest.raises(ValueError, match=rf"config\.{where}\.{field}z"):
    schema.parse(ml_collections.ConfigDict(raw))


@pytest.mark.parametrize("where", sorted(FIELDS))
def test_mistyped_field_is_an_error_naming_it(where):
  field, bad = FIELDS[where]
  raw = load("rft_tiny").to_dict()
  _section(raw, where)[field] = bad
  with pytest.raises(ValueError, match=rf"config\.{where}\.{field}={bad!r}: expected"):
    schema.parse(raw)
  # The locked ConfigDict refuses the value where it is set (config files, --config.x=y).
  with pytest.raises(TypeError, match=field):
    setattr(_section(load("rft_tiny"), where), field, bad)


def test_unknown_top_level_field_and_section_checks():
  with pytest.raises(ValueError, match=r"config\.init_frm"):
    schema.parse({"init_frm": "x"})
  with pytest.raises(ValueError, match=r"config\.rl\.norm='mean': expected one of"):
    schema.parse({"rl": {"norm": "mean"}})
  with pytest.raises(ValueError, match=r"config\.model: .*n_kv_heads"):
    schema.parse({"model": {"n_heads": 4, "n_kv_heads": 3}})
  with pytest.raises(ValueError, match=r"config\.mesh: config\.mesh\.sequence=0 must be"):
    schema.parse({"mesh": {"sequence": 0}})
  assert schema.parse({"mesh": {"sequence": 4}}).mesh.sequence == 4


def test_typed_placeholders_take_values_of_their_type():
  c = load("tiny")
  assert schema.parse(c).model.head_dim is None
  c.model.head_dim = 32
  c.rl.loss.dual_clip = 3.0
  run = schema.parse(c)
  assert run.model.head_dim == 32 and run.rl.policy_loss().dual_clip == 3.0
  assert run.rl.policy_loss().norm == run.rl.norm


@pytest.mark.parametrize("stages, error", [
    ("base,midd,sft", r"unknown stage\(s\) \['midd'\]"),
    ("base,sft,sft", "listed twice"),
    ("sft,base", "must keep the order"),
    ("base,,rl", "no empty entry"),
    ("", "no empty entry"),
])
def test_pipeline_stage_list_errors_name_the_problem(stages, error):
  c = load("pipeline_tiny")
  c.pipeline.stages = stages
  with pytest.raises(ValueError, match=rf"config\.pipeline\.stages={stages!r}: .*{error}"):
    schema.parse(c)


def test_pipeline_stage_lists():
  assert schema.parse(load("pipeline_tiny")).pipeline.stage_list() == (
      "base", "mid", "sft", "rft", "rl")
  c = load("pipeline_tiny")
  c.pipeline.stages = " sft, rl"  # spaces allowed; base may be left out
  assert schema.parse(c).pipeline.stage_list() == ("sft", "rl")
  # The SmolLM2 pipeline (`--config=configs/smollm2_135m.py:pipeline`): no BPE, no mid.
  smol = schema.parse(load("smollm2_135m", "pipeline"))
  assert smol.pipeline.stage_list() == ("base", "sft", "rl")
  assert smol.tokenizer == "" and smol.rl.env == "lookup" and smol.model.dtype == "float32"
  with pytest.raises(ValueError, match="unknown variant 'pipe'"):
    load("smollm2_135m", "pipe")


def test_async_mode_caps_the_behaviour_weight_unless_told_otherwise():
  """rl.loss.tis_cap None: off in sync mode, ASYNC_TIS_CAP in async mode (the decoupled
  objective's capped weight); a set value is used in both."""
  def loss(mode, cap=None):
    c = schema.base_config()
    c.rl.mode = mode
    if cap is not None:
      c.rl.loss.tis_cap = cap
    return schema.parse(c).rl.policy_loss()
  assert loss("sync").tis_cap is None
  assert loss("async").tis_cap == schema.ASYNC_TIS_CAP == 2.0
  assert loss("async", 5.0).tis_cap == loss("sync", 5.0).tis_cap == 5.0
