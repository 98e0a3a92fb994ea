"""
Fine-tuning on a CPU, measured: a small pixel DiT trained on the digits 0-4 (scikit-learn's 8x8
digits) is fine-tuned on the digits 5-9 with train.py --init-from, and compared with the same
model trained on 5-9 from scratch for the same steps. Each run's EMA samples guided digits, and a
logistic regression trained on all the digits reads them: the share read as the digit asked for.

    python benchmarks/finetune_digits.py                # the figures: 2,200 steps, ~15 min, 2 cores
    python benchmarks/finetune_digits.py --steps 600    # fine-tune longer (pretraining is kept)
    python benchmarks/finetune_digits.py --pretrain-steps 50 --steps 20 --samples 50    # a check

Runs already in --workdir (same name and steps) are not trained again. The model: DiT-S/2 with
4 blocks of width 128 (1.3M parameters) on 8x8 pixels, batch 64, lr 1e-3, EMA decay 0.99.
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dit  # noqa: E402
import sample  # noqa: E402

MODEL = ["--model", "DiT-S/2", "--model-kwargs", '{"depth": 4, "hidden_size": 128, "num_heads": 4}',
         "--vae", "none", "--image-size", "8", "--num-classes", "5", "--global-batch-size", "64",
         "--lr", "1e-3", "--ema-decay", "0.99", "--log-every", "100"]


def write_digits(root):
    """root/digits04/<digit>/*.png and root/digits59/<digit>/*.png, as README's first run."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = f"{root}/digits{'04' if label < 5 else '59'}/{label}"
        os.makedirs(folder, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).save(f"{folder}/{i:04d}.png")


def train(root, name, data, steps, *extra):
    """train.py into root/name-steps (unless done) -> its last checkpoint and its log."""
    results = f"{root}/{name}-{steps}"
    ckpt = f"{results}/000-DiT-S-2/checkpoints/{steps:07d}.pt"
    if not os.path.exists(ckpt):
        command = [sys.executable, f"{REPO}/train.py", *MODEL, "--data-path", f"{root}/{data}",
                   "--max-steps", str(steps), "--ckpt-every", str(steps), "--results-dir", results,
                   *extra]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    with open(f"{results}/000-DiT-S-2/log.txt") as f:
        return ckpt, f.read()


@torch.no_grad()
def readable(ckpt, first_digit, classifier, n, cfg_scale):
    """Share of n EMA samples (random labels, DPM-Solver++ 20 steps) read as the digit asked for."""
    config = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]
    model = dit.DiT(**config).eval()
    model.load_state_dict(dit.find_model(ckpt))
    generator = torch.Generator().manual_seed(0)
    loop = sample.sampling_loop("dpm++", 20)
    guidance = dict(cfg_scale=cfg_scale, cfg_channels=None)
    images, labels = sample.generate(model, None, loop, n, generator, guidance)
    # uint8 RGB -> the digits' 0..16 gray levels
    x = images.float().mean(1).flatten(1).numpy() * 16 / 255
    return float(np.mean(classifier.predict(x) == labels.numpy() + first_digit))


def main():
    """Pretrain on 0-4, fine-tune on 5-9 and train 5-9 from scratch, then read their samples."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="finetune-digits", help="data and runs go here")
    p.add_argument("--pretrain-steps", type=int, default=1600)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning and from-scratch steps")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    args = p.parse_args()
    root = os.path.abspath(args.workdir)
    if not os.path.isdir(f"{root}/digits59"):
        write_digits(root)
    pre, _ = train(root, "pretrain-0-4", "digits04", args.pretrain_steps)
    tuned, log = train(root, "finetune-5-9", "digits59", args.steps, "--init-from", pre)
    scratch, _ = train(root, "scratch-5-9", "digits59", args.steps)
    print(next(line for line in log.splitlines() if "Initialized from" in line))
    digits = load_digits()
    classifier = LogisticRegression(max_iter=5000).fit(digits.data, digits.target)
    rows = [("pretrained on 0-4, asked 0-4", pre, 0), ("fine-tuned on 5-9", tuned, 5),
            ("from scratch on 5-9", scratch, 5)]
    print(f"| run | steps | read as asked ({args.samples} samples, cfg {args.cfg_scale}) |")
    print("|---|---|---|")
    for name, ckpt, first in rows:
        share = readable(ckpt, first, classifier, args.samples, args.cfg_scale)
        print(f"| {name} | {int(ckpt[-10:-3])} | {share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
