"""Stage chaining through `config.init_from`: SFT starts from a Hugging Face folder, RL from
SFT's workdir (its exact params, a fresh optimizer), `--stage=export` writes a folder that
`transformers` runs with our logits; resume wins; bad sources are errors naming the problem.

One SFT run (module fixture) is the source of every test here.
"""

import importlib.util
import os
import shutil
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from katjax import model as km
from katjax.train.config import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"configs/{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _tiny_config(init_from, steps=2):
  c = _load("tiny")
  c.init_from = init_from
  c.data.seq_len, c.data.batch_size = 128, 8
  c.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=1,
                 async_checkpoint=False)
  c.optimizer.warmup_steps = 1
  return c


def _rl_config(init_from, steps=0):
  c = _load("rl_tiny")
  c.init_from, c.tokenizer = init_from, ""  # "": the tokenizer the source recorded
  c.train.steps = steps
  c.optimizer.total_steps = 4  # steps=0 would leave the schedule no length
  c.mesh.update(data=1, fsdp=1, tensor=-1)
  return c


def _saved_model(c, path):
  """Random params unlike the run's own init (other seed, larger scale), written as HF."""
  from katjax.model.hf import to_hf
  cfg = parse(c).model
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, km.init(cfg, jax.random.PRNGKey(123)))
  to_hf(cfg, params, path)
  return cfg, params


def _checkpoint_state(workdir):
  """The latest saved TrainState tree, read by orbax alone (no katjax code)."""
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  return step, ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """SFT for 2 steps from a HF folder: the source stage of every test in this module."""
  from katjax.stages import sft
  root = tmp_path_factory.mktemp("chain")
  hf_dir, workdir = str(root / "hf"), str(root / "sft")
  c = _tiny_config(hf_dir)
  cfg, saved = _saved_model(c, hf_dir)
  summary = sft.run(c, workdir)
  return types.SimpleNamespace(config=c, cfg=cfg, saved=saved, summary=summary,
                               workdir=workdir, hf_dir=hf_dir)


def _first_batch(c, workdir):
  # The batch the run's step 1 trains on: same files, tokenizer and shuffling seed.
  from katjax.data import load_sft
  from katjax.data.pipeline import batch_dataset, make_iterator
  from katjax.model.tokenizer import ByteTokenizer
  from katjax.stages.common import data_files
  train_path, _ = data_files(c, workdir, "sft")
  data = load_sft(train_path, ByteTokenizer(), c.data.seq_len, on_error=c.data.on_error)
  return next(make_iterator(batch_dataset(data, c.data.batch_size, seed=c.data.seed)))


