"""Export a trained LM for serving or for other frameworks.

    python -m chimera_jax.export --workdir=DIR --out=PATH --format=orbax|safetensors|hf_llama|stablehlo

orbax        PATH/ holds params/ (a params-only orbax checkpoint: no optimizer state) and config.json.
safetensors  PATH is one .safetensors file: the param tree flattened with '/'-joined keys
             ('layer_0/mixer/q_proj/kernel'), the run's resolved config and step in the file's metadata.
hf_llama     PATH/ holds config.json + model.safetensors in Hugging Face Llama layout (dense preset only: every
             layer 'A' with RoPE, SwiGLU, no MoE, no ternary). RoPE: chimera_jax rotates the two halves of each
             head ([first half, second half], the rotate-half convention), as HF Llama does, so q/k rows need no
             permutation; GQA: query head i reads kv head i // (h / g) in both. A static NTK scaling factor is
             folded into rope_theta (it only changes the base).
stablehlo    PATH is a serialized ``jax.export`` of one decode step with the weights inside:
             (tokens [b 1] int32, cache leaves) -> (logits [b v] float32, new cache leaves). PATH.init_cache.npz
             holds the empty cache's leaves (arr_0, arr_1, ... in order) and PATH.json describes the shapes. It
             reloads with ``jax.export.deserialize`` and runs with no chimera_jax code (see ``run_stablehlo``).
             --stablehlo_params=argument instead takes the param tree as a first argument (for large models).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax import config_lib

FORMATS = ("orbax", "safetensors", "hf_llama", "stablehlo")


# ------------------------------------------------------------------------------------------ param trees

def flatten_params(params) -> dict[str, np.ndarray]:
    """Nested param dict -> {'a/b/kernel': array} (host numpy, contiguous)."""
    out = {}

    def walk(node, prefix):
        if hasattr(node, "items"):
            for k, v in node.items():
                if "/" in str(k):
                    raise ValueError(f"param name {k!r} under {prefix or '<root>'!r} contains '/'")
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = np.ascontiguousarray(np.asarray(jax.device_get(node)))

    walk(params, "")
    return out


def unflatten_params(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *path, last = key.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def load_run(workdir: str, step: int | None = None):
    """(config, step, params) of a workdir made by train.py."""
    from chimera_jax.training import checkpointing

    config = config_lib.load_resolved(workdir)
    step, params, model_state = checkpointing.restore_params(workdir, step)
    if model_state:
        raise ValueError(f"{workdir}: the model has non-param state {sorted(model_state)}; export handles params only")
    return config, step, jax.tree.map(np.asarray, params)


def _prepare_out(out: str, overwrite: bool, is_dir: bool) -> str:
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    os.makedirs(out if is_dir else os.path.dirname(out), exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------- orbax

def export_orbax(params, config, out: str, *, overwrite: bool = False) -> str:
    import orbax.checkpoint as ocp

    out = _prepare_out(out, overwrite, is_dir=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    return out


def load_orbax(path: str):
    """(params as numpy, config) of an ``export_orbax`` directory."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    return jax.tree.map(np.asarray, params), config_lib.load_resolved(path)


# ----------------------------------------------------------------------------------------- safetensors

def export_safetensors(params, config, out: str, *, step: int | None = None, overwrite: bool = False) -> str:
    from safetensors.numpy import save_file

    out = _prepare_out(out, overwrite, is_dir=False)
    metadata = {"format": "chimera_jax", "config": config_lib.to_json(config), "step": str(step)}
    save_file(flatten_params(params), out, metadata=metadata)
    return out


