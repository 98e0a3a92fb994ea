"""
CPU training speed of train.py with its default flags against other loader and thread settings, on
one job: DiT-S/4 on 32x32 pixel images (random PNGs), batch 16, plain python and torchrun over the
cores. Each setting is a fresh train.py process; steps/s is read from metrics.jsonl after a warm-up,
and the settings take turns round by round (the machine may be shared).

    python benchmarks/bench_cpu_train.py                  # the figures (~5 minutes on 2 cores)
    python benchmarks/bench_cpu_train.py --rounds 1 --steps 10
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def write_images(root, n=256):
    """n random 32x32 PNGs in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(f"{root}/c{i % 2}", exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"{root}/c{i % 2}/{i}.png")


def steps_per_sec(command, env, results):
    """Run one train.py job; steps/s of its last log line (the first one covers the warm-up)."""
    subprocess.run(command, env=env, check=True, capture_output=True)
    experiment = sorted(os.listdir(results))[-1]
    with open(f"{results}/{experiment}/metrics.jsonl") as f:
        return json.loads(f.readlines()[-1])["steps_per_sec"]


def main():
    """Time train.py under each setting, round by round, and print a table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="steps per run (half are warm-up)")
    args = p.parse_args()
    cores = os.cpu_count()
    tmp = tempfile.mkdtemp()
    write_images(f"{tmp}/data")
    job = [TRAIN, "--model", "DiT-S/4", "--vae", "none", "--image-size", "32", "--num-classes",
           "2", "--data-path", f"{tmp}/data", "--global-batch-size", "16", "--max-steps",
           str(args.steps), "--log-every", str(args.steps // 2), "--ckpt-every", "100000"]
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cores}"]
    settings = {
        "python train.py (defaults: no loader workers)": (python, [], {}),
        "python train.py --num-workers 1": (python, ["--num-workers", "1"], {}),
        "python train.py --num-workers 4 (the old default)": (python, ["--num-workers", "4"], {}),
        "OMP_NUM_THREADS=1 python train.py": (python, [], {"OMP_NUM_THREADS": "1"}),
        f"torchrun --nproc_per_node={cores} train.py (defaults)": (torchrun, [], {}),
        f"torchrun --nproc_per_node={cores} train.py --num-workers 4": (torchrun,
                                                                       ["--num-workers", "4"], {}),
    }
    rates = {name: [] for name in settings}
    for r in range(args.rounds):
        for i, (name, (launcher, extra, env)) in enumerate(settings.items()):
            results = f"{tmp}/results_{r}_{i}"
            command = [*launcher, *job, "--results-dir", results, *extra]
            rates[name].append(steps_per_sec(command, {**os.environ, **env}, results))
            print(f"round {r}: {name}: {rates[name][-1]:.2f} steps/s", flush=True)
    best = max(statistics.median(v) for v in rates.values())
    print(f"\nDiT-S/4, 32x32 pixels, batch 16, {cores} cores, median of {args.rounds} rounds:")
    print("| setting | steps/s | of the best |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.2f} | {median / best:.0%} |")


if __name__ == "__main__":
    main()
