"""Autoregressive sampling: prefill the prompt into the model's caches, then decode one token at a time.

Sampling controls act on the next-token logits in this order: repetition penalty (CTRL: divide positive logits,
multiply negative ones, of tokens already seen), temperature, top-k, top-p (nucleus). temperature=0 is greedy.
"""
from __future__ import annotations

import codecs
import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax import config_lib
from chimera_jax.models.lm import LM
from chimera_jax.training import checkpointing


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    repetition_penalty: float = 1.0  # 1: off


def next_token(logits: jax.Array, seen: jax.Array, rng: jax.Array, opts: SamplingOptions) -> jax.Array:
    """logits [b v] float32, seen [b v] bool (tokens in the context) -> tokens [b] int32."""
    if opts.repetition_penalty != 1.0:
        penalised = jnp.where(logits > 0, logits / opts.repetition_penalty, logits * opts.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if opts.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / opts.temperature
    if opts.top_k:
        kth = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if opts.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) >= opts.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Sampler:
    """A trained LM loaded from a workdir, with jitted prefill and decode steps."""

    def __init__(self, workdir: str, step: int | None = None):
        self.config = config_lib.load_resolved(workdir)
        if self.config.stage != "lm":
            raise ValueError(f"{workdir} holds a {self.config.stage!r} run; sampling needs an 'lm' run")
        self.model_cfg = ml_collections.FrozenConfigDict(self.config.model)
        self.model = LM(self.model_cfg)
        self.step, params, model_state = checkpointing.restore_params(workdir, step)
        self.variables = {"params": params, **model_state}
        self.tokenizer = load_tokenizer(workdir, self.config)
        self._prefill = jax.jit(lambda v, toks, cache: self.model.apply(v, toks, cache=cache))
        self._decode = jax.jit(lambda v, tok, cache: self.model.apply(v, tok, cache=cache, decode=True))

    def generate(self, prompt: str, max_new_tokens: int, opts: SamplingOptions, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, stop_at_eos: bool = True) -> list[int]:
        """Samples up to ``max_new_tokens`` after ``prompt``; past an end of document it goes on to the next
        document unless ``stop_at_eos``."""
        tok = self.tokenizer
        ids = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)[None]  # [1 t]
        cache = self.model.init_cache(1, ids.shape[1] + max_new_tokens)
        logits, cache = self._prefill(self.variables, jnp.asarray(ids), cache)
        seen = jnp.zeros((1, self.model_cfg.vocab_size), bool).at[0, ids[0]].set(True)
        rng = jax.random.PRNGKey(seed)
        out = []
        last = logits[:, -1]
        for i in range(max_new_tokens):
            t = next_token(last, seen, jax.random.fold_in(rng, i), opts)
            token = int(t[0])
            if token == tok.eos_id and stop_at_eos:
                break
            out.append(token)
            if on_token:
                on_token(token)
            seen = seen.at[0, token].set(True)
            logits, cache = self._decode(self.variables, t[:, None], cache)
            last = logits[:, -1]
        return out


def load_tokenizer(workdir: str, config):
    """The tokenizer a run was trained with (a SentencePiece model is copied into the workdir at train time)."""
    import os

    from chimera_jax.data import tokenizers

    if config.data.tokenizer == "bytes":
        return tokenizers.ByteTokenizer()
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the run's SentencePiece model is needed to sample")
    return tokenizers.SentencePieceTokenizer(path)


def stream_to(stream=sys.stdout, tokenizer=None) -> Callable[[int], None]:
    """A callback that prints tokens as they come, holding back incomplete UTF-8 sequences."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(token: int) -> None:
        if token == tokenizer.eos_id:  # documents were separated by a blank line in the corpus
            stream.write("\n")
        stream.write(decoder.decode(tokenizer.decode_bytes([token])))
        stream.flush()

    return emit
