"""Loss and bits per byte of a trained LM on any UTF-8 text file, printed as one JSON line.

    python -m chimera_jax.evaluate --workdir=DIR --text_file=PATH [--seq_len=N --batch_size=B]
"""
from __future__ import annotations

import json
import math

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir made by chimera_jax.train (stage lm).")
flags.DEFINE_string("text_file", None, "UTF-8 text to score.")
flags.DEFINE_integer("seq_len", None, "Rows of this many tokens (default: the training seq_len).")
flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "text_file"])


def evaluate_file(workdir: str, text_file: str, *, seq_len: int | None = None, batch_size: int = 8,
                  step: int | None = None) -> dict[str, float]:
    import grain
    import jax
    import numpy as np

    from chimera_jax import sampling
    from chimera_jax.data import lm_pipeline, text as text_lib
    from chimera_jax.stages.lm import cross_entropy

    sampler = sampling.Sampler(workdir, step)
    config = sampler.config
    docs = text_lib.read_documents(text_lib.resolve_files(text_file, field="--text_file"),
                                   config.data.document_split)
    seq_len = seq_len or config.data.seq_len
    packed = lm_pipeline._packed(grain.MapDataset.source(docs), sampler.tokenizer, seq_len)
    batches = packed.batch(batch_size, drop_remainder=False).map(lm_pipeline._shift)
    token_bytes = np.zeros(sampler.model_cfg.vocab_size, np.float64)
    token_bytes[: sampler.tokenizer.vocab_size] = sampler.tokenizer.token_bytes

    @jax.jit
    def score(variables, batch):
        logits, _ = sampler.model.apply(variables, batch["inputs"], segment_ids=batch["segment_ids"],
                                        positions=batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])

    nll = tokens = nbytes = 0.0
    for batch in batches:
        b_nll, _ = score(sampler.variables, batch)
        nll += float(b_nll)
        tokens += float(batch["loss_mask"].sum())
        nbytes += float((token_bytes[batch["targets"]] * batch["loss_mask"]).sum())
    return {"loss": nll / max(tokens, 1), "bpb": nll / (math.log(2) * max(nbytes, 1)), "tokens": int(tokens),
            "bytes": int(nbytes), "step": sampler.step}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(json.dumps(evaluate_file(FLAGS.workdir, FLAGS.text_file, seq_len=FLAGS.seq_len,
                                   batch_size=FLAGS.batch_size, step=FLAGS.step)))


if __name__ == "__main__":
    app.run(main)
