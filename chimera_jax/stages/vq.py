"""Stage ``vq``: the concept autoencoder (models/concept.py) trained to render its inputs' bytes from quantized
concepts.

Loss = sum over modalities of the byte cross-entropy of the AU-Net (mean over scored bytes)
     + sum over levels of the quantizer loss (VQ: beta * commitment [+ codebook loss without EMA] [+ usage KL])
     + loss.l1_weight * L1(expected pixel intensity, pixel) + loss.perceptual_weight * feature_distance.
The quantizers' EMA statistics and usage counters are the train state's ``model_state``.

Logged each step: loss, per-modality bits per byte, and per level the codebook perplexity, used fraction,
max-code ratio, dead fraction, commitment and usage KL. At each eval: image bits per pixel (over the 28 x 28
digit) and text bits per byte, the whole validation set's code usage per level (appended to
``codebook_usage.jsonl``), and a PNG grid of inputs above their reconstructions (``recon/step_N.png``; text lines in
``recon/step_N.txt``).

Perceptual hook: LPIPS needs pretrained network weights that are not bundled, so none is pretended. Instead
``loss.perceptual_features`` names an .npz of the user's own feature network, ``conv_0, conv_1, ...`` kernels
[kh kw cin cout] (ReLU after each, stride 1, 'SAME'; cin of conv_0 is 1) with optional per-channel weights
``weight_i`` [cout]; ``feature_distance`` compares unit-normalised features of the expected image and the truth
the LPIPS way (squared difference, channel-weighted, spatial mean, summed over layers).
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.data import concept_data
from chimera_jax.layers import aunet as aunet_lib
from chimera_jax.models import concept as concept_lib
from chimera_jax.stages.base import Stage
from chimera_jax.training import optimizer as opt_lib
from chimera_jax.training.train_state import TrainState, accumulated_grad


def byte_nll(logits, targets, mask):
    """Summed negative log-likelihood (nats) over masked bytes: logits [... 256], targets/mask [...]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - target) * mask)


def expected_intensity(logits):
    """E[byte] / 255 under the softmax: [... 256] -> [...] in [0, 1] (differentiable)."""
    return jax.nn.softmax(logits, axis=-1) @ jnp.arange(256, dtype=jnp.float32) / 255.0


def feature_distance(pred, target, kernels, weights=None):
    """Distance between two image batches [b H W] in [0, 1] through a user-supplied conv feature network.

    For each layer l: f = relu(conv(f)); f / ||f||_channels; sum_c w_c (f_pred - f_true)^2; mean over space and
    batch; summed over layers. kernels: [kh kw cin cout] arrays; weights: per-layer [cout] arrays or None (ones).
    """
    a, b = pred[..., None], target[..., None]
    total = 0.0
    for i, k in enumerate(kernels):
        conv = lambda x: jax.nn.relu(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
        a, b = conv(a), conv(b)
        na = a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-10)
        nb = b / jnp.sqrt(jnp.sum(b * b, -1, keepdims=True) + 1e-10)
        w = jnp.ones(k.shape[-1]) if weights is None or weights[i] is None else weights[i]
        total = total + jnp.mean(jnp.sum(w * (na - nb) ** 2, -1))
    return total


def load_feature_network(path: str):
    if not path:
        raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_features (an .npz of conv_i kernels)")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"loss.perceptual_features: {path} not found")
    z = np.load(path)
    n = len([k for k in z.files if k.startswith("conv_")])
    if n == 0:
        raise ValueError(f"loss.perceptual_features: {path} holds no conv_0 array")
    kernels = [jnp.asarray(z[f"conv_{i}"], jnp.float32) for i in range(n)]
    weights = [jnp.asarray(z[f"weight_{i}"], jnp.float32) if f"weight_{i}" in z.files else None for i in range(n)]
    return kernels, weights


def level_metrics(auxes) -> dict:
    out = {}
    for l, aux in enumerate(auxes):
        for k in ("perplexity", "used_fraction", "max_code_ratio", "dead_fraction", "commitment", "usage_kl",
                  "codebook"):
            if k in aux:
                out[f"level{l}/{k}"] = aux[k]
    return out


