"""The CALL loss of the stage-2 planner: cross-entropy on the next concept plus three losses on concept vectors.

    L = w_ce CE(indices) + w_mse MSE(v_hat, v) + w_nce InfoNCE(v_hat, v; tau) + w_adv adversarial(v_hat)

v_hat [b t e] is the planner's predicted concept vector (the probability-weighted mean of the codebook, see
models/planner.py), v [b t e] the codebook vector of the true next concept; mask [b t] marks the positions
that count. Each function returns a scalar mean over the counted positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _count(mask):
    return jnp.maximum(mask.sum(), 1.0)


def cross_entropy(logits, targets, mask):
    """Mean over counted positions of -log softmax(logits)[target]: logits [b t v], targets [b t]."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / _count(mask)


def accuracy(logits, targets, mask):
    return jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / _count(mask)


def mse(pred, true, mask):
    """Mean over counted positions and vector components of (pred - true)^2."""
    per = jnp.mean((pred.astype(jnp.float32) - true.astype(jnp.float32)) ** 2, axis=-1)
    return jnp.sum(per * mask) / _count(mask)


def info_nce(pred, true, mask, temperature: float):
    """InfoNCE (van den Oord et al., 2018) with cosine similarity and in-batch negatives.

    Every counted position i of the whole batch is a query pred_i; its positive is true_i and its negatives are the
    true vectors of every other counted position in the batch (repeats of the same concept included):
        L = mean_i [ -log( exp(cos(pred_i, true_i)/tau) / sum_j exp(cos(pred_i, true_j)/tau) ) ].
    """
    e = pred.shape[-1]
    p = pred.reshape(-1, e).astype(jnp.float32)
    q = true.reshape(-1, e).astype(jnp.float32)
    m = mask.reshape(-1).astype(jnp.float32)
    p = p / jnp.sqrt(jnp.sum(p * p, -1, keepdims=True) + 1e-12)
    q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-12)
    sim = (p @ q.T) / temperature                                              # [m m]
    sim = jnp.where(m[None, :] > 0, sim, -jnp.inf)
    logz = jax.nn.logsumexp(sim, axis=-1)
    nll = jnp.where(m > 0, logz - jnp.diagonal(sim), 0.0)
    return jnp.sum(nll) / _count(m)


def generator_adversarial(fake_logits):
    """Non-saturating generator loss -log sigmoid(D(fake)), mean over sequences: fake_logits [b]."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_loss(real_logits, fake_logits):
    """-log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), means over sequences: logits [b]."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def call_loss(weights, *, logits, targets, pred, true, mask, temperature, fake_logits=None):
    """-> (total, terms). ``weights``: ce, mse, contrastive, adversarial (0 switches a term off; the adversarial
    term also needs fake_logits). Every term is returned for logging, switched on or not."""
    terms = dict(ce=cross_entropy(logits, targets, mask), mse=mse(pred, true, mask),
                 contrastive=info_nce(pred, true, mask, temperature))
    if fake_logits is not None:
        terms["adversarial"] = generator_adversarial(fake_logits)
    total = 0.0
    for name, w in (("ce", weights.ce), ("mse", weights.mse), ("contrastive", weights.contrastive),
                    ("adversarial", weights.adversarial)):
        if w and name in terms:
            total = total + w * terms[name]
    return total, terms
