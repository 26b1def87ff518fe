"""Prompt -> plan -> render with a trained concept pipeline:

    python -m chimera_jax.generate_concepts --stage1=DIR --stage2=DIR [--prompt=...] --num_concepts=N --seed=0

The prompt is encoded by stage 1 into concepts (text: the prompt string as one line; images: ``mnist:INDEX``, a
digit of the bundled MNIST set); without a prompt the planner starts from the start symbol alone. The stage-2
planner samples N further concepts; the stage-1 AU-Net renders every concept of the sequence (prompt included)
into bytes from its concept vector alone. An example's concepts follow stage 1's layout (the image's cells in
raster order, then the text line's), so concept p of a document belongs to the modality of its place in that
layout. Writes ``samples.png`` (one row of images per sample) and/or ``samples.txt`` into --out and prints a
summary.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("stage1", None, "Stage-1 (stage vq) workdir.")
flags.DEFINE_string("stage2", None, "Stage-2 (stage planner) workdir.")
flags.DEFINE_string("prompt", "", "Text, or mnist:INDEX for a digit; empty = start symbol only.")
flags.DEFINE_integer("num_concepts", 16, "Concepts the planner samples after the prompt.")
flags.DEFINE_integer("num_samples", 4, "Independent samples.")
flags.DEFINE_float("temperature", 1.0, "Planner sampling temperature (0 = most likely concept).")
flags.DEFINE_float("render_temperature", 1.0, "AU-Net byte sampling temperature (0 = most likely byte).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output directory (default: STAGE2/generated).")
flags.mark_flags_as_required(["stage1", "stage2"])


def load(stage1: str, stage2: str):
    """(stage-1 config, model, variables, stage-2 config, planner, params, codebook) from the two workdirs."""
    import jax
    import ml_collections

    from chimera_jax import config_lib
    from chimera_jax.models.concept import ConceptModel
    from chimera_jax.models.planner import Planner
    from chimera_jax.stages.planner import check_stage1
    from chimera_jax.training import checkpointing

    c2 = config_lib.load_resolved(stage2)
    if c2.get("stage") != "planner":
        raise ValueError(f"--stage2={stage2} holds a {c2.get('stage')!r} run, not a planner")
    c1 = check_stage1(c2, stage1)
    _, p1, s1 = checkpointing.restore_params(stage1)
    _, p2, _ = checkpointing.restore_params(stage2)
    model = ConceptModel(ml_collections.FrozenConfigDict(c1.model))
    variables = {"params": p1, **s1}
    codebook = jax.jit(lambda v: model.apply(v, method=lambda m: m.top_codebook()))(variables)
    planner = Planner(ml_collections.FrozenConfigDict(c2.model))
    return c1, model, variables, c2, planner, p2, codebook


def layout(model_cfg):
    """[(modality, concepts per example)] in the order stage 1 lays an example's concepts out."""
    from chimera_jax.models.concept import geometry

    if model_cfg.slots.enabled:
        return [(m, model_cfg.slots.num_slots) for m in model_cfg.modalities]
    return [(m, geometry(model_cfg, m)["concepts"]) for m in model_cfg.modalities]


def encode_prompt(c1, model, variables, prompt: str):
    """Prompt -> concept indices (numpy int32), through stage 1's encoder."""
    import jax
    import numpy as np

    from chimera_jax.data import concept_data

    data_cfg = c1.data
    src = concept_data.ExampleSource.__new__(concept_data.ExampleSource)
    src.cfg, src.seed = data_cfg, 0
    mods = list(c1.model.modalities)
    ex = {}
    if prompt.startswith("mnist:"):
        if "image" not in mods:
            raise ValueError("an mnist: prompt needs a stage 1 with the image modality")
        from chimera_jax.data import mnist

        src.images = mnist.load()[0]
        ex.update(src.image(int(prompt.split(":", 1)[1])))
    elif prompt:
        if "text" not in mods:
            raise ValueError("a text prompt needs a stage 1 with the text modality")
        src.lines = [prompt]
        ex.update(src.text(0))
    full = {}
    for m in mods:  # absent modalities as empty placeholders
        if m == "image":
            s = c1.model.image_size
            full.update(image=np.zeros((s, s), np.uint8), image_mask=np.zeros((s, s), np.float32),
                        has_image=np.float32(0))
        elif m == "text":
            t = c1.model.text_len
            full.update(text=np.zeros((t,), np.int32), text_mask=np.zeros((t,), np.float32), has_text=np.float32(0))
    full.update(ex)
    batch = {k: np.asarray(v)[None] for k, v in full.items()}
    enc, _ = model.apply(variables, batch, method=lambda mdl, b: mdl.encode(b))
    enc = jax.device_get(enc)
    return np.concatenate([np.asarray(enc[m][-1]["indices"][0])[np.asarray(enc[m][-1]["mask"][0]) > 0]
                           for m in mods]).astype(np.int32)


