"""Stage 2 on the encoded MNIST concepts: the CALL ablation (CE only, + MSE, + contrastive, + adversarial).

    python experiments/concept_stage2_ablation.py --stage1=workdirs/concept/stage1_fsq_8555 [--steps=N]

Each run trains configs/stage2_planner.py (size tiny, terms=ce|mse|contrastive|full) on the concepts of the
given stage-1 run (encoded once, then reused by every run), and the table compares the validation
next-concept accuracy, cross-entropy, MSE and InfoNCE of the predicted vectors. The full run then generates
samples through chimera_jax.generate_concepts (no prompt, and a digit prompt). Writes
experiments/results/concept_stage2_ablation.{md,json} and concept_stage2_samples*.png.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

TERMS = ("ce", "mse", "contrastive", "full")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage1", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--root", default="workdirs/concept")
    args = ap.parse_args()
    from chimera_jax import config_lib
    from chimera_jax.layers import quantizers
    from chimera_jax.training import loop
    from chimera_jax.training.metrics import read_metrics
    from configs import stage2_planner

    s1 = config_lib.load_resolved(args.stage1)
    k, e = quantizers.num_codes(s1.model.quantizer), s1.model.quantizer.code_dim
    results_dir = os.path.join(HERE, "results")
    rows = {}
    for terms in TERMS:
        c = stage2_planner.get_config(f"size=tiny,num_codes={k},concept_dim={e},data={s1.data.kind},terms={terms}")
        c.stage1_workdir = args.stage1
        c.total_steps = args.steps
        c.eval_every = args.steps
        c.checkpoint_every = args.steps
        c.log_every = 10
        c.optimizer.warmup_steps = min(30, args.steps // 5)
        c.data.cache_dir = os.path.join(args.root, "concepts")
        workdir = os.path.join(args.root, f"stage2_{terms}")
        t0 = time.time()
        loop.train(c, workdir)
        metrics = read_metrics(workdir)
        ev = [r for r in metrics if "eval/accuracy" in r][-1]
        tr = [r for r in metrics if "train/loss" in r][-1]
        rows[terms] = dict(terms=terms, steps=args.steps, seconds=round(time.time() - t0, 1),
                           accuracy=ev["eval/accuracy"], ce=ev["eval/ce"], mse=ev["eval/mse"],
                           contrastive=ev["eval/contrastive"],
                           train_adversarial=tr.get("train/adversarial", float("nan")),
                           train_disc_loss=tr.get("train/disc_loss", float("nan")))
        print(json.dumps(rows[terms]))
    with open(os.path.join(results_dir, "concept_stage2_ablation.json"), "w") as f:
        json.dump(rows, f, indent=2)
    names = {"ce": "CE only", "mse": "CE + MSE", "contrastive": "CE + MSE + InfoNCE",
             "full": "CE + MSE + InfoNCE + adversarial"}
    lines = ["# Stage 2 CALL ablation on MNIST concepts (CPU, size tiny)", "",
             f"Stage 1: {os.path.basename(os.path.normpath(args.stage1))} (K = {k}, 16 concepts per digit). "
             "Validation metrics on held-out digits' concept sequences; MSE / InfoNCE are computed for every run, "
             "whether or not they were trained on.", "",
             "| terms | next-concept accuracy | CE (nats) | MSE | InfoNCE | adv. (train) | disc (train) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for t, r in rows.items():
        lines.append(f"| {names[t]} | {100 * r['accuracy']:.2f}% | {r['ce']:.3f} | {r['mse']:.4f} | "
                     f"{r['contrastive']:.3f} | {r['train_adversarial']:.3f} | {r['train_disc_loss']:.3f} | "
                     f"{r['seconds']} |")
    with open(os.path.join(results_dir, "concept_stage2_ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    full = os.path.join(args.root, "stage2_full")
    env = dict(os.environ, PYTHONPATH=REPO)
    for tag, prompt, n in (("", "", 16), ("_prompt", "mnist:0", 8)):
        out = os.path.join(args.root, f"generated{tag}")
        cmd = [sys.executable, "-m", "chimera_jax.generate_concepts", f"--stage1={args.stage1}", f"--stage2={full}",
               f"--num_concepts={n}", "--num_samples=8", "--seed=0", f"--out={out}"]
        if prompt:
            cmd.append(f"--prompt={prompt}")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        print(proc.stdout[-2000:], proc.stderr[-2000:] if proc.returncode else "")
        if proc.returncode == 0:
            shutil.copyfile(os.path.join(out, "samples.png"),
                            os.path.join(results_dir, f"concept_stage2_samples{tag}.png"))
            with open(os.path.join(results_dir, f"concept_stage2_samples{tag}.txt"), "w") as f:
                f.write(proc.stdout)


if __name__ == "__main__":
    main()