def _weighted_nll(cfg, params, batch):
  """Mean NLL over weighted targets, log-softmax in float64 NumPy on katjax's logits."""
  logits = np.asarray(km.apply(cfg, params, batch["tokens"], batch["positions"],
                               batch["subtree_end"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  w = np.asarray(batch["weights"], np.float64)
  return float(-(w * picked).sum() / w.sum())


def test_sft_starts_from_the_hf_folder(sft_run):
  c, cfg, summary = sft_run.config, sft_run.cfg, sft_run.summary
  assert summary["start_step"] == 0 and sorted(summary["losses"]) == [1, 2]
  # Step 1's loss is the loss of the step-0 params: the saved ones, not a fresh init.
  batch = _first_batch(c, sft_run.workdir)
  want = _weighted_nll(cfg, sft_run.saved, batch)
  fresh = _weighted_nll(cfg, km.init(cfg, jax.random.PRNGKey(0)), batch)
  assert abs(want - fresh) > 0.1  # the check below can tell the two apart
  np.testing.assert_allclose(summary["losses"][1], want, rtol=1e-5)


def test_resume_does_not_reload_init_from(sft_run, tmp_path):
  # Resuming must restore the checkpoint, never read init_from again: point it nowhere.
  from katjax.stages import sft
  workdir = str(tmp_path / "run")
  shutil.copytree(sft_run.workdir, workdir)
  resumed = sft.run(_tiny_config(str(tmp_path / "gone"), steps=3), workdir)
  assert resumed["start_step"] == 2 and sorted(resumed["losses"]) == [3]


def test_rl_starts_from_the_sft_params_exactly(sft_run, tmp_path):
  from katjax.model.tokenizer import ByteTokenizer
  from katjax.stages import rl
  from katjax.stages.common import make_tokenizer
  step, saved = _checkpoint_state(sft_run.workdir)
  assert step == 2
  c = _rl_config(sft_run.workdir)
  state = rl.train_rl(c, str(tmp_path / "rl"), verbose=False)["state"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved["params"])
  # Params only: step 0 and a fresh optimizer (SFT's moments after 2 steps are not zero).
  assert int(state.step) == 0
  moments = [np.asarray(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  saved_moments = [np.asarray(x) for x in jax.tree.leaves(saved["opt_state"])
                   if np.ndim(x) > 0]
  assert len(moments) == len(saved_moments) > 0
  assert all(not m.any() for m in moments) and any(m.any() for m in saved_moments)
  # The tokenizer travelled: SFT's checkpoint recorded "byte".
  assert isinstance(make_tokenizer(c), ByteTokenizer)


def test_export_round_trip_matches_transformers(sft_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from katjax.model.hf import from_hf
  from katjax.model.tokenizer import ByteTokenizer, Tokenizer
  from katjax.stages import export
  out = str(tmp_path / "hf")
  c = _load("tiny")  # the workdir's recorded architecture and tokenizer win
  c.init_from, c.export.path = sft_run.workdir, out
  export.run(c, str(tmp_path / "x"))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  _, saved = _checkpoint_state(sft_run.workdir)
  tokens = np.random.default_rng(0).integers(0, sft_run.cfg.vocab_size, (2, 13)).astype(np.int32)
  ours = np.asarray(km.apply(sft_run.cfg, saved["params"], tokens))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  assert np.abs(ours).max() > 0.5
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  cfg2, params2 = from_hf(out)
  jax.tree.map(np.testing.assert_array_equal, params2, saved["params"])
  np.testing.assert_array_equal(np.asarray(km.apply(cfg2, params2, tokens)), ours)
  # tokenizer.json encodes a chat exactly as the ByteTokenizer the run trained with.
  messages = [{"role": "system", "content": "h\u00e9llo \U0001F600\n"},
              {"role": "user", "content": "2+3?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "c", "type": "function",
                   "function": {"name": "submit", "arguments": "{\"answer\": \"5\"}"}}]}]
  ids, mask = Tokenizer.from_file(out).encode_chat(messages)
  want_ids, want_mask = ByteTokenizer().encode_chat(messages)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)


def test_init_from_a_workdir_without_a_checkpoint_is_a_clear_error(tmp_path):
  from katjax.stages import rl
  empty = tmp_path / "empty"
  (empty / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # killed mid-save
  with pytest.raises(ValueError, match="is a workdir with no complete checkpoint"):
    rl.train_rl(_rl_config(str(empty), steps=1), str(tmp_path / "rl"), verbose=False)
  with pytest.raises(ValueError, match="does not exist"):
    rl.train_rl(_rl_config(str(tmp_path / "nowhere"), steps=1), str(tmp_path / "rl2"),
                verbose=False)


def test_init_from_a_model_of_another_shape_names_the_field(sft_run, tmp_path):
  from katjax.stages import rl, sft
  c = _rl_config(sft_run.workdir, steps=1)
  c.model.ffn_dim = 256
  with pytest.raises(ValueError, match=r"config\.model\.ffn_dim=256 but the checkpoint has 128"):
    rl.train_rl(c, str(tmp_path / "rl"), verbose=False)
  # The same check for a HF folder source, before any checkpoint is written.
  c = _tiny_config(sft_run.hf_dir)
  c.model.n_layers = 3
  with pytest.raises(ValueError, match=r"config\.model\.n_layers=3 but the checkpoint has 2"):
    sft.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def test_init_from_without_a_config_json_is_a_clear_error(tmp_path):
  from katjax.stages import sft
  (tmp_path / "notamodel").mkdir()
  with pytest.raises(ValueError, match="has no config.json"):
    sft.run(_tiny_config(str(tmp_path / "notamodel")), str(tmp_path / "run"))


def test_empty_tokenizer_needs_a_source():
  from katjax.stages.common import make_tokenizer
  c = _load("tiny")
  c.tokenizer = ""
  with pytest.raises(ValueError, match=r'config\.tokenizer="" means .*init_from is empty'):
    make_tokenizer(c)