def load_safetensors(path: str):
    """(params as numpy, config or None) of an ``export_safetensors`` file."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    config = ml_collections.ConfigDict(json.loads(metadata["config"])) if "config" in metadata else None
    return unflatten_params(load_file(path)), config


# ------------------------------------------------------------------------------------- HF Llama layout

def check_llama_compatible(model_cfg) -> None:
    """Raises naming the first field that a Llama checkpoint cannot express."""
    from chimera_jax.layers import registry

    codes = set(registry.parse_pattern(model_cfg.pattern, model_cfg.num_layers))
    a = model_cfg.attention
    problems = []
    if codes != {"A"}:
        problems.append(f"model.pattern={model_cfg.pattern!r} (Llama has full attention 'A' layers only)")
    if model_cfg.ffn != "swiglu":
        problems.append(f"model.ffn={model_cfg.ffn!r} (Llama uses 'swiglu')")
    if model_cfg.get("moe_every", 0):
        problems.append(f"model.moe_every={model_cfg.moe_every} (Llama has no MoE)")
    if model_cfg.get("ternary", False):
        problems.append("model.ternary=True (Llama weights are dense floats)")
    if a.position != "rope":
        problems.append(f"model.attention.position={a.position!r} (Llama uses 'rope')")
    if a.window:
        problems.append(f"model.attention.window={a.window} (Llama attention is global)")
    if problems:
        raise ValueError("the hf_llama format needs the dense preset; this model has " + "; ".join(problems))


def llama_rope_theta(model_cfg) -> float:
    """The RoPE base HF should use: NTK-aware scaling is a change of base (layers/positions.py)."""
    a = model_cfg.attention
    s, k = a.rope_scaling_factor, a.head_dim
    return float(a.rope_theta * s ** (k / (k - 2))) if s > 1.0 else float(a.rope_theta)


def llama_config(model_cfg, *, bos_id: int, eos_id: int, max_positions: int) -> dict:
    a = model_cfg.attention
    theta = llama_rope_theta(model_cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(model_cfg.vocab_size), "hidden_size": int(model_cfg.d_model),
        "intermediate_size": int(model_cfg.ffn_dim), "num_hidden_layers": int(model_cfg.num_layers),
        "num_attention_heads": int(a.num_heads), "num_key_value_heads": int(a.num_kv_heads),
        "head_dim": int(a.head_dim), "hidden_act": "silu", "rms_norm_eps": float(model_cfg.norm_eps),
        "max_position_embeddings": int(max_positions), "initializer_range": float(model_cfg.get("init_std", 0.02)),
        # Older readers take rope_theta, newer ones rope_parameters: both say the same plain RoPE.
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings), "bos_token_id": int(bos_id),
        "eos_token_id": int(eos_id), "torch_dtype": "float32", "use_cache": True,
    }


def llama_tensors(params, model_cfg) -> dict[str, np.ndarray]:
    """chimera_jax params -> HF Llama state-dict names and layouts (torch Linear weights are [out, in])."""
    check_llama_compatible(model_cfg)
    if model_cfg.get("scan_layers", False):  # stacked repeats -> the per-layer layout the names below index
        from chimera_jax.models.lm import unstack_layers

        params = unstack_layers(params, model_cfg)
    a = model_cfg.attention
    d, h, g, k = model_cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
    t = {"model.embed_tokens.weight": params["embedding"]}  # [v d]
    for i in range(model_cfg.num_layers):
        p = params[f"layer_{i}"]
        att, ffn = p["mixer"], p["ffn"]
        pre = f"model.layers.{i}."
        # [d h k] -> [h*k, d]: rows head-major, each head's rows in chimera_jax's (= HF's) rotate-half order.
        t[pre + "self_attn.q_proj.weight"] = att["q_proj"]["kernel"].reshape(d, h * k).T
        t[pre + "self_attn.k_proj.weight"] = att["k_proj"]["kernel"].reshape(d, g * k).T
        t[pre + "self_attn.v_proj.weight"] = att["v_proj"]["kernel"].reshape(d, g * k).T
        t[pre + "self_attn.o_proj.weight"] = att["o_proj"]["kernel"].T  # [h*k d] -> [d h*k]
        t[pre + "mlp.gate_proj.weight"] = ffn["gate_proj"]["kernel"].T  # [d f] -> [f d]
        t[pre + "mlp.up_proj.weight"] = ffn["up_proj"]["kernel"].T
        t[pre + "mlp.down_proj.weight"] = ffn["down_proj"]["kernel"].T  # [f d] -> [d f]
        t[pre + "input_layernorm.weight"] = p["mixer_norm"]["scale"]
        t[pre + "post_attention_layernorm.weight"] = p["ffn_norm"]["scale"]
    t["model.norm.weight"] = params["final_norm"]["scale"]
    if not model_cfg.tie_embeddings:
        t["lm_head.weight"] = params["lm_head"]["kernel"].T  # [d v] -> [v d]
    return {name: np.ascontiguousarray(np.asarray(x, np.float32)) for name, x in t.items()}


def export_hf_llama(params, config, out: str, *, overwrite: bool = False) -> str:
    from safetensors.numpy import save_file

    from chimera_jax.data import tokenizers

    model_cfg = config.model
    tensors = llama_tensors(params, model_cfg)
    if config.data.tokenizer == "bytes":
        bos, eos = tokenizers.ByteTokenizer.bos_id, tokenizers.ByteTokenizer.eos_id
    else:
        bos, eos = 2, 3  # the ids data/tokenizers.py gives a SentencePiece model it trains
    out = _prepare_out(out, overwrite, is_dir=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(llama_config(model_cfg, bos_id=bos, eos_id=eos,
                               max_positions=max(int(config.data.seq_len), 2048)), f, indent=2)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------------------------ StableHLO decode step

def export_decode_step(params, model_cfg, *, batch: int = 1, max_len: int = 256, platforms=None,
                       params_as_argument: bool = False):
    """(jax.export.Exported of one decode step, the empty cache's leaves)."""
    from chimera_jax.models.lm import LM

    model_cfg = ml_collections.FrozenConfigDict(model_cfg)
    model = LM(model_cfg)
    cache0 = model.init_cache(batch, max_len)
    leaves0, treedef = jax.tree.flatten(cache0)
    params = jax.tree.map(jnp.asarray, params)

    def step_with(p, tokens, cache_leaves):
        cache = jax.tree.unflatten(treedef, list(cache_leaves))
        logits, new_cache = model.apply({"params": p}, tokens, cache=cache, decode=True)
        return logits[:, -1], jax.tree.leaves(new_cache)  # [b v], leaves in the same order

    tok_spec = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves0]
    platforms = tuple(platforms or (jax.default_backend(),))
    if params_as_argument:
        p_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        exported = jax.export.export(jax.jit(step_with), platforms=platforms)(p_specs, tok_spec, leaf_specs)
    else:
        exported = jax.export.export(jax.jit(lambda tokens, leaves: step_with(params, tokens, leaves)),
                                     platforms=platforms)(tok_spec, leaf_specs)
    return exported, [np.asarray(x) for x in leaves0]


