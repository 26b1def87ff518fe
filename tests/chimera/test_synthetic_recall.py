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


def _successive_probability(order, w):
    """Probability of drawing the items ``order`` in this order, without replacement, proportional to w."""
    left, prob = float(w.sum()), 1.0
    for i in order:
        prob *= w[i] / left
        left -= w[i]
    return prob


@pytest.mark.parametrize("n,k,weighted", [(6, 3, False), (6, 5, False), (7, 3, True), (4, 4, True)])
def test_ordered_sample_is_a_draw_without_replacement(n, k, weighted):
    """Frequencies of the ordered k-tuples match rng.choice(n, k, replace=False, p=w/w.sum()) exactly: (6, 3) takes
    the redraw-the-repeats branch, (6, 5) the exponential race with equal weights, the weighted cases the race."""
    import itertools

    w = synthetic_recall._gap_weights(n, 0.3) if weighted else np.ones(n)
    rows = 120_000
    got = synthetic_recall._ordered_sample(np.random.default_rng(3), rows, n, k, w if weighted else None)
    assert got.shape == (rows, k)
    tuples, counts = np.unique(got, axis=0, return_counts=True)
    observed = dict(zip(map(tuple, tuples.tolist()), counts))
    chi2, cells = 0.0, 0
    for order in itertools.permutations(range(n), k):
        expected = rows * _successive_probability(order, w)
        chi2 += (observed.pop(order, 0) - expected) ** 2 / expected
        cells += 1
    assert not observed  # no tuple with a repeated item
    assert chi2 < cells - 1 + 6 * np.sqrt(2 * (cells - 1)), chi2  # 6 sd above the chi-square mean


@pytest.mark.parametrize("v,t,p,rnq", [(8192, 64, 4, True), (8192, 128, 8, False), (256, 512, 64, True),
                                       (130, 256, 60, False)])
def test_mqar_batch_rows(v, t, p, rnq):
    """Every row of a vectorised batch is a valid MQAR row (vocab 130 and 256 take the race for the keys)."""
    batch = synthetic_recall.mqar_batch(np.random.default_rng(4), 16, vocab_size=v, seq_len=t, num_kv_pairs=p,
                                        random_non_queries=rnq)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    for i in range(16):
        _check_mqar_row({k: x[i] for k, x in batch.items()}, v, t, p, rnq)


def test_mqar_batch_matches_the_row_reference_in_distribution():
    """mqar_batch and mqar_example (rng.choice per row) give the same query-gap law per key slot and the same
    spread of keys, values and filler tokens."""
    v, t, p, a, n = 64, 64, 4, 0.3, 4000
    rng = np.random.default_rng(5)
    ref = [synthetic_recall.mqar_example(rng, vocab_size=v, seq_len=t, num_kv_pairs=p, power_a=a) for _ in range(n)]
    ref = {k: np.stack([r[k] for r in ref]) for k in ref[0]}
    fast = synthetic_recall.mqar_batch(np.random.default_rng(6), n, vocab_size=v, seq_len=t, num_kv_pairs=p,
                                       power_a=a)
    space = (t - 2 * p) // 2

    def gap_of_slot(b):  # [n p] gap of the query of the j-th key
        keys = b["inputs"][:, 0:2 * p:2]
        rows, pos = np.nonzero(b["loss_mask"])
        pos = pos.reshape(n, p)
        slot = np.argmax(b["inputs"][rows, pos.reshape(-1)].reshape(n, p)[:, :, None] == keys[:, None, :], axis=2)
        gaps = np.empty((n, p), int)
        np.put_along_axis(gaps, slot, (pos - 2 * p) // 2, axis=1)
        return gaps

    def tv(x, y, bins):  # total variation distance of two empirical distributions
        return 0.5 * np.abs(np.bincount(x, minlength=bins) / x.size - np.bincount(y, minlength=bins) / y.size).sum()

    g_ref, g_fast = gap_of_slot(ref), gap_of_slot(fast)
    for j in range(p):  # the first key's query tends to come earliest (it is drawn first): each slot's law
        assert tv(g_ref[:, j], g_fast[:, j], space) < 0.06, j
    assert abs(g_ref[:, 0].mean() - g_fast[:, 0].mean()) < 0.1 * g_ref[:, 0].mean()
    assert tv(ref["inputs"][:, :2 * p].ravel(), fast["inputs"][:, :2 * p].ravel(), v) < 0.06  # keys and values
    filler = lambda b: b["inputs"][:, 2 * p:][b["loss_mask"][:, 2 * p:] == 0]
    assert tv(filler(ref), filler(fast), v) < 0.05


def test_mqar_pipeline_is_deterministic_for_any_read_threads():
    base = dict(arch="dense", d_model=32, seq_len=64, num_kv_pairs=4, vocab_size=128, batch_size=4)
    variant = lambda **kw: ",".join(f"{k}={x}" for k, x in dict(base, **kw).items())
    batches = []
    for threads in (0, 1, 2):
        c = mqar_configs.get_config(variant(read_threads=threads, prefetch_batches=3))
        assert c.data.read_threads == threads and c.data.prefetch_batches == 3
        data = lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
        batches.append([next(data.train)["inputs"] for _ in range(5)])
    for other in batches[1:]:
        for x, y in zip(batches[0], other):
            np.testing.assert_array_equal(x, y)
    c = mqar_configs.get_config(variant(read_threads=-1))
    with pytest.raises(ValueError, match="read_threads"):
        lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)


def test_mqar_fixed_training_set_is_shuffled_repeated_and_resumes():
    c = mqar_configs.get_config("arch=dense,d_model=32,seq_len=64,num_kv_pairs=4,vocab_size=128,batch_size=4")
    c.data.mqar.num_train_examples = 10
    data = lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
    first = [next(data.train) for _ in range(2)]      # 8 of the 10 rows of the first pass
    state = data.train.get_state()
    later = [next(data.train) for _ in range(6)]      # 24 more rows: the set repeated
    rows = lambda bs: [r.tobytes() for b in bs for r in b["inputs"]]
    assert len(set(rows(first))) == 8
    assert set(rows(later)) <= set(rows(first + later)) and len(set(rows(first + later))) == 10
    for b in first + later:
        _check_mqar_row({k: x[0] for k, x in b.items()}, 128, 64, 4, False)
        assert b["inputs"].shape == (4, 64) and (b["positions"][1] == np.arange(64)).all()
    data.train.set_state(state)
    np.testing.assert_array_equal(next(data.train)["inputs"], later[0]["inputs"])
