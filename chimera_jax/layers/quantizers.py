"""Quantizers that turn encoder vectors into discrete codes: VQ with an EMA codebook, and FSQ.

VQ (van den Oord et al., 2017, "Neural Discrete Representation Learning"): each vector takes its nearest
codebook entry; the encoder is trained through the straight-through estimator and a commitment loss
beta * ||z - sg(e)||^2; the codebook is either a parameter trained by the codebook loss ||sg(z) - e||^2 or
(``ema=True``, the default) an exponential moving average of the vectors assigned to each code (Razavi et al.,
2019). Codes unused for ``restart_after`` updates are restarted on recent encoder outputs (dead-code restarts,
as in Dhariwal et al., 2020, "Jukebox"). Initialisation is random, or k-means on the first training batch.

FSQ (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"): the vector is projected to
len(levels) dimensions, each bounded and rounded to one of ``levels[i]`` values; the implicit codebook is the
product grid of prod(levels) codes and needs no codebook loss. Without care its usage collapses: the encoder's
output drifts (its scale grows and it turns nearly one-dimensional), the straight-through gradient keeps pushing
the pre-quantization values past the last level where tanh saturates and their gradient vanishes, and every
vector ends on a handful of grid corners. Two normalisations keep the values spread over the grid: a
parameter-free layer norm of z before the down projection (Ba et al., 2016), so that at initialisation the
projected values have unit scale whatever the encoder's scale, and a whitening of the projected values over the
batch (decorrelated batch normalisation, Huang et al., 2018, by the Cholesky factor of the batch covariance,
differentiated through; running statistics at evaluation), so that every dimension is centred, of unit variance
and uncorrelated with the others, which the product grid needs to reach its corners. The optional usage KL of
FSQ is the exact KL of the batch's soft usage of the whole product grid to uniform (the batch-entropy term of
Yu et al., 2023, "Language Model Beats Diffusion", for lookup-free quantization).

Both quantizers take ``z [m d]`` (flattened positions) with a validity mask ``[m]`` and keep, in the
non-parameter collection ``quantizer``, a per-code counter of updates since the code was last used: the
"dead fraction" metric reads it. Health metrics (``codebook_stats``) and the code-usage KL to uniform
(``usage_kl_to_uniform``) are shared.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.layers import common

COLLECTION = "quantizer"  # non-parameter state: EMA statistics, codebook, usage counters


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``quantizer`` of the concept model config.

    kind: 'vq' | 'fsq'.
    num_codes: K of the VQ codebook (FSQ: prod(levels), checked).   code_dim: width of the VQ codebook vectors.
    ema: VQ codebook by EMA (True) or as a parameter trained by the codebook loss (False).
    decay: EMA decay.   eps: Laplace smoothing of the EMA counts.   beta: commitment weight (0.25).
    init: 'random' (normal, std init_scale) | 'kmeans' (Lloyd iterations on the first training batch).
    init_scale: std of the random initialisation.   kmeans_iters: Lloyd iterations for init='kmeans'.
    restart_after: restart a VQ code unused for this many updates on a recent encoder output (0 = off; EMA only).
    dead_after: the dead_fraction metric counts codes unused for this many updates.
    levels: FSQ levels per dimension, e.g. (8, 5, 5, 5) = 1000 codes.
    usage_kl_weight: weight of KL(code usage || uniform) (beta-VAE style disentanglement term; 0 = off). FSQ: over
        the whole product grid, an [m prod(levels)] soft assignment per batch.
    usage_temperature: temperature of the soft assignments that make the usage KL differentiable.
    fsq_layer_norm: FSQ: parameter-free layer norm of z before the down projection.
    fsq_whiten: FSQ: whiten the down projection's outputs over the batch (running statistics at evaluation).
    fsq_stats_decay: FSQ: EMA decay of the whitening's running mean and covariance.
    """
    return ml_collections.ConfigDict(dict(
        kind="vq", num_codes=512, code_dim=64, ema=True, decay=0.99, eps=1e-5, beta=0.25, init="random",
        init_scale=1.0, kmeans_iters=10, restart_after=100, dead_after=50, levels=(8, 5, 5, 5), usage_kl_weight=0.0,
        usage_temperature=1.0, fsq_layer_norm=True, fsq_whiten=True, fsq_stats_decay=0.9))


