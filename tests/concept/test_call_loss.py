"""Each CALL term against a hand computation."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.losses import call


def test_cross_entropy_by_hand():
    logits = jnp.array([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])
    targets = jnp.array([[1, 0]])
    mask = jnp.array([[1.0, 1.0]])
    z0 = math.log(math.e + math.e ** 2 + 1)
    z1 = math.log(2 + math.e ** 3)
    np.testing.assert_allclose(call.cross_entropy(logits, targets, mask), ((z0 - 2) + (z1 - 0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(call.cross_entropy(logits, targets, jnp.array([[1.0, 0.0]])), z0 - 2, rtol=1e-6)
    np.testing.assert_allclose(call.accuracy(logits, targets, mask), 0.5)


def test_mse_by_hand():
    pred = jnp.array([[[1.0, 2.0], [0.0, 0.0]]])
    true = jnp.array([[[0.0, 0.0], [3.0, 4.0]]])
    np.testing.assert_allclose(call.mse(pred, true, jnp.array([[1.0, 1.0]])), ((1 + 4) / 2 + (9 + 16) / 2) / 2)
    np.testing.assert_allclose(call.mse(pred, true, jnp.array([[0.0, 1.0]])), (9 + 16) / 2)


def test_info_nce_by_hand():
    pred = jnp.array([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    true = jnp.array([[[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]])
    mask = jnp.array([[1.0, 1.0, 0.0]])  # the third position is neither a query nor a negative
    tau = 0.5
    c = 1 / math.sqrt(2)
    # cosines: pred0 vs (true0, true1) = (1, 0); pred1 vs (true0, true1) = (c, c)
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0)))
    l1 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(c / tau)))
    np.testing.assert_allclose(call.info_nce(pred, true, mask, tau), (l0 + l1) / 2, rtol=1e-6)


def test_adversarial_terms_by_hand():
    real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -0.5])
    sig = lambda x: 1 / (1 + math.exp(-x))
    g = -(math.log(sig(0.5)) + math.log(sig(-0.5))) / 2
    np.testing.assert_allclose(call.generator_adversarial(fake), g, rtol=1e-6)
    d = -(math.log(sig(2.0)) + math.log(sig(-1.0))) / 2 - (math.log(1 - sig(0.5)) + math.log(1 - sig(-0.5))) / 2
    np.testing.assert_allclose(call.discriminator_loss(real, fake), d, rtol=1e-6)


def test_call_loss_combines_switched_terms():
    logits = jnp.zeros((1, 2, 3))
    targets = jnp.zeros((1, 2), jnp.int32)
    pred = jnp.ones((1, 2, 2))
    true = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    mask = jnp.ones((1, 2))
    fake = jnp.array([0.0])
    w = ml_collections.ConfigDict(dict(ce=1.0, mse=1.0, contrastive=0.1, adversarial=0.05))
    total, terms = call.call_loss(w, logits=logits, targets=targets, pred=pred, true=true, mask=mask,
                                  temperature=0.1, fake_logits=fake)
    expect = terms["ce"] + terms["mse"] + 0.1 * terms["contrastive"] + 0.05 * terms["adversarial"]
    np.testing.assert_allclose(total, expect, rtol=1e-6)
    np.testing.assert_allclose(terms["ce"], math.log(3), rtol=1e-6)
    w.mse = w.contrastive = w.adversarial = 0.0
    total, _ = call.call_loss(w, logits=logits, targets=targets, pred=pred, true=true, mask=mask, temperature=0.1,
                              fake_logits=fake)
    np.testing.assert_allclose(total, math.log(3), rtol=1e-6)
