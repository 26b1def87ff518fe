"""Stage ``planner``: next-concept prediction over the concept sequences of a frozen stage-1 encoder, CALL loss.

Data: the stage-1 workdir named by ``config.stage1_workdir`` is checked against this config (stage, K, code width,
data kind; a mismatch is refused naming each field), then its newest checkpoint encodes every stage-1 example
once into the concept indices of its top level, written as ArrayRecord files under
``data.cache_dir/<fingerprint of the stage-1 config and step>/`` with the codebook vectors; later runs reuse
them. Each example's concepts (its modalities' in model order) form one document ``BOS c_1 .. c_n``.

Training alternates, every step: one discriminator update (its own Adam, disc.learning_rate = 4e-4) on real
codebook-vector sequences vs the planner's predicted vectors, then one planner update on the CALL loss
(losses/call.py) read through the updated discriminator. With loss.adversarial = 0 the discriminator is not run.
Logged: loss, ce, mse, contrastive, adversarial, disc_loss, accuracy (next-concept).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from chimera_jax import config_lib
from chimera_jax.data import concept_data
from chimera_jax.layers import quantizers
from chimera_jax.losses import call
from chimera_jax.models.planner import Discriminator, Planner
from chimera_jax.stages.base import Stage
from chimera_jax.training import checkpointing
from chimera_jax.training import optimizer as opt_lib
from chimera_jax.training.train_state import TrainState

log = logging.getLogger(__name__)


@flax.struct.dataclass
class PlannerState(TrainState):
    """TrainState of the planner plus the discriminator's parameters and optimizer."""

    disc_params: Any = None
    disc_opt_state: Any = None
    disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)


class Stage1MismatchError(ValueError):
    pass


def check_stage1(config, stage1_workdir: str) -> ml_collections.ConfigDict:
    """The stage-1 resolved config, after checking that it is what this stage-2 config expects."""
    if not stage1_workdir:
        raise ValueError("config.stage1_workdir is empty: name the workdir of a trained stage-1 (stage vq) run")
    s1 = config_lib.load_resolved(os.path.expanduser(stage1_workdir))
    problems = []
    if s1.get("stage") != "vq":
        problems.append(f"its stage is {s1.get('stage')!r}, not 'vq'")
    else:
        k = quantizers.num_codes(s1.model.quantizer)
        if k != config.model.num_codes:
            problems.append(f"model.num_codes={config.model.num_codes} but its concept codebook has {k} codes "
                            f"(quantizer.kind={s1.model.quantizer.kind!r})")
        if s1.model.quantizer.code_dim != config.model.concept_dim:
            problems.append(f"model.concept_dim={config.model.concept_dim} but its quantizer.code_dim is "
                            f"{s1.model.quantizer.code_dim}")
        if s1.data.kind != config.data.kind:
            problems.append(f"data.kind={config.data.kind!r} but it was trained on data.kind={s1.data.kind!r}")
    if problems:
        raise Stage1MismatchError(f"stage1_workdir {stage1_workdir} does not match this config: "
                                  + "; ".join(problems))
    return s1


def encode_dataset(s1, stage1_workdir: str, cache_dir: str) -> str:
    """Encodes stage 1's train and validation examples into concept sequences, once; returns the directory."""
    step, params, model_state = checkpointing.restore_params(os.path.expanduser(stage1_workdir))
    where = os.path.abspath(os.path.expanduser(stage1_workdir))
    fingerprint = hashlib.sha256(f"{config_lib.to_json(s1)}|{where}|step={step}".encode()).hexdigest()[:16]
    out = os.path.join(os.path.expanduser(cache_dir), fingerprint)
    if os.path.exists(os.path.join(out, "meta.json")):
        log.info("reusing the encoded concepts in %s", out)
        return out
    from chimera_jax.stages.vq import VQStage  # stage 1's own model, data and encoder

    s1 = ml_collections.ConfigDict(s1)
    stage1 = VQStage(s1)
    variables = {"params": params, **model_state}
    encode = stage1.encode_fn()
    src = stage1.data.source
    os.makedirs(out, exist_ok=True)
    bs = s1.data.batch_size
    for split, ids in (("train", src.train_ids), ("eval", src.eval_ids)):
        seqs = []
        for start in range(0, len(ids), bs):
            chunk = ids[start:start + bs]
            batch = concept_data.batches_of(src, chunk, bs)[0]   # padded to bs with empty examples
            enc = jax.device_get(encode(variables, batch))
            for i in range(len(chunk)):
                parts = [np.asarray(enc[m][-1][0][i])[np.asarray(enc[m][-1][1][i]) > 0]
                         for m in stage1.model_cfg.modalities]
                seq = np.concatenate(parts)
                if len(seq):
                    seqs.append(seq)
        concept_data.write_sequences(os.path.join(out, f"{split}.array_record"), seqs)
    codebook = stage1.model.apply(variables, method=lambda mdl: mdl.top_codebook())
    np.save(os.path.join(out, "codebook.npy"), np.asarray(jax.device_get(codebook), np.float32))
    meta = dict(stage1_workdir=os.path.abspath(os.path.expanduser(stage1_workdir)), step=int(step),
                num_codes=int(quantizers.num_codes(s1.model.quantizer)))
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    return out