class VQStage(Stage):
    name = "vq"

    def __init__(self, config):
        super().__init__(config)
        m, d = config.model, config.data
        if (d.image_size, d.text_len) != (m.image_size, m.text_len):
            raise ValueError(f"data.image_size/text_len ({d.image_size}, {d.text_len}) must equal model's "
                             f"({m.image_size}, {m.text_len})")
        if config.optimizer.grad_accum_steps != 1:
            raise ValueError("stage vq: optimizer.grad_accum_steps must be 1 (the EMA codebook updates once per "
                             "batch)")
        self.model_cfg = ml_collections.FrozenConfigDict(config.model)
        self.model = concept_lib.ConceptModel(self.model_cfg)
        self.geo = {mod: concept_lib.geometry(self.model_cfg, mod) for mod in self.model_cfg.modalities}
        self.data = concept_data.build(config.data, seed=config.seed)
        self.tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
        self.tokens_per_step = config.data.batch_size
        self.feature_net = None
        if config.loss.perceptual_weight > 0:
            if "image" not in self.model_cfg.modalities:
                raise ValueError("loss.perceptual_weight > 0 needs the image modality")
            self.feature_net = load_feature_network(config.loss.perceptual_features)
        self._render_fn = None

    def _example_batch(self):
        return {k: jnp.asarray(v[:2]) for k, v in self.data.eval_batches[0].items()}

    def init(self, rng):
        variables = self.model.init({"params": rng}, self._example_batch(), train=False)
        params = variables.pop("params")
        return TrainState.create(params, self.tx, model_state=dict(variables))

    def _losses(self, logits, targets, masks, auxes):
        """-> (total loss, metrics). Reconstruction terms are means over scored bytes."""
        cfg = self.config.loss
        total = 0.0
        metrics = {}
        for m in logits:
            n = jnp.maximum(masks[m].sum(), 1.0)
            nll = byte_nll(logits[m], targets[m], masks[m]) / n
            total = total + nll
            metrics[f"{m}_bits_per_byte"] = nll / math.log(2)
        if cfg.l1_weight or cfg.perceptual_weight:
            pred = expected_intensity(logits["image"])                                     # [b n s]
            true = targets["image"].astype(jnp.float32) / 255.0
            if cfg.l1_weight:
                l1 = jnp.sum(jnp.abs(pred - true) * masks["image"]) / jnp.maximum(masks["image"].sum(), 1.0)
                total = total + cfg.l1_weight * l1
                metrics["l1"] = l1
            if cfg.perceptual_weight:
                g = self.geo["image"]
                feat = feature_distance(concept_lib.from_segments(pred, g), concept_lib.from_segments(true, g),
                                        *self.feature_net)
                total = total + cfg.perceptual_weight * feat
                metrics["perceptual"] = feat
        for aux in auxes:
            total = total + aux["loss"]
        return total, metrics

    def train_step(self, state: TrainState, batch, rng):
        def loss_fn(params, mb, rng):
            r = jax.random.split(rng, 3)
            (logits, targets, masks, _, auxes), updates = self.model.apply(
                {"params": params, **state.model_state}, mb, train=True, mutable=["quantizer"],
                rngs={"dropout": r[0], "quantizer": r[1], "slots": r[2]})
            total, metrics = self._losses(logits, targets, masks, auxes)
            metrics.update(level_metrics(auxes))
            return total, dict(metrics=metrics, model_state=dict(updates))

        total, aux, grads = accumulated_grad(loss_fn, state.params, batch, rng, 1)
        state, upd = state.apply_gradients(grads, total, model_state=aux["model_state"])
        lr = opt_lib.learning_rate_schedule(self.config.optimizer, self.config.total_steps)(state.step - 1)
        return state, dict(loss=total, **aux["metrics"], **upd, learning_rate=lr)

    def eval_step(self, state: TrainState, batch):
        logits, targets, masks, _, auxes = self.model.apply({"params": state.params, **state.model_state}, batch,
                                                            train=False)
        sums = dict(batches=jnp.ones(()))
        for m in logits:
            sums[f"{m}_nll"] = byte_nll(logits[m], targets[m], masks[m])
            sums[f"{m}_bytes"] = masks[m].sum()
        for k, v in level_metrics(auxes).items():
            if k.split("/")[1] in ("perplexity", "used_fraction", "max_code_ratio", "commitment"):
                sums[k] = v
        return sums

    def summarize_eval(self, sums):
        out = {}
        for m in self.model_cfg.modalities:
            bits = sums[f"{m}_nll"] / (math.log(2) * max(sums[f"{m}_bytes"], 1.0))
            out["image_bits_per_pixel" if m == "image" else f"{m}_bits_per_byte"] = bits
        n = max(sums["batches"], 1.0)
        out.update({k: v / n for k, v in sums.items() if k.startswith("level")})
        return out

    # ------------------------------------------------------------------------------------------ artefacts

    def encode_fn(self):
        """jit(variables, batch) -> (per-modality per-level indices and masks): for usage counts and stage 2."""
        def run(variables, batch):
            enc, _ = self.model.apply(variables, batch, method=lambda mdl, b: mdl.encode(b, train=False))
            return {m: [(lv["indices"], lv["mask"]) for lv in levels] for m, levels in enc.items()}
        return jax.jit(run)

    def render_fn(self):
        """jit(variables, batch, rng) -> {modality: bytes [b H W] or [b T]}: encode, then AU-Net sampling."""
        cfg, temp = self.model_cfg, float(self.config.eval.render_temperature)

        def conds(mdl, batch):
            enc, _ = mdl.encode(batch, train=False)
            return {m: mdl.condition(m, enc[m][-1]["zq"], enc[m][:-1]) for m in mdl.mods}

        def run(variables, batch, rng):
            cond = self.model.apply(variables, batch, method=conds)
            out = {}
            for m, c in cond.items():
                g = self.geo[m]
                b, n, _ = c.shape
                dec = aunet_lib.AUNet(cfg)
                dparams = {"params": variables["params"][f"aunet_{m}"]}
                toks = aunet_lib.sample(lambda t, cc: dec.apply(dparams, t, cc), c.reshape(b * n, -1),
                                        g["segment"], jax.random.fold_in(rng, len(out)), temp)
                out[m] = concept_lib.from_segments(toks.reshape(b, n, -1), g)
            return out
        return jax.jit(run)

    def codebook_usage(self, variables) -> dict:
        """Share of each level's codes used over the whole validation set, and the perplexity of that usage."""
        from chimera_jax.layers import quantizers

        k = quantizers.num_codes(self.model_cfg.quantizer)
        encode = self.encode_fn()
        counts = [np.zeros(k) for _ in range(self.model_cfg.num_levels)]
        for batch in concept_data.batches_of(self.data.source, self.data.source.eval_ids,
                                             self.config.data.batch_size):
            enc = jax.device_get(encode(variables, batch))
            for levels in enc.values():
                for l, (idx, mask) in enumerate(levels):
                    np.add.at(counts[l], np.asarray(idx).reshape(-1), np.asarray(mask).reshape(-1))
        out = {}
        for l, c in enumerate(counts):
            p = c / max(c.sum(), 1.0)
            h = -np.sum(p[p > 0] * np.log(p[p > 0]))
            out[f"level{l}/usage"] = float(np.mean(c > 0))
            out[f"level{l}/perplexity"] = float(np.exp(h))
            out[f"level{l}/vectors"] = float(c.sum())
        return out

    def on_eval(self, state, step: int, workdir: str) -> None:
        variables = {"params": state.params, **state.model_state}
        usage = self.codebook_usage(variables)
        with open(os.path.join(workdir, "codebook_usage.jsonl"), "a") as f:
            f.write(json.dumps({"step": int(step), **usage}) + "\n")
        n = self.config.eval.grid_examples
        batch = self.data.eval_batches[0]
        if self._render_fn is None:
            self._render_fn = self.render_fn()
        out = jax.device_get(self._render_fn(variables, batch, jax.random.PRNGKey(step)))
        os.makedirs(os.path.join(workdir, "recon"), exist_ok=True)
        if "image" in out:
            keep = np.nonzero(batch["has_image"] > 0)[0][:n]
            save_image_grid(os.path.join(workdir, "recon", f"step_{step:06d}.png"),
                            [batch["image"][keep], np.asarray(out["image"])[keep]])
        if "text" in out:
            keep = np.nonzero(batch["has_text"] > 0)[0][:n]
            with open(os.path.join(workdir, "recon", f"step_{step:06d}.txt"), "w") as f:
                for i in keep:
                    f.write("input : " + bytes_to_text(batch["text"][i]) + "\n")
                    f.write("render: " + bytes_to_text(np.asarray(out["text"])[i]) + "\n\n")


def bytes_to_text(row) -> str:
    """Bytes up to the first 0, decoded as UTF-8 with replacement characters."""
    row = np.asarray(row).astype(np.uint8)
    end = np.nonzero(row == 0)[0]
    row = row[:end[0]] if len(end) else row
    return row.tobytes().decode("utf-8", errors="replace")


def save_image_grid(path: str, rows, scale: int = 2, gap: int = 2) -> None:
    """Saves rows of equally sized grayscale uint8 images [n H W] as one PNG (PIL), each row a strip."""
    from PIL import Image

    rows = [np.asarray(r, np.uint8) for r in rows if len(r)]
    if not rows:
        return
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + gap) + gap, n * (w + gap) + gap), 128, np.uint8)
    for ri, r in enumerate(rows):
        for ci, img in enumerate(r):
            y, x = gap + ri * (h + gap), gap + ci * (w + gap)
            canvas[y:y + h, x:x + w] = img
    img = Image.fromarray(canvas, mode="L")
    if scale > 1:
        img = img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
