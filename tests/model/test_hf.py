"""HF checkpoints: logits parity with transformers (torch CPU), to_hf round trip, sharded
loading onto a mesh, and one clear error per bad folder with nothing allocated."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from katjax import model  # noqa: E402
from katjax.model import hf  # noqa: E402

torch.set_num_threads(1)

# Odd shapes on purpose: GQA ratio 3, head_dim != d_model / n_heads, tied and untied
# embeddings, rope_theta 1e6, Llama 3.1 rope scaling.
CASES = {
    "llama": (transformers.LlamaConfig, dict(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, intermediate_size=80, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3_scaled_tied": (transformers.LlamaConfig, dict(
        vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=True,
        rope_theta=5e5, max_position_embeddings=64,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen2": (transformers.Qwen2Config, dict(
        vocab_size=72, hidden_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=10, intermediate_size=56, rope_theta=1e6,
        tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(
        vocab_size=88, hidden_size=32, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=12, intermediate_size=48, rope_theta=1e6,
        tie_word_embeddings=False)),
}


def make_hf_model(name, seed=0):
  """A transformers model with weights large enough that logits are O(1), not O(0.01)."""
  cls, kw = CASES[name]
  torch.manual_seed(seed)
  arch = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
          "qwen3": transformers.Qwen3ForCausalLM}[cls.model_type]
  m = arch(cls(**kw)).float().eval()
  with torch.no_grad():
    for pname, p in m.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p) / max(1.0, p.shape[-1] ** 0.5) * 4)
  return m


def hf_logits(m, tokens):
  with torch.no_grad():
    return m(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each case saved with save_pretrained once: {name: (folder, hf model)}."""
  out = {}
  for name in CASES:
    m = make_hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    m.save_pretrained(folder)
    out[name] = (str(folder), m)
  return out


def random_tokens(vocab, seed=0, shape=(2, 11)):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_logits_match_transformers(name, saved):
  folder, m = saved[name]
  cfg, params = hf.from_hf(folder)
  assert cfg.family == CASES[name][0].model_type
  tokens = random_tokens(cfg.vocab_size)
  ref = hf_logits(m, tokens)
  assert np.abs(ref).max() > 0.5  # logits are not trivially small
  ours = np.asarray(model.apply(cfg, params, tokens))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_to_hf_round_trip_through_transformers(name, saved, tmp_path):
  folder, m = saved[name]
  cfg, params = hf.from_hf(folder)
  hf.to_hf(cfg, params, tmp_path / "out", max_shard_bytes=20_000)  # forces several shards
  assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", dtype=torch.float32).eval()
  tokens = random_tokens(cfg.vocab_size, seed=1)
  np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(m, tokens), atol=1e-5,
                             rtol=0)
  cfg2, params2 = hf.from_hf(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_export_loads(saved, tmp_path):
  folder, m = saved["qwen3"]
  cfg, params = hf.from_hf(folder)
  hf.to_hf(cfg, params, tmp_path / "bf16", dtype="bfloat16")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
  assert next(reloaded.parameters()).dtype == torch.bfloat16
  cfg2, params2 = hf.from_hf(tmp_path / "bf16")
  err = np.abs(np.asarray(params2["layers"]["mlp"]["up"]["kernel"]) -
               np.asarray(params["layers"]["mlp"]["up"]["kernel"])).max()
  assert 0 < err < 1e-2


def test_sharded_load_onto_mesh(saved, tmp_path):
  """Loading into a mesh: each leaf has the logical-axis sharding and the same values."""
  from katjax import parallel
  folder, _ = saved["llama"]
  cfg, ref = hf.from_hf(folder)
  hf.to_hf(cfg, ref, tmp_path / "sh", max_shard_bytes=30_000)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  cfg2, params = hf.from_hf(tmp_path / "sh", mesh=mesh)
  want = parallel.param_shardings(model.logical_axes(cfg), model.param_shapes(cfg), mesh)
  q = params["layers"]["attn"]["q"]["kernel"]
  assert q.sharding == want["layers"]["attn"]["q"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.sharding.spec != jax.sharding.PartitionSpec()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, ref)


def test_slice_reader_matches_full_transform():
  """_read_slice on every sub-block equals slicing the fully transformed tensor."""
  rng = np.random.default_rng(0)
  h, dh, d = 3, 4, 5
  w = rng.normal(size=(h * dh, d)).astype(np.float32)
  full = w.reshape(h, dh, d).transpose(2, 0, 1)
  read = lambda name, idx: w[idx]  # noqa: E731
  for idx in [(slice(1, 4), slice(0, 2), slice(2, 4)), (slice(None),) * 3,
              (slice(0, 5), slice(2, 3), slice(0, 1))]:
    got = hf._read_slice(read, "w", idx, (h * dh, d), (h, dh, d), (2, 0, 1))
    np.testing.assert_array_equal(got, full[idx])


# --- bad input: one clear error each, nothing allocated ------------------------------------


def _copy(folder, dst):
  import shutil
  shutil.copytree(folder, dst)
  return dst


def _assert_fails_cleanly(path, match):
  before = len(jax.live_arrays())
  with pytest.raises(ValueError, match=match):
    hf.from_hf(path)
  assert len(jax.live_arrays()) == before


def test_unsupported_architecture(saved, tmp_path):
  folder = _copy(saved["llama"][0], tmp_path / "m")
  cfg = json.loads((folder / "config.json").read_text())
  cfg["architectures"] = ["MixtralForCausalLM"]
  (folder / "config.json").write_text(json.dumps(cfg))
  _assert_fails_cleanly(folder, "unsupported architecture.*Mixtral")


def test_missing_shard(saved, tmp_path):
  folder, _ = saved["qwen2"]
  cfg, params = hf.from_hf(folder)
  out = tmp_path / "m"
  hf.to_hf(cfg, params, out, max_shard_bytes=20_000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  os.remove(out / shards[1])
  _assert_fails_cleanly(out, f"missing shard.*{shards[1]}")


def test_dtype_mismatch(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = _copy(saved["qwen3"][0], tmp_path / "m")
  tensors = load_file(folder / "model.safetensors")
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name].astype(np.float16)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  _assert_fails_cleanly(folder, "dtype mismatch.*up_proj")
  tensors[name] = tensors[name].astype(np.int8)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  _assert_fails_cleanly(folder, "up_proj.*I8.*quantised")


def test_tokenizer_vocab_larger_than_model(saved, tmp_path):
  import tokenizers
  folder = _copy(saved["qwen3"][0], tmp_path / "m")
  big = {f"w{i}": i for i in range(200)}  # model vocab is 88
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(big, unk_token="w0"))
  tok.save(str(folder / "tokenizer.json"))
  _assert_fails_cleanly(folder, "tokenizer vocab_size 200 exceeds the model's vocab_size 88")


def test_missing_tensor_and_bad_shape(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = _copy(saved["llama"][0], tmp_path / "m")
  tensors = load_file(folder / "model.safetensors")
  tensors.pop("model.layers.1.self_attn.k_proj.weight")
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  _assert_fails_cleanly(folder, "layers.1.self_attn.k_proj.weight.*missing")
  folder = _copy(saved["llama"][0], tmp_path / "m2")
  cfg = json.loads((folder / "config.json").read_text())
  cfg["intermediate_size"] = 81
  (folder / "config.json").write_text(json.dumps(cfg))
  _assert_fails_cleanly(folder, "shape")