class PlannerStage(Stage):
    name = "planner"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        if m.vocab_size != m.num_codes + 1:
            raise ValueError(f"model.vocab_size={m.vocab_size} must be model.num_codes + 1 = {m.num_codes + 1}")
        if config.optimizer.grad_accum_steps != 1:
            raise ValueError("stage planner: optimizer.grad_accum_steps must be 1")
        self.stage1 = check_stage1(config, config.stage1_workdir)
        self.concept_dir = encode_dataset(self.stage1, config.stage1_workdir, config.data.cache_dir)
        self.codebook = jnp.asarray(np.load(os.path.join(self.concept_dir, "codebook.npy")))  # [K e], frozen
        self.model_cfg = ml_collections.FrozenConfigDict(config.model)
        self.model = Planner(self.model_cfg)
        disc_cfg = dict(config.disc)
        self.disc = Discriminator(ml_collections.FrozenConfigDict(disc_cfg))
        d = config.data
        self.data = concept_data.build_planner(
            os.path.join(self.concept_dir, "train.array_record"), os.path.join(self.concept_dir, "eval.array_record"),
            bos=m.num_codes, seq_len=d.seq_len, batch_size=d.batch_size, seed=config.seed,
            eval_batches=d.eval_batches)
        self.tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
        self.disc_tx = optax.adam(config.disc.learning_rate, b1=config.disc.b1, b2=config.disc.b2)
        self.tokens_per_step = d.batch_size * d.seq_len
        self.adversarial = config.loss.adversarial > 0

    def init(self, rng):
        r1, r2 = jax.random.split(rng)
        t = min(self.config.data.seq_len, 8)
        tokens = jnp.zeros((1, t), jnp.int32)
        params = self.model.init(r1, tokens, self.codebook)["params"]
        disc_params = self.disc.init(r2, jnp.zeros((1, t, self.codebook.shape[1])), jnp.ones((1, t)))["params"]
        zero = jnp.zeros((), jnp.int32)
        return PlannerState(step=zero, params=params, opt_state=self.tx.init(params), model_state={},
                            nonfinite_in_a_row=zero, nonfinite_total=zero, tx=self.tx, disc_params=disc_params,
                            disc_opt_state=self.disc_tx.init(disc_params), disc_tx=self.disc_tx)

    def _forward(self, params, batch):
        return self.model.apply({"params": params}, batch["inputs"], self.codebook,
                                segment_ids=batch["segment_ids"], positions=batch["positions"])

    def _true_vectors(self, targets):
        return jnp.take(self.codebook, jnp.minimum(targets, self.codebook.shape[0] - 1), axis=0)

    def _disc(self, disc_params, vectors, batch):
        return self.disc.apply({"params": disc_params}, vectors, batch["loss_mask"], batch["segment_ids"])

    def train_step(self, state: PlannerState, batch, rng):
        del rng  # every term is deterministic
        cfg = self.config.loss
        mask = batch["loss_mask"]
        true = self._true_vectors(batch["targets"])
        metrics = {}
        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if self.adversarial:
            _, fake = self._forward(state.params, batch)
            fake = jax.lax.stop_gradient(fake)

            def d_loss(dp):
                return call.discriminator_loss(self._disc(dp, true, batch), self._disc(dp, fake, batch))

            dl, dg = jax.value_and_grad(d_loss)(disc_params)
            upd, new_opt = self.disc_tx.update(dg, disc_opt_state, disc_params)
            finite = jnp.isfinite(dl) & jnp.isfinite(optax.tree.norm(dg))
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            disc_params = keep(optax.apply_updates(disc_params, upd), disc_params)
            disc_opt_state = keep(new_opt, disc_opt_state)
            metrics["disc_loss"] = dl

        def loss_fn(params):
            logits, pred = self._forward(params, batch)
            fake_logits = self._disc(disc_params, pred, batch) if self.adversarial else None
            total, terms = call.call_loss(cfg, logits=logits, targets=batch["targets"], pred=pred, true=true,
                                          mask=mask, temperature=cfg.temperature, fake_logits=fake_logits)
            return total, dict(terms, accuracy=call.accuracy(logits, batch["targets"], mask))

        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, upd = state.apply_gradients(grads, total)
        state = state.replace(disc_params=disc_params, disc_opt_state=disc_opt_state)
        lr = opt_lib.learning_rate_schedule(self.config.optimizer, self.config.total_steps)(state.step - 1)
        return state, dict(loss=total, **terms, **metrics, **upd, learning_rate=lr)

    def eval_step(self, state: PlannerState, batch):
        mask = batch["loss_mask"]
        logits, pred = self._forward(state.params, batch)
        true = self._true_vectors(batch["targets"])
        n = mask.sum()
        return dict(ce=call.cross_entropy(logits, batch["targets"], mask) * n,
                    correct=call.accuracy(logits, batch["targets"], mask) * n,
                    mse=call.mse(pred, true, mask) * n,
                    contrastive=call.info_nce(pred, true, mask, self.config.loss.temperature),
                    positions=n, batches=jnp.ones(()))

    def summarize_eval(self, sums):
        n = max(sums["positions"], 1.0)
        return dict(ce=sums["ce"] / n, accuracy=sums["correct"] / n, mse=sums["mse"] / n,
                    contrastive=sums["contrastive"] / max(sums["batches"], 1.0))
