"""Stage 1 of the concept pipeline (stage ``vq``): ``--config=configs/stage1_vq.py:quantizer=fsq,data=mnist``.

quantizer: vq (EMA codebook, K codes) | fsq (levels, prod(levels) codes)
data: mnist (the bundled MNIST test digits) | text (tinyshakespeare lines) | both (a digit and a line per example,
      one of them sometimes missing)
size: tiny (CPU) | base | full (the seed's K = 8192, D = 512)
restarts: True | False (VQ dead-code restarts; False for the contrast run)
Any field can be overridden on the command line, e.g. ``--config.model.quantizer.decay=0.95``.
"""
from __future__ import annotations

import ml_collections

from chimera_jax import config_lib
from chimera_jax.layers import aunet, pre_encoders, quantizers, slot_attention

# size -> (d_model, code_dim, vq num_codes, fsq levels, aunet widths, batch, total_steps)
SIZES = {
    "tiny": (32, 32, 1024, (8, 5, 5, 5), (32, 48, 64), 32, 600),
    "base": (128, 128, 4096, (8, 8, 8, 8), (96, 128, 192), 64, 20_000),
    "full": (512, 512, 8192, (8, 8, 8, 6, 5), (256, 384, 512), 128, 100_000),
}
MODALITIES = {"mnist": ("image",), "text": ("text",), "both": ("image", "text")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = config_lib.parse_variant(arg, dict(quantizer="vq", data="mnist", size="tiny", restarts=True))
    config_lib.check_choice("quantizer", v["quantizer"], ("vq", "fsq"))
    config_lib.check_choice("data", v["data"], MODALITIES)
    config_lib.check_choice("size", v["size"], SIZES)
    d, code_dim, k, levels, widths, batch, steps = SIZES[v["size"]]
    tiny = v["size"] == "tiny"

    c = ml_collections.ConfigDict()
    c.stage = "vq"
    c.seed = 0
    c.total_steps = steps
    c.log_every = 25 if tiny else 100
    c.eval_every = 200 if tiny else 2000
    c.checkpoint_every = 200 if tiny else 2000
    c.max_consecutive_nonfinite = 5
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=3, async_save=True))

    m = ml_collections.ConfigDict()
    m.modalities = MODALITIES[v["data"]]
    m.d_model = d
    m.dtype = "float32" if tiny else "bfloat16"
    m.param_dtype = "float32"
    m.norm_eps = 1e-6
    m.ternary = False
    m.image_size = 32          # MNIST's 28 x 28 centred in 32 x 32 (the hierarchy halves it 3 times)
    m.text_len = 64            # bytes per text line (longer lines are cut)
    m.audio_len = 1024         # samples per audio clip (no audio corpus is bundled; the path is tested)
    m.num_levels = 2           # HDM levels; the last (coarsest) one gives the concepts
    m.level_stride = 2         # downsampling per level
    m.fine_dropout = 0.25      # drop the finer levels' conditioning per segment in training (see models/concept.py)
    q = quantizers.default_config()
    q.kind = v["quantizer"]
    q.code_dim = code_dim
    q.levels = levels
    q.num_codes = quantizers.num_codes(q) if v["quantizer"] == "fsq" else k
    q.restart_after = 50 if v["restarts"] else 0
    m.quantizer = q
    m.pre = pre_encoders.default_config()
    a = aunet.default_config()
    a.widths = widths
    m.aunet = a
    m.slots = slot_attention.default_config()
    c.model = m

    loss = ml_collections.ConfigDict()
    loss.l1_weight = 0.0               # L1 between the expected pixel intensity (under the byte softmax) and the truth
    loss.perceptual_weight = 0.0       # user-supplied feature-network distance (stages/vq.py: feature_distance)
    loss.perceptual_features = ""      # .npz with conv_0, conv_1, ... [kh kw cin cout] and optional weight_i [cout]
    c.loss = loss

    o = ml_collections.ConfigDict()
    o.learning_rate = 2e-3 if tiny else 3e-4
    o.warmup_steps = 50 if tiny else 1000
    o.decay_steps = -1
    o.min_lr_ratio = 0.1
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.01
    o.grad_clip_norm = 1.0
    o.grad_accum_steps = 1
    c.optimizer = o

    data = ml_collections.ConfigDict()
    data.kind = v["data"]
    data.text_files = "bundled:tinyshakespeare"
    data.image_size = m.image_size     # must equal model.image_size (checked)
    data.text_len = m.text_len         # must equal model.text_len (checked)
    data.batch_size = batch
    data.eval_batches = 8 if tiny else 16
    data.validation_fraction = 0.1
    data.missing_prob = 0.15           # 'both': chance of dropping the image, and again of dropping the text
    data.max_examples = 0              # 0 = all
    c.data = data

    e = ml_collections.ConfigDict()
    e.grid_examples = 16               # examples in the reconstruction grid saved at each eval
    e.render_temperature = 1.0         # AU-Net sampling temperature for reconstructions (0 = most likely byte)
    c.eval = e
    return config_lib.lock(c)
