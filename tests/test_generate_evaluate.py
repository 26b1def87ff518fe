import json

import jax
import jax.numpy as jnp
import numpy as np

from chimera_jax import sampling
from chimera_jax.training import loop
from tests.lm_testing import cli, micro_config


def test_train_then_generate_and_evaluate_from_the_command_line(tmp_path):
    workdir = str(tmp_path / "w")
    loop.train(micro_config(total_steps=4), workdir)
    out = cli("chimera_jax.generate", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=12",
              "--temperature=0.9", "--top_k=20", "--top_p=0.9", "--repetition_penalty=1.1", "--seed=3")
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:")
    again = cli("chimera_jax.generate", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=12",
                "--temperature=0.9", "--top_k=20", "--top_p=0.9", "--repetition_penalty=1.1", "--seed=3")
    assert again.stdout == out.stdout  # same seed, same sample
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    ev = json.loads(cli("chimera_jax.evaluate", f"--workdir={workdir}", f"--text_file={text}").stdout.strip())
    assert ev["bytes"] > 0 and np.isfinite(ev["loss"]) and ev["bpb"] > 0
    missing = cli("chimera_jax.evaluate", f"--workdir={workdir}", f"--text_file={tmp_path}/nope.txt", check=False)
    assert missing.returncode != 0 and "nope.txt" in missing.stderr


def test_sampling_controls():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    seen = jnp.zeros((1, 4), bool)
    rng = jax.random.PRNGKey(0)
    greedy = sampling.SamplingOptions(temperature=0.0)
    assert int(sampling.next_token(logits, seen, rng, greedy)[0]) == 0
    # top_k=2 and top_p=0.75 both keep only {0, 1}
    for opts in (sampling.SamplingOptions(1.0, top_k=2), sampling.SamplingOptions(1.0, top_p=0.75)):
        draws = {int(sampling.next_token(logits, seen, jax.random.PRNGKey(i), opts)[0]) for i in range(60)}
        assert draws == {0, 1}
    # a strong repetition penalty on token 0 makes token 1 the greedy choice
    pen = sampling.SamplingOptions(temperature=0.0, repetition_penalty=10.0)
    assert int(sampling.next_token(logits + 5.0, seen.at[0, 0].set(True), rng, pen)[0]) == 1
