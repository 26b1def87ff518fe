"""MQAR and needle-in-a-haystack generators, and their grain pipelines through lm_pipeline.build."""
import numpy as np
import pytest

from chimera_jax.data import lm_pipeline, synthetic_recall
from configs import mqar as mqar_configs


def _check_mqar_row(ex, vocab, t, p, random_non_queries):
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
    assert inputs.shape == targets.shape == mask.shape == (t,)
    keys, values = inputs[0:2 * p:2], inputs[1:2 * p:2]
    half = vocab // 2
    assert len(set(keys.tolist())) == p and ((1 <= keys) & (keys < half)).all()
    assert len(set(values.tolist())) == p and ((half <= values) & (values < vocab)).all()
    qpos = np.flatnonzero(mask)
    assert len(qpos) == p and (qpos >= 2 * p).all() and ((qpos - 2 * p) % 2 == 0).all()
    lookup = dict(zip(keys.tolist(), values.tolist()))
    # Every key is queried exactly once, and the target at its query is the value paired with it.
    assert sorted(inputs[qpos].tolist()) == sorted(keys.tolist())
    assert all(targets[q] == lookup[inputs[q]] for q in qpos)
    assert (targets[mask == 0] == 0).all()
    rest = np.ones(t, bool)
    rest[:2 * p] = False
    rest[qpos] = False
    if random_non_queries:
        assert len(np.unique(inputs[rest])) > 1
    else:
        assert (inputs[rest] == 0).all()
    assert ((0 <= inputs) & (inputs < vocab)).all()


@pytest.mark.parametrize("t,p,rnq", [(64, 4, True), (128, 8, False), (256, 16, True), (512, 64, True)])
def test_mqar_rows(t, p, rnq):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ex = synthetic_recall.mqar_example(rng, vocab_size=8192, seq_len=t, num_kv_pairs=p, random_non_queries=rnq)
        _check_mqar_row(ex, 8192, t, p, rnq)


def test_mqar_power_law_gaps_favour_short_distances():
    rng = np.random.default_rng(1)
    t, p = 512, 4
    first = []
    for _ in range(300):
        ex = synthetic_recall.mqar_example(rng, vocab_size=256, seq_len=t, num_kv_pairs=p, power_a=0.01)
        first.append(np.flatnonzero(ex["loss_mask"]).min() - 2 * p)
    space = (t - 2 * p) // 2
    assert np.median(first) < 0.25 * 2 * space  # uniform gaps would put the median first query much later


def test_mqar_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="seq_len"):
        synthetic_recall.mqar_example(np.random.default_rng(0), vocab_size=256, seq_len=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_recall.mqar_example(np.random.default_rng(0), vocab_size=8, seq_len=64, num_kv_pairs=8)


@pytest.mark.parametrize("t", [64, 32768])
def test_niah_rows(t):
    rng = np.random.default_rng(2)
    v, L = 1024, 3
    for _ in range(3):
        ex = synthetic_recall.niah_example(rng, vocab_size=v, seq_len=t, value_len=L)
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
        at = int(np.flatnonzero(inputs == v - 2)[0])
        key, value = inputs[at + 1], inputs[at + 2:at + 2 + L]
        tail = t - (L + 1)
        assert inputs[tail] == v - 1 and inputs[tail + 1] == key
        np.testing.assert_array_equal(targets[tail + 1:], value)
        np.testing.assert_array_equal(inputs[tail + 2:], value[:-1])
        assert mask.sum() == L and (mask[tail + 1:] == 1).all()
        assert (inputs == v - 2).sum() == 1 and (inputs == v - 1).sum() == 1


def test_mqar_config_builds_lm_batches_and_resumes():
    c = mqar_configs.get_config("arch=chimera,d_model=32,seq_len=64,num_kv_pairs=4,vocab_size=128,batch_size=4")
    assert c.model.pattern == "CH" and c.model.num_layers == 2
    data = lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
    b1 = next(data.train)
    assert set(b1) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert b1["inputs"].shape == (4, 64) and b1["inputs"].dtype == np.int32
    assert (b1["loss_mask"].sum(1) == 4).all()
    assert c.data.mqar.random_non_queries is False and c.model.tie_embeddings  # Zoology's figure-2 setting
    _check_mqar_row({k: v[0] for k, v in b1.items()}, 128, 64, 4, False)
    state = data.train.get_state()
    b2 = next(data.train)
    data.train.set_state(state)
    np.testing.assert_array_equal(next(data.train)["inputs"], b2["inputs"])  # checkpointable iterator
    assert len(data.eval_batches) == c.data.eval_batches
    train_rows = {r.tobytes() for r in b1["inputs"]}
    assert not any(r.tobytes() in train_rows for r in data.eval_batches[0]["inputs"])
    for arch in ("dense", "mamba2", "gdn", "sliding"):
        assert mqar_configs.get_config(f"arch={arch}").model.num_layers == 2
    assert mqar_configs.get_config("arch=sliding,window=16").model.attention.window == 16
    assert mqar_configs.get_config("steps=100,evals=4").eval_every == 25
    assert not mqar_configs.get_config("tie=False").model.tie_embeddings