# ----------------------------------------------------------------------------------------------- shared pieces

def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value q, gradient of the identity with respect to z (the straight-through estimator)."""
    return z + jax.lax.stop_gradient(q - z)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """||z_i - e_k||^2 by expansion: z [m d], codebook [K d] -> [m K] (the fast path)."""
    zz = jnp.sum(z * z, axis=-1, keepdims=True)
    ee = jnp.sum(codebook * codebook, axis=-1)[None]
    return jnp.maximum(zz - 2.0 * z @ codebook.T + ee, 0.0)


def squared_distances_reference(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """The same by explicit differences (the oracle of ``squared_distances``)."""
    return jnp.sum((z[:, None, :] - codebook[None, :, :]) ** 2, axis=-1)


def ema_update(ema_count, ema_sum, z, onehot, decay: float, eps: float):
    """One EMA codebook update (Razavi et al., 2019, appendix), closed form:

        N_k <- decay N_k + (1 - decay) n_k,         n_k = sum_i onehot_ik
        S_k <- decay S_k + (1 - decay) s_k,         s_k = sum_i onehot_ik z_i
        e_k  = S_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)

    ema_count [K], ema_sum [K d], z [m d], onehot [m K] (masked rows all zero) -> (count, sum, codebook).
    """
    k = ema_count.shape[0]
    count = decay * ema_count + (1.0 - decay) * onehot.sum(axis=0)
    total = decay * ema_sum + (1.0 - decay) * (onehot.T @ z)
    n = count.sum()
    smoothed = (count + eps) / (n + k * eps) * n
    return count, total, total / smoothed[:, None]


def restart_dead_codes(codebook, ema_count, ema_sum, unused, z, mask, rng, restart_after: int):
    """Codes unused for ``restart_after`` updates or more are moved onto randomly chosen valid rows of z.

    A restarted code's EMA statistics are reset to (count 1, sum = its new vector) so that the next EMA update
    keeps it there, and its unused counter restarts at 0. Returns (codebook, ema_count, ema_sum, unused).
    """
    dead = unused >= restart_after                                        # [K]
    logits = jnp.where(mask > 0, 0.0, -jnp.inf)                           # [m]: draw valid rows only
    rows = jax.random.categorical(rng, logits, shape=(codebook.shape[0],))
    fresh = z[rows]                                                       # [K d]
    has_rows = mask.sum() > 0
    dead = dead & has_rows
    codebook = jnp.where(dead[:, None], fresh, codebook)
    ema_sum = jnp.where(dead[:, None], fresh, ema_sum)
    ema_count = jnp.where(dead, 1.0, ema_count)
    unused = jnp.where(dead, 0, unused)
    return codebook, ema_count, ema_sum, unused


def kmeans(z, mask, rng, k: int, iters: int):
    """Lloyd's k-means on the valid rows of z [m d]: k centres [k d], seeded from random valid rows.

    With fewer valid rows than k, seeds repeat; their duplicates are pulled apart by a small jitter.
    """
    logits = jnp.where(mask > 0, 0.0, -jnp.inf)
    r1, r2 = jax.random.split(rng)
    centres = z[jax.random.categorical(r1, logits, shape=(k,))]
    centres = centres + 1e-3 * jnp.std(z) * jax.random.normal(r2, centres.shape, z.dtype)

    def step(centres, _):
        assign = jax.nn.one_hot(jnp.argmin(squared_distances(z, centres), -1), k, dtype=z.dtype) * mask[:, None]
        n = assign.sum(0)
        mean = (assign.T @ z) / jnp.maximum(n, 1.0)[:, None]
        return jnp.where(n[:, None] > 0, mean, centres), None

    centres, _ = jax.lax.scan(step, centres, None, length=iters)
    return centres


def codebook_stats(indices, mask, num_codes: int, unused=None, dead_after: int = 1) -> dict[str, jax.Array]:
    """Codebook health over the valid entries of ``indices [m]``.

    perplexity: exp(entropy of the batch's code-usage distribution p) (K when usage is uniform).
    used_fraction: share of the K codes used at least once in the batch.
    max_code_ratio: K * max_k p_k, the most used code's frequency over the uniform 1/K (1 = uniform, K = collapse).
    dead_fraction: share of codes unused for ``dead_after`` updates or more (from the ``unused`` counters).
    """
    counts = jnp.zeros((num_codes,), jnp.float32).at[indices].add(mask.astype(jnp.float32))
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    out = dict(perplexity=jnp.exp(entropy), used_fraction=jnp.mean(counts > 0), max_code_ratio=num_codes * p.max())
    if unused is not None:
        out["dead_fraction"] = jnp.mean(unused >= dead_after)
    return out


def usage_kl_to_uniform(assign, mask) -> jax.Array:
    """KL(p || uniform) = log K - H(p) of the average soft assignment p over the valid rows of assign [m K]."""
    k = assign.shape[-1]
    p = (assign * mask[:, None]).sum(0) / jnp.maximum(mask.sum(), 1.0)
    return jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-12)) + math.log(k)))


def _update_unused(unused, indices, mask):
    used = jnp.zeros(unused.shape, jnp.int32).at[indices].max((mask > 0).astype(jnp.int32))
    return jnp.where(used > 0, 0, unused + 1)


def _masked_mean_sq(a, b, mask):
    """Mean over valid rows of the mean over features of (a - b)^2."""
    per_row = jnp.mean((a - b) ** 2, axis=-1)
    return jnp.sum(per_row * mask) / jnp.maximum(mask.sum(), 1.0)


# ------------------------------------------------------------------------------------------------------ VQ

class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ. __call__(z [m d], mask [m], update) -> (z_q [m d] with STE gradient, indices [m], aux).

    aux: commitment (||z - sg(e)||^2), codebook (||sg(z) - e||^2; no gradient with EMA), loss (codebook +
    beta * commitment + usage_kl_weight * usage_kl), usage_kl, and the codebook_stats metrics.
    ``update=True`` (training, collection 'quantizer' mutable) applies the EMA update, k-means initialisation on
    the first call and dead-code restarts (rng stream 'quantizer').
    """

    cfg: ml_collections.FrozenConfigDict  # the quantizer sub-block

    def setup(self):
        q = self.cfg
        k, d = q.num_codes, q.code_dim
        init = lambda rng: q.init_scale * jax.random.normal(rng, (k, d), jnp.float32)
        if q.ema:
            self.codebook_var = self.variable(COLLECTION, "codebook", lambda: init(self.make_rng("params")))
            self.ema_count = self.variable(COLLECTION, "ema_count", jnp.ones, (k,), jnp.float32)
            self.ema_sum = self.variable(COLLECTION, "ema_sum", lambda: self.codebook_var.value)
        else:
            self.codebook_param = common.param(self, "codebook", lambda rng, shape, dtype: init(rng), (k, d),
                                               ("vocab", "embed"))
        self.unused = self.variable(COLLECTION, "unused", jnp.zeros, (k,), jnp.int32)
        self.initialized = self.variable(COLLECTION, "initialized", lambda: jnp.zeros((), jnp.int32))

    def codebook(self) -> jax.Array:
        """[K d] codebook vectors."""
        return self.codebook_var.value if self.cfg.ema else self.codebook_param

    def codebook_vectors(self) -> jax.Array:
        return self.codebook()

    def lookup(self, indices: jax.Array) -> jax.Array:
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z, mask=None, *, update: bool = False):
        q = self.cfg
        k = q.num_codes
        if z.shape[-1] != q.code_dim:
            raise ValueError(f"quantizer.code_dim={q.code_dim} but the encoder gives vectors of width {z.shape[-1]}")
        z = z.astype(jnp.float32)
        mask = jnp.ones(z.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        update = update and self.is_mutable_collection(COLLECTION)
        zs = jax.lax.stop_gradient(z)

        if update and q.ema and q.init == "kmeans":
            rng = self.make_rng("quantizer")
            first = self.initialized.value == 0
            centres = jax.lax.cond(first, lambda: kmeans(zs, mask, rng, k, q.kmeans_iters),
                                   lambda: self.codebook_var.value)
            self.codebook_var.value = centres
            self.ema_sum.value = jnp.where(first, centres * self.ema_count.value[:, None], self.ema_sum.value)
        if update:
            self.initialized.value = jnp.ones((), jnp.int32)

        codebook = self.codebook()
        dist = squared_distances(zs, jax.lax.stop_gradient(codebook) if q.ema else codebook)
        indices = jnp.argmin(dist, axis=-1)                                 # [m]
        e = jnp.take(codebook, indices, axis=0)                             # [m d]
        commitment = _masked_mean_sq(z, jax.lax.stop_gradient(e), mask)
        codebook_loss = _masked_mean_sq(zs, e, mask)
        usage_kl = jnp.zeros((), jnp.float32)
        if q.usage_kl_weight:
            soft = jax.nn.softmax(-squared_distances(z, jax.lax.stop_gradient(codebook)) / q.usage_temperature, -1)
            usage_kl = usage_kl_to_uniform(soft, mask)
        stats = codebook_stats(indices, mask, k, self.unused.value, q.dead_after)

        if update:
            unused = _update_unused(self.unused.value, indices, mask)
            if q.ema:
                onehot = jax.nn.one_hot(indices, k, dtype=jnp.float32) * mask[:, None]
                count, total, new_codebook = ema_update(self.ema_count.value, self.ema_sum.value, zs, onehot,
                                                        q.decay, q.eps)
                if q.restart_after:
                    new_codebook, count, total, unused = restart_dead_codes(
                        new_codebook, count, total, unused, zs, mask, self.make_rng("quantizer"), q.restart_after)
                self.ema_count.value, self.ema_sum.value, self.codebook_var.value = count, total, new_codebook
            self.unused.value = unused

        loss = (0.0 if q.ema else codebook_loss) + q.beta * commitment + q.usage_kl_weight * usage_kl
        aux = dict(loss=loss, commitment=commitment, codebook=codebook_loss, usage_kl=usage_kl, **stats)
        return straight_through(z, e), indices, aux


# ----------------------------------------------------------------------------------------------------- FSQ

def fsq_basis(levels: Sequence[int]) -> np.ndarray:
    """Mixed-radix place values: index = sum_i digit_i * basis_i, basis_0 = 1."""
    return np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int32)