def export_stablehlo(params, config, out: str, *, batch: int = 1, max_len: int | None = None, platforms=None,
                     params_as_argument: bool = False, overwrite: bool = False) -> str:
    max_len = max_len or int(config.data.seq_len)
    exported, leaves0 = export_decode_step(params, config.model, batch=batch, max_len=max_len,
                                           platforms=platforms, params_as_argument=params_as_argument)
    out = _prepare_out(out, overwrite, is_dir=False)
    with open(out, "wb") as f:
        f.write(exported.serialize())
    np.savez(out + ".init_cache.npz", *leaves0)
    meta = {"function": ("(params, tokens, cache_leaves)" if params_as_argument else "(tokens, cache_leaves)")
            + " -> (logits, new_cache_leaves)",
            "tokens": [batch, 1], "logits": [batch, int(config.model.vocab_size)], "max_len": max_len,
            "platforms": list(exported.platforms), "params_as_argument": params_as_argument,
            "cache_leaves": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in leaves0],
            "note": "decode positions continue from the cache; max_len tokens in all (prompt included)"}
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    return out


def run_stablehlo(path: str, tokens: np.ndarray, params=None) -> np.ndarray:
    """Feeds tokens [b t] one at a time through an exported decode step: next-token logits [b t v].

    Needs only jax and the files ``export_stablehlo`` wrote (and the param tree if it was exported as an argument).
    """
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(path + ".init_cache.npz") as z:
        cache = [z[f"arr_{i}"] for i in range(len(z.files))]
    out = []
    for i in range(tokens.shape[1]):
        args = (tokens[:, i:i + 1].astype(np.int32), cache)
        logits, cache = exported.call(params, *args) if params is not None else exported.call(*args)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


# ------------------------------------------------------------------------------------------------- CLI

def export(workdir: str, out: str, fmt: str, *, step: int | None = None, batch: int = 1,
           max_len: int | None = None, platforms=None, params_as_argument: bool = False,
           overwrite: bool = False) -> str:
    config_lib.check_choice("format", fmt, FORMATS)
    config, step, params = load_run(workdir, step)
    if fmt == "orbax":
        return export_orbax(params, config, out, overwrite=overwrite)
    if fmt == "safetensors":
        return export_safetensors(params, config, out, step=step, overwrite=overwrite)
    if fmt == "hf_llama":
        return export_hf_llama(params, config, out, overwrite=overwrite)
    return export_stablehlo(params, config, out, batch=batch, max_len=max_len, platforms=platforms,
                            params_as_argument=params_as_argument, overwrite=overwrite)


def main(argv):
    from absl import flags

    f = flags.FLAGS
    del argv
    platforms = [p for p in f.platforms.split(",") if p] if f.platforms else None
    path = export(f.workdir, f.out, f.format, step=f.step, batch=f.batch, max_len=f.max_len, platforms=platforms,
                  params_as_argument=f.stablehlo_params == "argument", overwrite=f.overwrite)
    print(f"exported {f.format}: {path}")


def run():
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A workdir made by chimera_jax.train.")
    flags.DEFINE_string("out", None, "Output path (a directory for orbax and hf_llama, a file otherwise).")
    flags.DEFINE_enum("format", None, list(FORMATS), "What to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("batch", 1, "stablehlo: batch size of the decode step.")
    flags.DEFINE_integer("max_len", None, "stablehlo: cache length (default: data.seq_len of the run).")
    flags.DEFINE_string("platforms", None, "stablehlo: comma-separated platforms, e.g. cpu,cuda (default: this one).")
    flags.DEFINE_enum("stablehlo_params", "embed", ["embed", "argument"],
                      "stablehlo: weights inside the program, or a first argument.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
    flags.mark_flags_as_required(["workdir", "out", "format"])
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
