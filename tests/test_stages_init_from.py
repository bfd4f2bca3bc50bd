"""`config.init_from`: SFT starts from a Hugging Face folder; resume wins; mismatches name the field."""

import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest

from katjax import model as km

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(init_from, steps=2):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.init_from = init_from
  c.data.seq_len, c.data.batch_size = 128, 8
  c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, 0
  c.train.checkpoint_every, c.train.async_checkpoint = 1, False
  c.optimizer.warmup_steps = 1
  return c


def _saved_model(c, path):
  """Random params unlike the run's own init (other seed, larger scale), written as HF."""
  from katjax.model.hf import to_hf
  from katjax.train.loop import model_config
  cfg = model_config(c)
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, km.init(cfg, jax.random.PRNGKey(123)))
  to_hf(cfg, params, path)
  return cfg, params


def _first_batch(c, workdir):
  # The batch the run's step 1 trains on: same files, tokenizer and shuffling seed.
  from katjax.data import load_sft
  from katjax.data.pipeline import batch_dataset, make_iterator
  from katjax.stages.common import data_files, make_tokenizer
  train_path, _ = data_files(c, workdir, "sft")
  data = load_sft(train_path, make_tokenizer(c), c.data.seq_len, on_error=c.data.on_error)
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


def test_sft_starts_from_the_hf_folder_and_resume_does_not_reload_it(tmp_path):
  from katjax.stages import sft
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  c = _tiny_config(hf_dir)
  cfg, saved = _saved_model(c, hf_dir)
  summary = sft.run(c, workdir)
  assert summary["start_step"] == 0 and sorted(summary["losses"]) == [1, 2]
  # Step 1's loss is the loss of the step-0 params: the saved ones, not a fresh init.
  want = _weighted_nll(cfg, saved, _first_batch(c, workdir))
  fresh = _weighted_nll(cfg, km.init(cfg, jax.random.PRNGKey(0)), _first_batch(c, workdir))
  assert abs(want - fresh) > 0.1  # the check below can tell the two apart
  np.testing.assert_allclose(summary["losses"][1], want, rtol=1e-5)

  # Resuming must restore the checkpoint, never read the HF folder again: remove it.
  shutil.rmtree(hf_dir)
  resumed = sft.run(_tiny_config(hf_dir, steps=3), workdir)
  assert resumed["start_step"] == 2 and sorted(resumed["losses"]) == [3]


def test_init_from_with_another_architecture_names_the_field(tmp_path):
  from katjax.stages import sft
  hf_dir = str(tmp_path / "hf")
  _saved_model(_tiny_config(hf_dir), hf_dir)
  c = _tiny_config(hf_dir)
  c.model.ffn_dim = 256
  with pytest.raises(ValueError, match=r"config\.model\.ffn_dim=256 but the checkpoint has 128"):
    sft.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def test_init_from_without_a_config_json_is_a_clear_error(tmp_path):
  from katjax.stages import sft
  with pytest.raises(ValueError, match="has no config.json"):
    sft.run(_tiny_config(str(tmp_path / "missing")), str(tmp_path / "run"))
