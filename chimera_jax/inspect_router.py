"""Which mixer did each token choose? A heat map (layer x token, colour = mode) of a trained CHIMERA model.

    python -m chimera_jax.inspect_router --workdir=DIR --text="ROMEO: ..." --out=router.png

Runs the parallel path on ``BOS text`` with the ``intermediates`` collection mutable and reads the ``modes`` every
CHIMERA layer sows (the mode each token actually ran, after capacity). Also prints the mode mix per layer.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from chimera_jax import config_lib
from chimera_jax.layers import chimera
from chimera_jax.models.lm import LM
from chimera_jax.training import checkpointing

MODE_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#dddddd")  # ssm, window, full, identity

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "work directory of a trained CHIMERA 'lm' run", required=True)
flags.DEFINE_string("text", None, "text to route (default: the first characters of the bundled tinyshakespeare)")
flags.DEFINE_integer("max_tokens", 160, "tokens shown (the text is cut)")
flags.DEFINE_string("out", "router_heatmap.png", "PNG to write")
flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")


def route(workdir: str, text: str, max_tokens: int, step: int | None = None):
    """(tokens [t] as strings, modes [l t] int, layer names) of ``text`` under the trained model."""
    from chimera_jax.sampling import load_tokenizer

    config = config_lib.load_resolved(workdir)
    model = LM(ml_collections.FrozenConfigDict(config.model))
    codes = model.layer_codes()
    if "CH" not in codes:
        raise ValueError(f"{workdir} holds model.pattern={config.model.pattern!r}: no CHIMERA ('CH') layer")
    _, params, model_state = checkpointing.restore_params(workdir, step)
    tok = load_tokenizer(workdir, config)
    ids = np.concatenate([[tok.bos_id], tok.encode(text)])[:max_tokens].astype(np.int32)[None]
    (_, _), inter = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        {"params": params, **model_state}, jnp.asarray(ids))
    inter = inter["intermediates"]
    names = [f"layer_{i}" for i, c in enumerate(codes) if c == "CH"]
    modes = np.stack([np.asarray(inter[n]["mixer"]["modes"][0][0]) for n in names])  # [l t]
    pieces = ["<bos>"] + [tok.decode([i]) for i in ids[0, 1:]]
    return pieces, modes, names


def plot(pieces, modes, names, path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    l, t = modes.shape
    fig, ax = plt.subplots(figsize=(max(8.0, 0.11 * t + 2), 0.45 * l + 1.8))
    ax.imshow(modes, cmap=ListedColormap(MODE_COLOURS), vmin=-0.5, vmax=3.5, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(range(l), names)
    shown = [p.replace("\n", "\u21b5").replace(" ", "\u2423") for p in pieces]
    ax.set_xticks(range(t), shown, fontsize=6, family="monospace")
    ax.set_xlabel("token")
    mix = [", ".join(f"{m[0]}{100 * (modes[i] == k).mean():.0f}%" for k, m in enumerate(chimera.MODES))
           for i in range(l)]
    ax.set_title(title or "CHIMERA router: mode per token and layer", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=m) for c, m in zip(MODE_COLOURS, chimera.MODES)],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(chimera.MODES), frameon=False, fontsize=7)
    # Above the plot: at the right it would cover the per-layer mix labels of the secondary axis.
    ax2 = ax.secondary_yaxis("right")
    ax2.set_yticks(range(l), mix, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv):
    del argv
    text = FLAGS.text
    if text is None:
        from chimera_jax.data import text as text_lib

        text = open(text_lib.resolve_files("bundled:tinyshakespeare")[0]).read()[:FLAGS.max_tokens]
    pieces, modes, names = route(FLAGS.workdir, text, FLAGS.max_tokens, FLAGS.step)
    plot(pieces, modes, names, FLAGS.out)
    mix = {n: {m: float((modes[i] == k).mean()) for k, m in enumerate(chimera.MODES)} for i, n in enumerate(names)}
    print(json.dumps(dict(out=FLAGS.out, tokens=len(pieces), mode_mix=mix), indent=1))


if __name__ == "__main__":
    app.run(main)
