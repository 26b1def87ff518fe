"""Export round-trips: orbax params == safetensors == the checkpoint; the StableHLO decode step and the Hugging Face
Llama folder give the model's logits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax import export
from chimera_jax.models.lm import LM
from chimera_jax.training import checkpointing, loop
from tests.lm_testing import cli, micro_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dense micro LM trained for 2 steps, untied head (so lm_head is exported too)."""
    workdir = str(tmp_path_factory.mktemp("export") / "run")
    c = micro_config(total_steps=2, eval_every=2, checkpoint_every=2, **{"optimizer.warmup_steps": 1})
    c.model.tie_embeddings = False
    loop.train(c, workdir)
    _, params, _ = checkpointing.restore_params(workdir)
    return workdir, c, jax.tree.map(np.asarray, params)


def _tokens(vocab, t=12, b=1, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


def _model_logits(c, params, tokens):
    logits, _ = LM(ml_collections.FrozenConfigDict(c.model)).apply({"params": params}, jnp.asarray(tokens))
    return np.asarray(logits)


def _assert_trees_identical(a, b):
    fa, fb = export.flatten_params(a), export.flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_flatten_unflatten_inverse():
    tree = {"a": {"b": np.arange(3.0), "c": {"kernel": np.ones((2, 2), np.float32)}}, "d": np.int32(4)}
    flat = export.flatten_params(tree)
    assert sorted(flat) == ["a/b", "a/c/kernel", "d"]
    _assert_trees_identical(export.unflatten_params(flat), tree)


def test_orbax_and_safetensors_restore_identical_params(run, tmp_path):
    workdir, c, params = run
    orbax_dir = export.export(workdir, str(tmp_path / "params_orbax"), "orbax")
    st_file = export.export(workdir, str(tmp_path / "model.safetensors"), "safetensors")
    from_orbax, cfg_orbax = export.load_orbax(orbax_dir)
    from_st, cfg_st = export.load_safetensors(st_file)
    _assert_trees_identical(from_orbax, params)
    _assert_trees_identical(from_st, params)
    assert cfg_orbax.model.d_model == cfg_st.model.d_model == c.model.d_model
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(workdir, st_file, "safetensors")


def test_cli_writes_safetensors(run, tmp_path):
    workdir, _, params = run
    out = tmp_path / "cli.safetensors"
    proc = cli("chimera_jax.export", f"--workdir={workdir}", f"--out={out}", "--format=safetensors")
    assert "exported safetensors" in proc.stdout
    _assert_trees_identical(export.load_safetensors(str(out))[0], params)
    bad = cli("chimera_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--format=onnx", check=False)
    assert bad.returncode != 0 and "format" in bad.stderr


def test_stablehlo_decode_step_matches_model_without_model_code(run, tmp_path):
    workdir, c, params = run
    path = export.export(workdir, str(tmp_path / "decode.stablehlo"), "stablehlo", max_len=16)
    tokens = _tokens(c.model.vocab_size)
    expected = _model_logits(c, params, tokens)
    np.save(tmp_path / "tokens.npy", tokens)
    # A fresh process with only jax and numpy: the program must run without chimera_jax.
    script = f"""
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open({path!r}, 'rb').read()))
z = np.load({path + '.init_cache.npz'!r}); cache = [z[f'arr_{{i}}'] for i in range(len(z.files))]
tokens = np.load({str(tmp_path / 'tokens.npy')!r}); out = []
for i in range(tokens.shape[1]):
    logits, cache = exported.call(tokens[:, i:i + 1], cache); out.append(np.asarray(logits))
assert not any(m.startswith('chimera_jax') for m in sys.modules)
np.save({str(tmp_path / 'hlo_logits.npy')!r}, np.stack(out, 1))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "hlo_logits.npy")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    meta = json.load(open(path + ".json"))
    assert meta["logits"] == [1, c.model.vocab_size] and meta["max_len"] == 16


def test_stablehlo_with_params_as_argument(run, tmp_path):
    _, c, params = run
    exported, leaves0 = export.export_decode_step(params, c.model, batch=2, max_len=8, params_as_argument=True)
    reloaded = jax.export.deserialize(exported.serialize())
    tokens = _tokens(c.model.vocab_size, t=5, b=2, seed=1)
    cache, out = leaves0, []
    for i in range(tokens.shape[1]):
        logits, cache = reloaded.call(params, tokens[:, i:i + 1], cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(out, 1), _model_logits(c, params, tokens), atol=1e-4, rtol=1e-4)


def test_hf_llama_layout_and_refusals(run, tmp_path):
    workdir, c, params = run
    out = export.export(workdir, str(tmp_path / "hf"), "hf_llama")
    cfg = json.load(open(os.path.join(out, "config.json")))
    a = c.model.attention
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
           (c.model.d_model, a.num_heads, a.num_kv_heads, a.head_dim)
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert len(tensors) == 2 + 9 * c.model.num_layers + 1  # embed, final norm, per-layer 9, untied lm_head
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.k_proj.weight"],
                                  params["layer_0"]["mixer"]["k_proj"]["kernel"].reshape(c.model.d_model, -1).T)
    # a scanned model's stacked parameters export to the same tensors
    from chimera_jax.models.lm import stack_layers

    scanned = c.copy_and_resolve_references()
    scanned.model.scan_layers = True
    plain, stacked = (export.llama_tensors(params, c.model),
                      export.llama_tensors(stack_layers(params, scanned.model), scanned.model))
    assert sorted(plain) == sorted(stacked)
    for name in plain:
        np.testing.assert_array_equal(stacked[name], plain[name], err_msg=name)
    griffin = micro_config("griffin")
    with pytest.raises(ValueError, match="model.pattern"):
        export.llama_tensors({}, griffin.model)
    scaled = micro_config()
    scaled.model.attention.rope_scaling_factor = 4.0
    assert export.llama_rope_theta(scaled.model) == pytest.approx(10_000.0 * 4.0 ** (16 / 14))


def _hf_logits(folder, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("tied,scaling", [(False, 1.0), (True, 2.0)])
def test_hf_llama_logits_match_transformers(run, tmp_path, tied, scaling):
    """Needs torch + transformers (not in requirements-dev.txt: PyPI's torch pulls GBs of CUDA wheels)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, c, params = run
    c = c.copy_and_resolve_references()
    params = dict(params)
    if tied:
        c.model.tie_embeddings = True
        params.pop("lm_head")
    c.model.attention.rope_scaling_factor = scaling
    out = export.export_hf_llama(params, c, str(tmp_path / "hf"))
    tokens = _tokens(c.model.vocab_size, t=24, b=2, seed=2)
    np.testing.assert_allclose(_hf_logits(out, tokens), _model_logits(c, params, tokens), atol=1e-4, rtol=0)
