import jax
import jax.numpy as jnp
import numpy as np

from chimera_jax.layers import recurrent_common as rec
from tests.layers import recurrent_contract as rc


def _naive_conv(x, kernel, bias, seg):
    """Per document, y_t = bias + sum_k kernel[k] x_{t-(w-1)+k}, reading zeros before the document's start."""
    b, t, _ = x.shape
    w = kernel.shape[0]
    y = np.zeros_like(x)
    for r in range(b):
        for i in range(t):
            y[r, i] = bias
            for k in range(w):
                j = i - (w - 1) + k
                if j >= 0 and seg[r, j] == seg[r, i]:
                    y[r, i] += kernel[k] * x[r, j]
    return y


def test_conv_matches_per_document_conv_and_carries_state():
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        seg = rc.packed_ids([[1, 4, 2, 5], [12]])
        x = jax.random.normal(k[0], (2, 12, 3), jnp.float64)
        kernel = jax.random.normal(k[1], (4, 3), jnp.float64)
        bias = jax.random.normal(k[2], (3,), jnp.float64)
        y, _ = rec.causal_conv1d(x, kernel, bias, segment_ids=seg)
        np.testing.assert_allclose(y, _naive_conv(np.asarray(x), np.asarray(kernel), np.asarray(bias),
                                                  np.asarray(seg)), rtol=1e-12)
        # Split at 6: mid-document in both rows, one token after a start in row 0 (so the carried inputs must
        # drop the finished document). A start at the first token of a call is the layer's business.
        ys, state = [], None
        for lo, hi in ((0, 6), (6, 12)):
            yi, state = rec.causal_conv1d(x[:, lo:hi], kernel, bias, segment_ids=seg[:, lo:hi], state=state)
            ys.append(yi)
        np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-12)


def test_carry_state_zeroes_finished_documents_only():
    seg = jnp.asarray([[3, 3], [5, 5]])
    keep = rec.continues(seg, jnp.asarray([3, 4]))
    np.testing.assert_array_equal(keep, [True, False])
    c, s = rec.carry_state((jnp.ones((2, 3)), jnp.ones((2, 2, 2))), keep)
    assert float(c[0].sum()) == 3 and float(c[1].sum()) == 0 and float(s[1].sum()) == 0
    np.testing.assert_array_equal(rec.last_segment_id(seg, jnp.zeros((2,), jnp.int32)), [3, 5])
    assert bool(rec.continues(None, jnp.asarray([1, 2])).all())
