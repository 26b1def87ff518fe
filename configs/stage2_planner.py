"""Stage 2 of the concept pipeline (stage ``planner``):
``--config=configs/stage2_planner.py:size=tiny,num_codes=1000,data=mnist --config.stage1_workdir=DIR``.

size: tiny (CPU) | base | full.   num_codes: K of the stage-1 concept codebook (checked against stage 1).
data: the stage-1 data kind, mnist | text | both (checked).   concept_dim: stage 1's code_dim (checked).
terms: which CALL terms are on: ce | mse (ce + mse) | contrastive (ce + mse + InfoNCE) | full (all four, the seed's
       weights 1.0 / 0.1 / 0.05 for MSE / InfoNCE / adversarial).
"""
from __future__ import annotations

import ml_collections

from chimera_jax import config_lib
from chimera_jax.layers import attention, registry

# size -> (d_model, num_layers, heads, head_dim, ffn_dim, seq_len, batch, total_steps, disc d_model, disc layers)
SIZES = {
    "tiny": (64, 2, 4, 16, 128, 64, 16, 300, 32, 1),
    "base": (256, 6, 4, 64, 768, 256, 32, 20_000, 128, 2),
    "full": (512, 12, 8, 64, 1536, 512, 64, 100_000, 256, 2),
}
TERMS = {"ce": (1.0, 0.0, 0.0, 0.0), "mse": (1.0, 1.0, 0.0, 0.0), "contrastive": (1.0, 1.0, 0.1, 0.0),
         "full": (1.0, 1.0, 0.1, 0.05)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = config_lib.parse_variant(arg, dict(size="tiny", num_codes=1000, concept_dim=32, data="mnist", terms="full"))
    config_lib.check_choice("size", v["size"], SIZES)
    config_lib.check_choice("terms", v["terms"], TERMS)
    config_lib.check_choice("data", v["data"], ("mnist", "text", "both"))
    d, layers, heads, head_dim, ffn, seq, batch, steps, dd, dl = SIZES[v["size"]]
    tiny = v["size"] == "tiny"

    c = ml_collections.ConfigDict()
    c.stage = "planner"
    c.stage1_workdir = ""             # required: a stage-1 (stage vq) workdir with a checkpoint
    c.seed = 0
    c.total_steps = steps
    c.log_every = 25 if tiny else 100
    c.eval_every = 100 if tiny else 2000
    c.checkpoint_every = 100 if tiny else 2000
    c.max_consecutive_nonfinite = 5
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=3, async_save=True))

    m = ml_collections.ConfigDict()
    m.num_codes = int(v["num_codes"])      # K (must equal stage 1's); index K is the start symbol
    m.concept_dim = int(v["concept_dim"])  # width of the codebook vectors (must equal stage 1's code_dim)
    m.pattern = "H"
    m.num_layers = layers
    m.d_model = d
    m.ffn = "swiglu"
    m.ffn_dim = ffn
    m.moe_every = 0
    m.vocab_size = m.num_codes + 1         # must stay num_codes + 1 (checked)
    m.tie_embeddings = False
    m.dtype = "float32" if tiny else "bfloat16"
    m.param_dtype = "float32"
    m.norm_eps = 1e-6
    m.init_std = 0.02
    m.ternary = False
    m.remat = "none"
    att = attention.default_config()
    att.num_heads, att.num_kv_heads, att.head_dim = heads, heads, head_dim
    m.attention = att
    h = registry.default_block_config("hassm")
    h.attention.num_heads, h.attention.num_kv_heads, h.attention.head_dim = heads, heads, head_dim
    m.hassm = h
    c.model = m

    disc = ml_collections.ConfigDict()
    disc.d_model = dd
    disc.num_layers = dl
    disc.ffn = "swiglu"
    disc.ffn_dim = 2 * dd
    disc.moe_every = 0
    disc.dtype = "float32"
    disc.param_dtype = "float32"
    disc.norm_eps = 1e-6
    disc.ternary = False
    da = attention.default_config()
    da.num_heads, da.num_kv_heads, da.head_dim = 2, 2, dd // 2
    disc.attention = da
    disc.learning_rate = 4e-4            # its own Adam optimizer (the seed's)
    disc.b1, disc.b2 = 0.5, 0.9
    c.disc = disc

    w = TERMS[v["terms"]]
    loss = ml_collections.ConfigDict()
    loss.ce, loss.mse, loss.contrastive, loss.adversarial = w
    loss.temperature = 0.1               # InfoNCE temperature tau
    c.loss = loss

    o = ml_collections.ConfigDict()
    o.learning_rate = 1e-3 if tiny else 3e-4
    o.warmup_steps = 30 if tiny else 1000
    o.decay_steps = -1
    o.min_lr_ratio = 0.1
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.1
    o.grad_clip_norm = 1.0
    o.grad_accum_steps = 1
    c.optimizer = o

    data = ml_collections.ConfigDict()
    data.kind = v["data"]                # must equal stage 1's data.kind
    data.seq_len = seq
    data.batch_size = batch
    data.eval_batches = 4 if tiny else 16
    data.cache_dir = "~/.cache/chimera_jax/concepts"  # encoded concept sequences (ArrayRecord), keyed by stage 1
    c.data = data
    return config_lib.lock(c)
