"""Stage ``lm``: next-token prediction on packed text (any layer pattern of models/lm.py)."""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.data import lm_pipeline
from chimera_jax.layers import registry
from chimera_jax.models.lm import LM, head_logits, sample_loop_counts
from chimera_jax.stages.base import Stage
from chimera_jax.training import optimizer as opt_lib
from chimera_jax.training.train_state import TrainState, accumulated_grad


def cross_entropy(logits, targets, mask):
    """Summed negative log-likelihood and correct-prediction count over masked positions.

    logits [b t v] float32, targets [b t] int32, mask [b t] float -> (nll_sum, correct_sum) scalars.
    """
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - target_logit) * mask
    correct = (jnp.argmax(logits, axis=-1) == targets) * mask
    return nll.sum(), correct.sum()


def chunked_cross_entropy(head, hidden, targets, mask, chunk: int):
    """``cross_entropy`` of ``head(hidden)`` computed ``chunk`` positions at a time, each chunk rematerialised.

    head: x [b c d] -> logits [b c v] float32. hidden [b t d], targets / mask [b t].
    Why: with a large vocabulary the [b t v] float32 logits, their softmax and their gradient are the largest
    arrays of a training step (8 x 2048 x 128256 x 4 bytes = 8.4 GB each); here only one chunk's logits exist at a
    time, in the forward and again in the backward, at the price of computing the head's product twice.
    """
    b, t, d = hidden.shape
    pad = (-t) % chunk
    if pad:  # padded positions carry mask 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    @jax.checkpoint
    def one(xc, tc, mc):
        return cross_entropy(head(xc), tc, mc)

    def body(acc, xs):
        nll, correct = one(*xs)
        return (acc[0] + nll, acc[1] + correct), None

    xs = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1),
          mask.reshape(b, n, chunk).swapaxes(0, 1))
    zero = jnp.zeros((), jnp.float32)
    (nll, correct), _ = jax.lax.scan(body, (zero, zero), xs)
    return nll, correct


