"""A 4-point CPU sweep: model width x peak learning rate on the tiny dense LM (tinyshakespeare, bytes).

    python experiments/sweep.py experiments/sweeps/example_lm.py
"""


def get_sweep():
    return dict(
        name="example_lm",
        base="configs/lm.py:arch=dense,size=tiny",
        fixed={
            "total_steps": 60, "log_every": 5, "eval_every": 20, "checkpoint_every": 60,
            "checkpoint.async_save": False, "optimizer.warmup_steps": 5,
            "model.num_layers": 2, "model.ffn_dim": 128,
            "model.attention.num_heads": 2, "model.attention.num_kv_heads": 1, "model.attention.head_dim": 16,
            "data.seq_len": 64, "data.batch_size": 8, "data.eval_batches": 4,
        },
        axes={"model.d_model": [32, 64], "optimizer.learning_rate": [1e-3, 3e-3]},
        mode="product",
        metric="eval/bpb",
    )
