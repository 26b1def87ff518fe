"""Concept data: MNIST loader, stage-1 examples, ArrayRecord concept sequences and their resumable packing."""
import json

import numpy as np

from chimera_jax.data import concept_data, mnist
from configs import stage1_vq


def test_mnist_loader_reads_the_bundled_digits():
    images, labels = mnist.load()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_both_examples_pad_digits_and_drop_modalities():
    c = stage1_vq.get_config("data=both")
    c.data.max_examples = 200
    src = concept_data.ExampleSource(c.data, seed=0)
    ex = src(3)
    assert ex["image"].shape == (32, 32) and ex["image"][:2].sum() == 0
    np.testing.assert_array_equal(ex["image"][2:30, 2:30], mnist.load()[0][3])
    n = int(ex["text_mask"].sum())
    assert ex["text"][n - 1] == 0 and ex["text"][:n - 1].min() > 0
    has = np.array([[src(i)["has_image"], src(i)["has_text"]] for i in range(200)])
    assert has.max(1).min() == 1.0                # never both missing
    assert 0 < (has == 0).sum() < 200 * 0.5       # some missing


def test_sequences_round_trip_and_packing_resumes_after_json(tmp_path):
    seqs = [np.arange(i, i + 3 + i % 4, dtype=np.int32) for i in range(40)]
    concept_data.write_sequences(str(tmp_path / "train.ar"), seqs)
    concept_data.write_sequences(str(tmp_path / "eval.ar"), seqs[:5])
    got = concept_data.read_sequences(str(tmp_path / "train.ar"))
    assert len(got) == 40 and all(np.array_equal(got[i], seqs[i]) for i in range(40))

    def make():
        return concept_data.build_planner(str(tmp_path / "train.ar"), str(tmp_path / "eval.ar"), bos=99, seq_len=8,
                                          batch_size=2, seed=0, eval_batches=1)

    a = make()
    for _ in range(3):
        next(a.train)
    state = json.loads(json.dumps(a.train.get_state()))  # as checkpoints store it
    expect = [next(a.train) for _ in range(3)]
    b = make()
    b.train.set_state(state)
    for e in expect:
        g = next(b.train)
        assert all(np.array_equal(g[k], e[k]) for k in e)
    batch = expect[0]
    # A target is its successor in the same document; BOS starts each document.
    m = batch["loss_mask"] > 0
    assert (batch["targets"][m] != 99).all()