def plan(planner, params, codebook, context, num_concepts: int, num_samples: int, temperature: float, rng):
    """Samples num_concepts concepts after ``context`` (BOS + prompt concepts): -> [num_samples, len] int32."""
    import jax
    import jax.numpy as jnp

    k = codebook.shape[0]
    start = len(context)
    total = start + num_concepts
    tokens = jnp.zeros((num_samples, total), jnp.int32).at[:, :start].set(jnp.asarray(context)[None])

    @jax.jit
    def run(tokens, rng):
        def body(i, carry):
            tokens, rng = carry
            rng, sub = jax.random.split(rng)
            logits, _ = planner.apply({"params": params}, tokens, codebook)
            step = jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1, keepdims=False)[:, :k]  # no start symbol
            nxt = (jax.random.categorical(sub, step / temperature) if temperature > 0 else jnp.argmax(step, -1))
            return tokens.at[:, i].set(nxt.astype(jnp.int32)), rng
        return jax.lax.fori_loop(start, total, body, (tokens, rng))[0]

    return run(tokens, rng)[:, 1:]  # drop BOS


def render(c1, model, variables, concepts, rng, temperature: float):
    """Concept sequences [n L] -> {modality: list (per sample) of rendered examples}: images [H W] / text str."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from chimera_jax.layers import aunet as aunet_lib
    from chimera_jax.models.concept import from_segments, geometry
    from chimera_jax.stages.vq import bytes_to_text

    cfg = ml_collections.FrozenConfigDict(c1.model)
    lay = layout(cfg)
    per_doc = sum(n for _, n in lay)
    out = {m: [[] for _ in range(concepts.shape[0])] for m, _ in lay}
    concepts = np.asarray(concepts)
    length = concepts.shape[1]
    samplers = {}

    def sampler(m):
        """One compiled AU-Net sampler per modality, shared by every document (parameters are an argument)."""
        if m not in samplers:
            dec, segment = aunet_lib.AUNet(cfg), geometry(cfg, m)["segment"]
            samplers[m] = jax.jit(lambda p, c, r: aunet_lib.sample(lambda t, cc: dec.apply(p, t, cc), c, segment, r,
                                                                   temperature))
        return samplers[m]

    for doc in range(0, length, per_doc):
        off = doc
        for m, n in lay:
            chunk = concepts[:, off:off + n]
            off += n
            if chunk.shape[1] == 0:
                continue
            g = geometry(cfg, m)
            have = chunk.shape[1]
            chunk = np.pad(chunk, ((0, 0), (0, n - have)))

            def cond_fn(mdl, idx, m=m):
                return mdl.condition(m, mdl.lookup_concepts(idx))

            cond = model.apply(variables, jnp.asarray(chunk), method=cond_fn)              # [s n d]
            b = cond.shape[0]
            dparams = {"params": variables["params"][f"aunet_{m}"]}
            rng, sub = jax.random.split(rng)
            toks = sampler(m)(dparams, cond.reshape(b * n, -1), sub)
            toks = np.array(toks).reshape(b, n, -1)
            toks[:, have:] = 0  # concepts not generated render as blank
            full = np.asarray(from_segments(jnp.asarray(toks), g))
            for i in range(b):
                out[m][i].append(full[i].astype(np.uint8) if m == "image" else bytes_to_text(full[i]))
    return out


def main(argv):
    del argv
    import jax
    import numpy as np

    from chimera_jax.stages.vq import save_image_grid

    c1, model, variables, c2, planner, p2, codebook = load(FLAGS.stage1, FLAGS.stage2)
    k = codebook.shape[0]
    prompt = encode_prompt(c1, model, variables, FLAGS.prompt) if FLAGS.prompt else np.zeros((0,), np.int32)
    context = np.concatenate([[k], prompt]).astype(np.int32)
    rng = jax.random.PRNGKey(FLAGS.seed)
    r1, r2 = jax.random.split(rng)
    concepts = plan(planner, p2, codebook, context, FLAGS.num_concepts, FLAGS.num_samples, FLAGS.temperature, r1)
    rendered = render(c1, model, variables, concepts, r2, FLAGS.render_temperature)
    out_dir = FLAGS.out or os.path.join(FLAGS.stage2, "generated")
    os.makedirs(out_dir, exist_ok=True)
    files = []
    if "image" in rendered:
        path = os.path.join(out_dir, "samples.png")
        save_image_grid(path, [np.stack(row) for row in rendered["image"] if row])
        files.append(path)
    if "text" in rendered:
        path = os.path.join(out_dir, "samples.txt")
        with open(path, "w") as f:
            for i, row in enumerate(rendered["text"]):
                f.write(f"--- sample {i}\n" + "\n".join(row) + "\n")
        files.append(path)
    concepts = np.asarray(concepts)
    print(f"prompt: {FLAGS.prompt!r} -> {len(prompt)} concepts {prompt.tolist()}")
    for i, row in enumerate(concepts):
        print(f"sample {i}: {row[len(prompt):].tolist()}")
        if "text" in rendered:
            print("  text: " + " | ".join(rendered["text"][i]))
    print("wrote " + ", ".join(files))


def run():
    try:
        app.run(main)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
