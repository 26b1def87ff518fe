"""Sample from a trained LM:  python -m chimera_jax.generate --workdir=DIR --prompt="ROMEO:" --max_new_tokens=200

Prefill, then KV-cache decode, streamed to stdout. --interactive keeps a prompt loop open (empty line quits).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir made by chimera_jax.train (stage lm).")
flags.DEFINE_string("prompt", "", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("interactive", False, "Keep a prompt loop open.")
flags.DEFINE_bool("stop_at_eos", True, "Stop at the end of a document (else sample on into the next one).")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep checkpoint-restore chatter out of the sample
    from chimera_jax import sampling

    sampler = sampling.Sampler(FLAGS.workdir, FLAGS.step)
    opts = sampling.SamplingOptions(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.repetition_penalty)

    def run(prompt: str, seed: int) -> None:
        sys.stdout.write(prompt)
        sampler.generate(prompt, FLAGS.max_new_tokens, opts, seed,
                         on_token=sampling.stream_to(sys.stdout, sampler.tokenizer), stop_at_eos=FLAGS.stop_at_eos)
        sys.stdout.write("\n")
        sys.stdout.flush()

    if not FLAGS.interactive:
        run(FLAGS.prompt, FLAGS.seed)
        return
    seed = FLAGS.seed
    while True:
        try:
            prompt = input("prompt> ")
        except EOFError:
            break
        if not prompt:
            break
        run(prompt, seed)
        seed += 1


if __name__ == "__main__":
    app.run(main)
