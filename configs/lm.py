"""Language models: ``--config=configs/lm.py:arch=ARCH,size=SIZE``.

arch: dense | griffin | chimera51 | hassm | mamba | mamba2 | gdn | mlstm | titans | moe | chimera
size: tiny (the CPU demo) | 125m | 350m | 1p3b  (griffin also: small | base | large, seed 004's shapes)
Any field can be overridden on the command line, e.g. ``--config.model.num_layers=4``.
"""
from __future__ import annotations

import ml_collections

from chimera_jax import config_lib
from chimera_jax.layers import registry
from chimera_jax.models import lm as lm_model

# (d_model, num_layers, num_heads, num_kv_heads, head_dim, ffn_dim, vocab_size, tie_embeddings)
SIZES = {
    "tiny": (128, 4, 4, 2, 32, 384, 264, True),
    "125m": (768, 12, 12, 4, 64, 2048, 50304, True),
    # The two shapes of jax-linear-attention's transformer-350m and transformer-1p3b presets (equal-work comparison).
    "350m": (1024, 24, 16, 8, 64, 2816, 50304, True),
    "1p3b": (2048, 24, 32, 8, 64, 5632, 128256, False),
    # Griffin (seed 004): ~125M / ~1.5B / ~3B.
    "small": (768, 12, 12, 1, 64, 2304, 50304, True),
    "base": (2048, 24, 16, 1, 128, 6144, 50304, True),
    "large": (2560, 32, 20, 1, 128, 7680, 50304, True),
}

# arch -> (pattern, ffn, moe_every)
ARCHS = {
    "dense": ("A", "swiglu", 0),
    "griffin": ("RG RG RG SW", "swiglu", 0),
    "chimera51": ("GD XM GD TM GD XM GD A", "swiglu", 4),
    "hassm": ("H", "swiglu", 0),
    "mamba": ("M1", "none", 0),
    "mamba2": ("M2", "none", 0),
    "gdn": ("GD", "swiglu", 0),
    "mlstm": ("XM", "swiglu", 0),
    "titans": ("TM", "swiglu", 0),
    "moe": ("A", "swiglu", 1),
    "chimera": ("CH", "swiglu", 0),  # per-token router over Mamba-2 / sliding window / full attention / identity
}


def model_config(arch: str, size: str) -> ml_collections.ConfigDict:
    config_lib.check_choice("arch", arch, ARCHS)
    config_lib.check_choice("size", size, SIZES)
    d, layers, heads, kv_heads, head_dim, ffn, vocab, tie = SIZES[size]
    pattern, ffn_kind, moe_every = ARCHS[arch]
    m = ml_collections.ConfigDict()
    m.arch = arch
    m.pattern = pattern            # layer codes (layers/registry.py), repeated to num_layers
    m.num_layers = layers
    m.d_model = d
    m.ffn = ffn_kind               # 'swiglu' | 'none'
    m.ffn_dim = ffn
    m.moe_every = moe_every        # 0: no MoE; k: layers k-1, 2k-1, ... use the MoE feed-forward (model.moe)
    m.vocab_size = vocab           # >= the tokenizer's vocabulary (padded for fast matmuls)
    m.tie_embeddings = tie
    m.dtype = "float32" if size == "tiny" else "bfloat16"  # compute dtype
    m.param_dtype = "float32"
    m.norm_eps = 1e-6
    m.init_std = 0.02              # embedding init
    m.ternary = False              # BitNet b1.58 projections everywhere (layers/bitlinear.py)
    m.remat = "none"               # 'none' | 'dots' | 'full' (rematerialise each block in the backward pass)
    m.scan_layers = False          # True: one period of the pattern scanned over its repeats (jax.lax.scan):
                                   # compile time stops growing with depth; parameters gain a leading
                                   # [repeats] axis under 'layers' (models/lm.py: unstack_layers); no looping,
                                   # MoE or CHIMERA layers
    m.loss_chunk = 0               # > 0: the loss takes the output head's logits this many positions at a time
                                   # (rematerialised), never holding [b t vocab] float32 logits; 0: all at once
    m.loop = lm_model.loop_config()  # looped depth (prelude / core x loops / coda); core=0: off
    att = registry.default_block_config("attention")
    att.num_heads, att.num_kv_heads, att.head_dim = heads, kv_heads, head_dim
    if "SW" in pattern.split():
        att.window = 64 if size == "tiny" else 2048
    m.attention = att
    for code in set(pattern.split()) - {"A", "SW"}:
        block = registry.MIXERS[code].block
        m[block] = registry.default_block_config(block)
    if "CH" in pattern.split():  # CHIMERA's SSM mode reads model.mamba2, its attention modes model.attention
        m.mamba2 = registry.default_block_config("mamba2")
        m.chimera.window = 64 if size == "tiny" else 512
    if moe_every:
        m.moe = registry.default_ffn_config("moe")
    return fit_blocks_to_width(m)