def model_flops_per_token(model_cfg, params, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) by the PaLM count: 6 N + 12 L_attn h k T.

    N counts the parameters used in matmuls (the embedding table only when it is also the output head).
    """
    n = sum(x.size for x in jax.tree.leaves(params))
    if not model_cfg.tie_embeddings:
        n -= model_cfg.vocab_size * model_cfg.d_model
    a = model_cfg.attention
    attn = 0.0
    for code in registry.parse_pattern(model_cfg.pattern, model_cfg.num_layers):
        if code in ("A", "SW"):
            span = min(seq_len, a.window) if code == "SW" else seq_len
            attn += 12 * a.num_heads * a.head_dim * span
    return 6 * n + attn


class LMStage(Stage):
    name = "lm"

    def __init__(self, config):
        super().__init__(config)
        self.model_cfg = ml_collections.FrozenConfigDict(config.model)
        self.model = LM(self.model_cfg)
        self.loss_chunk = int(self.model_cfg.get("loss_chunk", 0))
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be >= 0 (0: whole-sequence logits), got {self.loss_chunk}")
        registry.parse_pattern(self.model_cfg.pattern, self.model_cfg.num_layers)  # fail early on a bad pattern
        self.data = lm_pipeline.build(config.data, seed=config.seed, vocab_size=config.model.vocab_size)
        self.tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
        self.token_bytes = jnp.asarray(np.pad(self.data.tokenizer.token_bytes,
                                              (0, config.model.vocab_size - self.data.tokenizer.vocab_size)))
        b, t = config.data.batch_size, config.data.seq_len
        self.tokens_per_step = b * t
        abstract = jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))
        self.num_params = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
        self.flops_per_step = model_flops_per_token(config.model, nn.meta.unbox(abstract["params"]), t) * b * t

    def prepare_workdir(self, workdir: str) -> None:
        model_path = getattr(self.data.tokenizer, "model_path", None)
        if model_path:  # sampling and evaluation read the SentencePiece model from the workdir
            import shutil

            shutil.copyfile(model_path, os.path.join(workdir, "tokenizer.model.tmp"))
            os.replace(os.path.join(workdir, "tokenizer.model.tmp"), os.path.join(workdir, "tokenizer.model"))

    def _init_variables(self, rng):
        t = min(self.config.data.seq_len, 8)
        tokens = jnp.zeros((1, t), jnp.int32)
        return self.model.init(rng, tokens)

    def init(self, rng):
        variables = self._init_variables(rng)
        params = variables.pop("params")
        return TrainState.create(params, self.tx, model_state=dict(variables))

    def _forward(self, params, model_state, batch, mutable, rng=None):
        variables = {"params": params, **model_state}
        loop_counts = None if rng is None else sample_loop_counts(self.model_cfg, rng, batch["inputs"].shape[0])
        # Synthetic rows hold one document each: no segment mask, which lets attention take the fused kernel.
        packed = self.config.data.source != "synthetic"
        out, updates = self.model.apply(variables, batch["inputs"],
                                        segment_ids=batch["segment_ids"] if packed else None,
                                        positions=batch["positions"] if packed else None, mutable=mutable,
                                        loop_counts=loop_counts, return_hidden=bool(self.loss_chunk))
        return out[0], updates

    def _loss_sums(self, params, out, batch):
        """(nll_sum, correct_sum) from the model's output: logits, or hidden states with ``model.loss_chunk``."""
        if self.loss_chunk:
            head = lambda x: head_logits(self.model_cfg, params, x)  # noqa: E731
            return chunked_cross_entropy(head, out, batch["targets"], batch["loss_mask"], self.loss_chunk)
        return cross_entropy(out, batch["targets"], batch["loss_mask"])

    def train_step(self, state: TrainState, batch, rng):
        # Collections a forward pass may write: the non-parameter state, sown metrics, and MoE expert loads.
        mutable = list(state.model_state.keys()) + ["metrics", "intermediates"]

        def loss_fn(params, mb, mb_rng):
            out, updates = self._forward(params, state.model_state, mb, mutable, rng=mb_rng)
            nll, correct = self._loss_sums(params, out, mb)
            n = jnp.maximum(mb["loss_mask"].sum(), 1.0)
            loss = nll / n
            extra = jax.tree.map(jnp.mean, dict(updates.get("metrics", {})))
            aux_loss = sum(jnp.sum(v) for k, v in _flat(extra).items() if k.endswith("aux_loss"))
            model_state = {k: v for k, v in updates.items() if k not in ("metrics", "intermediates")}
            if "moe_stats" in model_state:
                from chimera_jax.layers import moe

                inter = updates.get("intermediates", {})
                aux_loss = aux_loss + moe.balance_loss(inter)
                if self.model_cfg.moe.bias_balance:  # aux-loss-free balancing: the bias follows the loads
                    model_state["moe_stats"] = moe.update_bias(model_state["moe_stats"], inter,
                                                               self.model_cfg.moe.bias_update_rate)
                extra.update({f"moe/{k}": jnp.mean(v) for k, v in _flat(inter).items()
                              if k.endswith("max_load_ratio")})
            return loss + aux_loss, dict(loss=loss, accuracy=correct / n, model_state=model_state, extra=extra)

        total, aux, grads = accumulated_grad(loss_fn, state.params, batch, rng, self.config.optimizer.grad_accum_steps)
        state, update_metrics = state.apply_gradients(grads, total, model_state=aux["model_state"] or None)
        metrics = dict(loss=aux["loss"], accuracy=aux["accuracy"], **update_metrics,
                       learning_rate=opt_lib.learning_rate_schedule(self.config.optimizer,
                                                                    self.config.total_steps)(state.step - 1))
        metrics.update({k: v for k, v in _flat(aux["extra"]).items()})
        return state, metrics

    def eval_step(self, state: TrainState, batch):
        out, _ = self._forward(state.params, state.model_state, batch, mutable=["metrics"])
        nll, correct = self._loss_sums(state.params, out, batch)
        nbytes = (self.token_bytes[batch["targets"]] * batch["loss_mask"]).sum()
        return dict(nll=nll, correct=correct, tokens=batch["loss_mask"].sum(), bytes=nbytes)

    def summarize_eval(self, sums):
        tokens = max(sums["tokens"], 1.0)
        return dict(loss=sums["nll"] / tokens, accuracy=sums["correct"] / tokens,
                    bpb=sums["nll"] / (math.log(2) * max(sums["bytes"], 1.0)))


def _flat(tree, prefix=""):
    """{'layer_0': {'ffn': {'load': x}}} -> {'layer_0/ffn/load': x} (sown metrics, as scalars)."""
    out = {}
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
    elif isinstance(tree, tuple):
        if len(tree) == 1:
            out.update(_flat(tree[0], prefix))
        else:
            for i, v in enumerate(tree):
                out.update(_flat(v, f"{prefix}{i}/"))
    else:
        out[prefix.rstrip("/")] = tree
    return out
