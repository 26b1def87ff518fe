"""Multi-query associative recall (Zoology form) on 2-layer models:
``--config=configs/mqar.py:arch=NAME,d_model=D,seq_len=L,num_kv_pairs=P``.

arch: dense (attention) | mamba2 | gdn (Gated DeltaNet) | sliding (sliding-window attention) | chimera
Other variants: vocab_size (8192 as in Zoology), lr (peak learning rate), steps, batch_size, evals (evaluations
over the run, the last at its end), window (W of the sliding-window layers and of CHIMERA's window mode), power_a,
random_non_queries, tie (output head = the embedding table), init_std (of the embedding table), router_rate
(CHIMERA's balancing-bias step gamma; 0 keeps the layer's default), mix (CHIMERA's target mode mix and capacities,
a name of ``chimera.MIXES``: balanced, the default, or cheap), read_threads and prefetch_batches (host threads
drawing batches ahead, and how many: many runs share one machine's cores, so one thread a few batches ahead; 0
threads draws on the training thread).
The eval accuracy (``eval/accuracy``) is the recall accuracy over the query positions of held-out rows.

The recipe follows the Zoology study's MQAR runs where it matters: tied input and output embeddings (the answer is a
copy of a token seen in the context; with a tied head the copied embedding is already the answer's logit direction,
while an untied head must learn an output row for each of the V/2 value tokens, which at V = 8192 takes most of a
short run), zeros at the non-query positions (``random_non_queries=False``, the study's figure 2), AdamW with weight
decay 0.1, linear warmup then cosine decay, a fresh batch every step; peak lr 3e-3 and 6000 steps, from the H100
probe in experiments/results/mqar_probe_h100.md (at vocab 8192, lr 3e-3 passed 99% by step 4000 while 1e-2 stayed
on the plateau for 8500 steps). One change for short runs: an embedding init of std 0.1 rather than 0.02 (a tied head's logits scale with the embedding norm; at 0.02 they start
near zero for every token and the loss leaves ln V slowly). Dense attention first sits on a plateau at 1/P accuracy
(the answer is one of the P values in context) and leaves it only once the two-layer lookup forms: at d 64, (64, 4),
batch 64, vocab 256 that was after about 1.6k steps; vocab 8192 reaches the plateau later (about 1k steps).
"""
from __future__ import annotations

import ml_collections

from chimera_jax import config_lib
from chimera_jax.data import synthetic_recall
from chimera_jax.layers import chimera
from configs import lm as lm_configs

# MQAR arch -> the language-model arch it is built from.
ARCHS = {"dense": "dense", "mamba2": "mamba2", "gdn": "gdn", "sliding": "dense", "chimera": "chimera"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = config_lib.parse_variant(arg, dict(arch="dense", d_model=64, seq_len=64, num_kv_pairs=4, vocab_size=8192,
                                           lr=3e-3, steps=6000, batch_size=64, evals=4, window=32,
                                           power_a=0.01, random_non_queries=False, tie=True, init_std=0.1,
                                           router_rate=0.0, mix="balanced",
                                           read_threads=synthetic_recall.READ_THREADS,
                                           prefetch_batches=synthetic_recall.PREFETCH_BATCHES))
    config_lib.check_choice("arch", v["arch"], ARCHS)
    config_lib.check_choice("mix", v["mix"], chimera.MIXES)
    c = lm_configs.get_config(f"arch={ARCHS[v['arch']]},size=tiny")
    c.unlock()
    d = int(v["d_model"])
    m = c.model
    m.num_layers = 2
    m.d_model = d
    m.ffn_dim = 2 * d
    m.vocab_size = int(v["vocab_size"])
    m.tie_embeddings = bool(v["tie"])
    m.init_std = float(v["init_std"])
    m.attention.head_dim = 32 if d >= 64 else d
    m.attention.num_heads = m.attention.num_kv_heads = max(1, d // m.attention.head_dim)
    if v["arch"] == "sliding":
        m.pattern = "SW"
        m.attention.window = int(v["window"])
    if "mamba2" in m:
        m.mamba2.d_state = 64
        m.mamba2.head_dim = min(64, 2 * d)
    if "gdn" in m:
        m.gdn.head_dim = 32 if d >= 64 else d
        m.gdn.num_heads = max(1, d // m.gdn.head_dim)
    if "chimera" in m:
        m.chimera.window = int(v["window"])
        if float(v["router_rate"]) > 0:
            m.chimera.bias_update_rate = float(v["router_rate"])
        m.chimera.target_mix, m.chimera.capacity_factor = chimera.MIXES[v["mix"]]

    c.total_steps = int(v["steps"])
    c.log_every = 50
    c.eval_every = max(1, c.total_steps // max(1, int(v["evals"])))
    c.checkpoint_every = c.total_steps
    c.checkpoint.async_save = False
    c.optimizer.learning_rate = float(v["lr"])
    c.optimizer.warmup_steps = max(1, c.total_steps // 20)
    c.optimizer.weight_decay = 0.1

    data = c.data
    data.source = "mqar"
    data.seq_len = int(v["seq_len"])
    data.batch_size = int(v["batch_size"])
    data.eval_batches = 4
    data.read_threads = int(v["read_threads"])
    data.prefetch_batches = int(v["prefetch_batches"])
    mq = synthetic_recall.mqar_config()
    mq.vocab_size = int(v["vocab_size"])
    mq.num_kv_pairs = int(v["num_kv_pairs"])
    mq.power_a = float(v["power_a"])
    mq.random_non_queries = bool(v["random_non_queries"])
    data.mqar = mq
    return config_lib.lock(c)