def fit_blocks_to_width(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sizes each mixer family's sub-block from d_model and the attention shape (call again after changing them)."""
    d, a = m.d_model, m.attention
    big = d >= 768
    if "gdn" in m:
        m.gdn.head_dim = 128 if d >= 1024 else max(8, min(64, d // 4))
        m.gdn.num_heads = max(1, d // m.gdn.head_dim)
    if "mamba2" in m:
        m.mamba2.head_dim = 64 if big else max(8, d // 8)
        m.mamba2.d_state = 128 if big else 16
    if "mamba" in m:
        m.mamba.d_state = 16
    if "griffin" in m:
        m.griffin.num_heads = a.num_heads
    if "mlstm" in m:
        m.mlstm.num_heads = 4 if d >= 64 else 2
    if "titans" in m:
        m.titans.num_heads, m.titans.head_dim = a.num_heads, a.head_dim
        m.titans.window = 512 if big else 32
        m.titans.chunk_size = 64 if big else 8
    if "hassm" in m:
        m.hassm.attention.num_heads = a.num_heads
        m.hassm.attention.num_kv_heads = a.num_kv_heads
        m.hassm.attention.head_dim = a.head_dim
    if "moe" in m:
        m.moe.expert_dim = max(8, m.ffn_dim // 2)
    if "chimera" in m and hasattr(m.chimera, "get") and "window" in m.chimera:
        m.chimera.window = 512 if big else 32
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = config_lib.parse_variant(arg, dict(arch="dense", size="tiny"))
    tiny = v["size"] == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "lm"
    c.seed = 0
    c.total_steps = 800 if tiny else 20_000
    c.log_every = 50 if tiny else 100
    c.eval_every = 200 if tiny else 2000
    c.checkpoint_every = 200 if tiny else 2000
    c.max_consecutive_nonfinite = 5   # stop after this many skipped (non-finite) updates in a row
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 takes the remaining devices
    c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=3, async_save=True))
    c.model = model_config(v["arch"], v["size"])

    o = ml_collections.ConfigDict()
    o.learning_rate = 3e-3 if tiny else 3e-4
    o.warmup_steps = 50 if tiny else 1000
    o.decay_steps = -1                # -1: decay over total_steps
    o.min_lr_ratio = 0.1              # cosine decays to this fraction of the peak
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.1
    o.grad_clip_norm = 1.0
    o.grad_accum_steps = 1
    c.optimizer = o

    data = ml_collections.ConfigDict()
    data.source = "text"              # 'text' (local files) | 'tfds' (ArrayRecord built from the same files) | 'synthetic'
    data.text_files = "bundled:tinyshakespeare"  # comma-separated paths; 'bundled:NAME' = chimera_jax/data/corpora
    data.document_split = "blank_lines"          # "blank_lines" | "whole_file"
    data.tokenizer = "bytes"          # 'bytes' | 'sentencepiece'
    data.sentencepiece_vocab_size = 4096
    data.cache_dir = "~/.cache/chimera_jax"      # trained tokenizers and built datasets are cached here
    data.seq_len = 128 if tiny else 2048
    data.batch_size = 16 if tiny else 8          # global batch (sequences per optimizer step)
    data.validation_fraction = 0.1
    data.eval_batches = 8 if tiny else 16
    c.data = data
    return config_lib.lock(c)