def fsq_bound(z, levels, eps: float = 1e-3):
    """Squashes each dimension into (-(L-1)/2, (L-1)/2) (shifted by 1/2 for even L) so rounding gives L values."""
    lv = jnp.asarray(levels, z.dtype)
    half = (lv - 1) * (1 + eps) / 2
    offset = jnp.where(lv % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half)
    return jnp.tanh(z + shift) * half - offset


def fsq_quantize(z, levels):
    """Bounded, rounded with the STE, and normalised to [-1, 1]: z [... n_levels] -> codes [... n_levels]."""
    bounded = fsq_bound(z, levels)
    rounded = straight_through(bounded, jnp.round(bounded))
    return rounded / jnp.asarray([l // 2 for l in levels], z.dtype)


def fsq_codes_to_indices(codes, levels) -> jax.Array:
    """Normalised codes [... n_levels] -> integer indices [...] in [0, prod(levels))."""
    half = jnp.asarray([l // 2 for l in levels], codes.dtype)
    digits = jnp.round(codes * half + half).astype(jnp.int32)  # 0 .. L-1 per dimension
    return jnp.sum(digits * jnp.asarray(fsq_basis(levels)), axis=-1)


def fsq_indices_to_codes(indices, levels, dtype=jnp.float32) -> jax.Array:
    """Integer indices [...] -> normalised codes [... n_levels] (the inverse of fsq_codes_to_indices)."""
    lv = jnp.asarray(levels, jnp.int32)
    digits = (indices[..., None] // jnp.asarray(fsq_basis(levels))) % lv
    half = jnp.asarray([l // 2 for l in levels], dtype)
    return (digits.astype(dtype) - half) / half


def layer_norm(z, eps: float = 1e-6):
    """Parameter-free layer norm over the last axis: zero mean and unit variance per row."""
    mu = jnp.mean(z, -1, keepdims=True)
    return (z - mu) * jax.lax.rsqrt(jnp.mean((z - mu) ** 2, -1, keepdims=True) + eps)


def batch_moments(h, mask):
    """Mean [n] and (biased) covariance [n n] of the valid rows of h [m n]."""
    count = jnp.maximum(mask.sum(), 1.0)
    mu = (h * mask[:, None]).sum(0) / count
    c = (h - mu) * mask[:, None]
    return mu, c.T @ c / count


def whiten(h, mu, cov, eps: float = 1e-5):
    """(h - mu) L^-T with L L^T = cov + eps I: unit, uncorrelated dimensions if (mu, cov) are h's moments.

    h [m n] -> [m n]. The Cholesky factor (rather than cov^-1/2 by eigendecomposition) keeps the gradient finite
    when eigenvalues coincide.
    """
    chol = jnp.linalg.cholesky(cov + eps * jnp.eye(cov.shape[0], dtype=cov.dtype))
    return jax.scipy.linalg.solve_triangular(chol, (h - mu).T, lower=True).T


def whiten_reference(h, mu, cov, eps: float = 1e-5):
    """The same with an explicit inverse of the Cholesky factor (the oracle of ``whiten``)."""
    chol = jnp.linalg.cholesky(cov + eps * jnp.eye(cov.shape[0], dtype=cov.dtype))
    return (h - mu) @ jnp.linalg.inv(chol).T


def fsq_soft_levels(bounded, levels, temperature: float) -> list[jax.Array]:
    """Per dimension i, softmax over its L_i levels of -(bounded_i - level)^2 / temperature: [m L_i] each."""
    out = []
    for i, l in enumerate(levels):
        values = jnp.arange(l, dtype=bounded.dtype) - l // 2
        out.append(jax.nn.softmax(-(bounded[:, i:i + 1] - values[None]) ** 2 / temperature, -1))
    return out


def fsq_joint_soft_assign(bounded, levels, temperature: float) -> jax.Array:
    """Soft assignment [m prod(levels)] to the product grid: the product of the per-dimension level softmaxes.

    Column k is the code of index k (fsq_basis order: dimension 0 varies fastest), built by outer products.
    """
    soft = fsq_soft_levels(bounded, levels, temperature)
    joint = soft[0]
    for s in soft[1:]:
        joint = (s[:, :, None] * joint[:, None, :]).reshape(s.shape[0], -1)
    return joint


def fsq_joint_soft_assign_reference(bounded, levels, temperature: float) -> jax.Array:
    """The same code by code: p(k) = prod_i soft_i[digit_i(k)] (the oracle of ``fsq_joint_soft_assign``)."""
    soft = fsq_soft_levels(bounded, levels, temperature)
    k = int(np.prod(levels))
    digits = (np.arange(k)[:, None] // fsq_basis(levels)) % np.asarray(levels)            # [K n]
    cols = [jnp.prod(jnp.stack([soft[i][:, digits[c, i]] for i in range(len(levels))]), axis=0) for c in range(k)]
    return jnp.stack(cols, axis=-1)


class FSQ(nn.Module):
    """Finite scalar quantization between two projections: z [m d] -> len(levels) dims -> grid -> [m d].

    z is layer-normed (``fsq_layer_norm``), projected down to h [m n_levels], whitened over the batch's valid rows
    (``fsq_whiten``: batch moments in training with ``update=True``, their running averages otherwise), bounded,
    rounded with the straight-through estimator, and projected up.
    Same interface as VectorQuantizer; aux['loss'] holds only the optional usage KL (FSQ has no codebook or
    commitment loss). The implicit codebook (``codebook_vectors``) is every grid point after the up-projection.
    """

    cfg: ml_collections.FrozenConfigDict  # the quantizer sub-block

    def setup(self):
        q = self.cfg
        self.levels = tuple(int(l) for l in q.levels)
        k = int(np.prod(self.levels))
        if q.num_codes != k:
            raise ValueError(f"quantizer.num_codes={q.num_codes} but FSQ levels {self.levels} give {k} codes")
        n = len(self.levels)
        # Unit-variance inputs (layer-normed) times N(0, 1/d) weights: h starts with unit variance per dimension,
        # the scale at which tanh spreads it over every level.
        self.down = common.DenseGeneral(n, ("embed", None), use_bias=True, name="down")
        self.up = common.DenseGeneral(q.code_dim, (None, "embed"), use_bias=True, name="up")
        self.unused = self.variable(COLLECTION, "unused", jnp.zeros, (k,), jnp.int32)
        if q.get("fsq_whiten", False):
            self.h_mean = self.variable(COLLECTION, "h_mean", jnp.zeros, (n,), jnp.float32)
            self.h_cov = self.variable(COLLECTION, "h_cov", lambda: jnp.eye(n, dtype=jnp.float32))

    def codebook_vectors(self) -> jax.Array:
        k = int(np.prod(self.levels))
        return self.up(fsq_indices_to_codes(jnp.arange(k), self.levels))

    def lookup(self, indices):
        return self.up(fsq_indices_to_codes(indices, self.levels))

    def pre_quantization(self, z, mask, update: bool) -> jax.Array:
        """z [m d] -> h [m n_levels], the values that are bounded and rounded."""
        q = self.cfg
        # .get: configs saved before these fields existed describe models trained without them.
        if q.get("fsq_layer_norm", False):
            z = layer_norm(z)
        h = self.down(z)                                                    # [m n_levels]
        if not q.get("fsq_whiten", False):
            return h
        mu, cov = self.h_mean.value, self.h_cov.value
        if update and self.is_mutable_collection(COLLECTION):
            # Batch moments, differentiated through as in batch normalisation (the encoder then cannot move h
            # by a shift or scale the whitening undoes); a batch with fewer than 2 valid rows keeps the averages.
            enough = mask.sum() >= 2
            b_mu, b_cov = batch_moments(h, mask)
            mu, cov = jnp.where(enough, b_mu, mu), jnp.where(enough, b_cov, cov)
            d = q.fsq_stats_decay
            self.h_mean.value = jnp.where(enough, d * self.h_mean.value + (1 - d) * jax.lax.stop_gradient(b_mu),
                                          self.h_mean.value)
            self.h_cov.value = jnp.where(enough, d * self.h_cov.value + (1 - d) * jax.lax.stop_gradient(b_cov),
                                         self.h_cov.value)
        return whiten(h, mu, cov)

    def __call__(self, z, mask=None, *, update: bool = False):
        q = self.cfg
        k = int(np.prod(self.levels))
        z = z.astype(jnp.float32)
        mask = jnp.ones(z.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        h = self.pre_quantization(z, mask, update)                          # [m n_levels]
        codes = fsq_quantize(h, self.levels)
        indices = fsq_codes_to_indices(jax.lax.stop_gradient(codes), self.levels)
        usage_kl = jnp.zeros((), jnp.float32)
        if q.usage_kl_weight:
            # The batch's soft usage of the whole grid (per-dimension usage terms alone leave the dimensions free
            # to be correlated, which leaves most of the grid unused).
            joint = fsq_joint_soft_assign(fsq_bound(h, self.levels), self.levels, q.usage_temperature)  # [m K]
            usage_kl = usage_kl_to_uniform(joint, mask)
        stats = codebook_stats(indices, mask, k, self.unused.value, q.dead_after)
        if update and self.is_mutable_collection(COLLECTION):
            self.unused.value = _update_unused(self.unused.value, indices, mask)
        zero = jnp.zeros((), jnp.float32)
        aux = dict(loss=q.usage_kl_weight * usage_kl, commitment=zero, codebook=zero, usage_kl=usage_kl, **stats)
        return self.up(codes), indices, aux


def build(cfg: ml_collections.FrozenConfigDict, name: str | None = None) -> nn.Module:
    """The quantizer named by ``cfg.kind``."""
    if cfg.kind == "vq":
        return VectorQuantizer(cfg, name=name)
    if cfg.kind == "fsq":
        return FSQ(cfg, name=name)
    raise ValueError(f"quantizer.kind must be 'vq' or 'fsq', got {cfg.kind!r}")


def num_codes(cfg) -> int:
    return int(np.prod(cfg.levels)) if cfg.kind == "fsq" else int(cfg.num_codes)
