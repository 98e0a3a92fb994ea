"""
The paper's findings at laptop scale, on scikit-learn's 8x8 handwritten digits (no download):
train.py trains pixel-space DiTs through its CLI (2-process torchrun, fp32) and sample.py samples
their EMA weights (DPM-Solver++, 20 steps), and three claims of the paper are measured:

1. adaLN-Zero against adaLN, cross-attention and in-context at equal steps (Section 3.2, Fig. 5)
2. sample quality against Gflops through width and patch size (Figure 2, Table 4)
3. classifier-free guidance: quality against --cfg-scale, and a guidance interval

Sample quality is read by an MLP classifier (64 ReLU units) trained on 75% of the real digits:
digit-FID is the Frechet distance between all 1,797 real digits and the samples in its hidden
layer, "readable" the share of samples it reads as the digit asked for; both with a bootstrap
spread over the samples. Every run is cached in --work, so an interrupted run resumes there.

    python benchmarks/paper_findings.py --quick    # the default model only (~15 min on 2 cores)
    python benchmarks/paper_findings.py            # everything (~1-2 h on 2 cores), JSON + PNG
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dit  # noqa: E402
import sample  # noqa: E402

# README's first-run recipe: 6 blocks of width 256 (4 heads), patch 2, lr 1e-3, batch 64
DEFAULT = dict(depth=6, hidden_size=256, patch_size=2, block="adaLN-Zero")
BLOCKS = ("adaLN-Zero", "cross-attention", "in-context", "adaLN")
# Figure 2 at laptop scale: two widths x two patch sizes (the default is one of them)
MODELS = [dict(DEFAULT, hidden_size=w, patch_size=p) for w in (128, 256) for p in (2, 4)]
CFG_SCALES = (1.0, 1.5, 2.0, 4.0)
# guidance only for lo < t <= hi (Kynkaanniemi et al. 2024): sigma 0.28 to 5.4 of their DiT
# interval is t 50 to 600 of the linear schedule (off at the highest and lowest noise)
CFG_INTERVALS = ((2.0, (50, 600)), (4.0, (50, 600)))

#################################################################################
#                           Digits and the classifier                          #
#################################################################################

def real_digits():
    """The 1,797 digits as uint8 (N, 8, 8), as README's recipe writes them, and their labels."""
    digits = load_digits()
    return (digits.images * 255 / 16).astype(np.uint8), digits.target


def write_folder(images, labels, root):
    """The digits as README's image folder <label>/<index>.png (once)."""
    if os.path.isdir(root):
        return
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(f"{tmp}/{label}", exist_ok=True)
        Image.fromarray(image).save(f"{tmp}/{label}/{i:04d}.png")
    os.rename(tmp, root)


def train_classifier(images, labels):
    """An MLP (64 ReLU units) on 75% of the digits; returns it and its held-out accuracy."""
    x = images.reshape(len(images), -1) / 255
    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.25,
                                                        random_state=0, stratify=labels)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000, random_state=0)
    clf.fit(x_train, y_train)
    return clf, clf.score(x_test, y_test)


def features(clf, images):
    """uint8 images (N, 8, 8) -> the classifier's hidden ReLU activations (N, 64)."""
    x = images.reshape(len(images), -1) / 255
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0)


def frechet(mu1, sigma1, feats):
    """Frechet distance between a Gaussian (mu1, sigma1) and the Gaussian of feats (N, D)."""
    mu2, sigma2 = feats.mean(0), np.cov(feats, rowvar=False)
    with warnings.catch_warnings():
        # a bootstrap resample or a collapsed model can leave a unit constant (sigma2 singular)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


class Judge:
    """Digit-FID and readable share of generated digits, with a bootstrap over the samples."""
    def __init__(self, images, labels, boot=100):
        self.clf, self.accuracy = train_classifier(images, labels)
        real = features(self.clf, images)
        # units that never fire on a real digit would make the covariance singular
        self.units = real.std(0) > 0
        real = real[:, self.units]
        self.mu, self.sigma = real.mean(0), np.cov(real, rowvar=False)
        self.boot = boot

    def score(self, images, asked, seed=0):
        """uint8 images (N, 8, 8) asked to be digits asked (N,) -> FID, readable and spreads."""
        feats = features(self.clf, images)[:, self.units]
        hit = self.clf.predict(images.reshape(len(images), -1) / 255) == asked
        rng = np.random.default_rng(seed)
        fids, reads = [], []
        for _ in range(self.boot):
            i = rng.integers(0, len(images), len(images))
            fids.append(frechet(self.mu, self.sigma, feats[i]))
            reads.append(hit[i].mean())
        return dict(fid=frechet(self.mu, self.sigma, feats), fid_std=float(np.std(fids)),
                    readable=float(hit.mean()), readable_std=float(np.std(reads)))

#################################################################################
#                        Training (train.py) and sampling                      #
#################################################################################

def run_name(cfg):
    """A folder name for a model config, e.g. d6-w256-p2-adaLN-Zero."""
    return f"d{cfg['depth']}-w{cfg['hidden_size']}-p{cfg['patch_size']}-{cfg['block']}"


def train_command(cfg, args, out, ckpt_every):
    """The train.py command line (plain python, or torchrun for --nproc > 1) of a config."""
    kwargs = dict(depth=cfg["depth"], hidden_size=cfg["hidden_size"],
                  num_heads=cfg["hidden_size"] // 64, block=cfg["block"])
    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return launch + [
            f"{ROOT}/train.py", "--model", f"DiT-S/{cfg['patch_size']}",
            "--model-kwargs", json.dumps(kwargs),
            "--vae", "none", "--image-size", "8", "--num-classes", "10",
            "--data-path", f"{args.work}/digits", "--results-dir", out,
            "--global-batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.99",
            "--global-seed", str(args.seed), "--max-steps", str(args.steps),
            "--ckpt-every", str(ckpt_every), "--log-every", "50"]


def train(cfg, args, folder, eval_every, attempts=3):
    """Run train.py into folder (resuming a killed run from its checkpoint); its experiment."""
    experiment = ([None] + sorted(glob.glob(f"{folder}/*-DiT-*")))[-1]
    if experiment is None or not glob.glob(f"{experiment}/checkpoints/*.pt"):
        shutil.rmtree(folder, ignore_errors=True)
        experiment = None
    elif os.path.exists(f"{experiment}/checkpoints/{args.steps:07d}.pt"):
        # trained before it was scored
        return experiment
    os.makedirs(folder, exist_ok=True)
    # the same threads each time: the same seed gives the same weights
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // args.nproc)))
    for attempt in range(attempts):
        resume = ["--resume", experiment] if experiment else []
        with open(f"{folder}/train.log", "a") as log:
            done = subprocess.run(train_command(cfg, args, folder, eval_every) + resume, env=env,
                                  stdout=log, stderr=subprocess.STDOUT).returncode == 0
        experiment = sorted(glob.glob(f"{folder}/*-DiT-*"))[-1]
        if done:
            return experiment
        print(f"train.py failed (see {folder}/train.log); resuming", flush=True)
    raise SystemExit(f"paper_findings.py: error: train.py failed {attempts} times: "
                     f"see {folder}/train.log")


def gflops(cfg):
    """Forward Gflops per image of a model config on 8x8x3 pixels (DiT.gflops)."""
    kwargs = dict(depth=cfg["depth"], hidden_size=cfg["hidden_size"],
                  num_heads=cfg["hidden_size"] // 64, block=cfg["block"], input_size=8,
                  in_channels=3, num_classes=10)
    return dit.create_dit(f"DiT-S/{cfg['patch_size']}", **kwargs).gflops()


def load_ema(path):
    """The EMA DiT of a train.py checkpoint (keys "ema" and "config")."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = dit.DiT(**ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    return model.eval()


@torch.no_grad()
def generate(model, n, seed, cfg_scale=1.0, cfg_interval=None):
    """n samples, labels 0..9 in turn, DPM-Solver++ 20 steps -> uint8 (n, 8, 8) and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    z = torch.randn(n, 3, 8, 8, generator=g)
    loop = sample.sampling_loop("dpm++", 20)
    chunks = []
    for i in range(0, n, 250):
        guidance = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval)
        if cfg_scale == 1.0 and cfg_interval is None:
            guidance = None
        x = sample.sample(model, loop, z[i:i + 250], y[i:i + 250], guidance=guidance,
                          clip_denoised=True)
        # the grey digit: the mean of the 3 channels
        chunks.append(sample.to_uint8(x).float().mean(1).round().to(torch.uint8))
    return torch.cat(chunks).numpy(), y.numpy()


def evaluate(model, judge, args, scales):
    """Digit-FID and readable share of a model's samples at each guidance scale."""
    out = {}
    for s in scales:
        images, y = generate(model, args.samples, args.seed, cfg_scale=s)
        out[f"cfg{s:g}"] = judge.score(images, y, args.seed)
    return out


def train_and_evaluate(cfg, judge, args, eval_every, guidance=False):
    """Train one config (cached in --work), score each checkpoint; the run's result dict."""
    name = run_name(cfg)
    folder = f"{args.work}/runs/{name}" + (f"-seed{args.seed}" if args.seed else "")
    cached = f"{folder}/result.json"
    if os.path.exists(cached):
        with open(cached) as f:
            result = json.load(f)
        same = (result["steps"], result["samples"], result.get("seed", 0))
        if same == (args.steps, args.samples, args.seed):
            print(f"{name}: cached in {cached}", flush=True)
            return result
    print(f"{name}: training {args.steps} steps ({gflops(cfg):.4f} Gflops)", flush=True)
    experiment = train(cfg, args, folder, eval_every)
    with open(f"{experiment}/metrics.jsonl") as f:
        # a resumed run logs again the steps after its checkpoint: the last line of a step wins
        metrics = list({m["step"]: m for m in map(json.loads, f)}.values())
    # the training time, from each log line's steps/s over the steps since the previous one
    steps = [0] + [m["step"] for m in metrics]
    train_s = sum((b - a) / m["steps_per_sec"] for a, b, m in zip(steps, steps[1:], metrics))
    start = time.time()
    quality = {}
    for path in sorted(glob.glob(f"{experiment}/checkpoints/*.pt")):
        step = int(os.path.basename(path)[:-3])
        model = load_ema(path)
        # unguided at every checkpoint (as Figure 5), guided too at the last
        scales = (1.0, 4.0) if step == args.steps else (1.0,)
        q = quality[str(step)] = evaluate(model, judge, args, scales)
        print(f"{name}: step {step}: " + ", ".join(
            f"cfg {k[3:]}: FID {v['fid']:.2f}, readable {v['readable']:.1%}"
            for k, v in q.items()), flush=True)
    result = dict(config=cfg, gflops=gflops(cfg), steps=args.steps, samples=args.samples,
                  seed=args.seed,
                  loss=[dict(step=m["step"], loss=m["loss"], mse=m["mse"]) for m in metrics],
                  quality=quality, train_s=train_s, steps_per_sec=args.steps / train_s)
    if guidance:
        result["guidance"] = guidance_sweep(model, judge, args, quality[str(args.steps)])
    result["eval_s"] = time.time() - start
    # checkpoints are 16 bytes per parameter: only the result stays
    shutil.rmtree(f"{experiment}/checkpoints")
    sample.atomic_write(cached, lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def guidance_sweep(model, judge, args, final):
    """Quality against the guidance scale, and inside a guidance interval (same noise)."""
    rows = []
    for s in CFG_SCALES:
        # scales 1 and 4 were scored at the last checkpoint already
        score = final.get(f"cfg{s:g}")
        if score is None:
            images, y = generate(model, args.samples, args.seed, cfg_scale=s)
            score = judge.score(images, y, args.seed)
        rows.append(dict(cfg_scale=s, interval=None, **score))
    for s, (lo, hi) in CFG_INTERVALS:
        images, y = generate(model, args.samples, args.seed, cfg_scale=s, cfg_interval=(lo, hi))
        rows.append(dict(cfg_scale=s, interval=[lo, hi], **judge.score(images, y, args.seed)))
    for r in rows:
        print(f"guidance {r['cfg_scale']:g} interval {r['interval']}: FID {r['fid']:.2f} "
              f"+- {r['fid_std']:.2f}, readable {r['readable']:.1%}", flush=True)
    return rows

#################################################################################
#                                Tables and figure                             #
#################################################################################

def fmt(q):
    """'FID +- std | readable +- std' of one score dict."""
    return (f"{q['fid']:6.2f} +- {q['fid_std']:4.2f} | "
            f"{q['readable']:6.1%} +- {q['readable_std']:4.1%}")


def print_tables(results):
    """The three tables as Markdown rows."""
    print("\n| block | Gflops | loss (last 200 steps) | digit-FID, unguided | readable, unguided "
          "| digit-FID, cfg 4 | readable, cfg 4 |")
    print("|---|---|---|---|---|---|---|")
    for r in results["blocks"]:
        print(row(r, r["config"]["block"]))
    print("\n| model | Gflops | loss (last 200 steps) | digit-FID, unguided | readable, unguided "
          "| digit-FID, cfg 4 | readable, cfg 4 |")
    print("|---|---|---|---|---|---|---|")
    for r in results["models"]:
        c = r["config"]
        print(row(r, f"depth {c['depth']}, width {c['hidden_size']}, patch {c['patch_size']}"))
    if "guidance" in results:
        print("\n| cfg scale | interval | digit-FID | readable |")
        print("|---|---|---|---|")
        for g in results["guidance"]:
            lo_hi = g["interval"]
            interval = "all" if lo_hi is None else f"({lo_hi[0]}, {lo_hi[1]}]"
            print(f"| {g['cfg_scale']:g} | {interval} | {g['fid']:.2f} +- {g['fid_std']:.2f} | "
                  f"{g['readable']:.1%} +- {g['readable_std']:.1%} |")


def row(r, label):
    """One table row: final-step quality and the mean loss of the last 200 steps."""
    q = r["quality"][str(r["steps"])]
    loss = np.mean([m["loss"] for m in r["loss"][-4:]])
    u, g = q["cfg1"], q["cfg4"]
    return (f"| {label} | {r['gflops']:.4f} | {loss:.4f} | {u['fid']:.2f} +- {u['fid_std']:.2f} "
            f"| {u['readable']:.1%} +- {u['readable_std']:.1%} | {g['fid']:.2f} +- "
            f"{g['fid_std']:.2f} | {g['readable']:.1%} +- {g['readable_std']:.1%} |")


def plot(results, path):
    """Figure 5 (loss and quality against steps per block) and Figure 2 (quality vs Gflops)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for r in results["blocks"]:
        label = r["config"]["block"]
        steps = [m["step"] for m in r["loss"]]
        axes[0, 0].plot(steps, [m["loss"] for m in r["loss"]], label=label)
        ckpts = sorted(r["quality"], key=int)
        x = [int(s) for s in ckpts]
        for ax, key in ((axes[0, 1], "fid"), (axes[0, 2], "readable")):
            y = [r["quality"][s]["cfg1"][key] for s in ckpts]
            e = [r["quality"][s]["cfg1"][key + "_std"] for s in ckpts]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    axes[0, 0].set(title="Training loss by block design (Fig. 5)", xlabel="training steps",
                   ylabel="loss (mse + vb)", yscale="log")
    axes[0, 1].set(title="Digit-FID by block design, unguided (lower is better)",
                   xlabel="training steps", ylabel="digit-FID", yscale="log")
    axes[0, 2].set(title="Readable share by block design, unguided", xlabel="training steps",
                   ylabel="samples read as the asked digit")
    for r in results["models"]:
        c = r["config"]
        q = r["quality"][str(r["steps"])]["cfg1"]
        label = f"w{c['hidden_size']}/p{c['patch_size']}"
        marker = "o" if c["patch_size"] == 2 else "s"
        axes[1, 0].errorbar(r["gflops"], q["fid"], yerr=q["fid_std"], marker=marker, capsize=3,
                            label=label, linestyle="none")
        axes[1, 1].errorbar(r["gflops"], q["readable"], yerr=q["readable_std"], marker=marker,
                            capsize=3, label=label, linestyle="none")
    steps = results["models"][0]["steps"] if results["models"] else 0
    axes[1, 0].set(title=f"Digit-FID vs Gflops at {steps} steps, unguided (Fig. 2)",
                   xlabel="forward Gflops per image", ylabel="digit-FID", xscale="log",
                   yscale="log")
    axes[1, 1].set(title=f"Readable share vs Gflops at {steps} steps, unguided",
                   xlabel="forward Gflops per image", ylabel="samples read as the asked digit",
                   xscale="log")
    if "guidance" in results:
        ax = axes[1, 2]
        ax2 = ax.twinx()
        for interval, fill in ((False, None), (True, "none")):
            rows = [g for g in results["guidance"] if (g["interval"] is not None) == interval]
            where = " in t ({}, {}]".format(*rows[0]["interval"]) if interval else ""
            x = [g["cfg_scale"] for g in rows]
            ax.errorbar(x, [g["fid"] for g in rows], yerr=[g["fid_std"] for g in rows],
                        marker="o", mfc=fill, capsize=3, color="C0", label="digit-FID" + where,
                        linestyle=":" if interval else "-")
            ax2.errorbar(x, [g["readable"] for g in rows], yerr=[g["readable_std"] for g in rows],
                         marker="s", mfc=fill, capsize=3, color="C1", label="readable" + where,
                         linestyle=":" if interval else "-")
        steps = results["guidance_steps"]
        ax.set(title=f"Guidance, default model at {steps} steps", xlabel="cfg scale",
               ylabel="digit-FID")
        ax2.set_ylabel("readable share")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[:5]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        # plain numbers on the log axes
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    for ax in axes[1, :2]:
        ax.set_xticks([0.005, 0.01, 0.02, 0.05, 0.1], ["0.005", "0.01", "0.02", "0.05", "0.1"])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle("DiT on 8x8 digits: the paper's findings at laptop scale "
                 "(error bars: bootstrap std over samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)

#################################################################################
#                                      Main                                     #
#################################################################################

def main():
    """Train and score the runs (cached), print the tables, write the JSON and the figure."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the default model only")
    p.add_argument("--steps", type=int, default=1500, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=500, help="steps between scored checkpoints")
    p.add_argument("--samples", type=int, default=500, help="samples per score")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    p.add_argument("--nproc", type=int, default=2, help="train.py processes (>1: torchrun)")
    p.add_argument("--work", default=f"{ROOT}/results/paper_findings", help="runs are cached here")
    p.add_argument("--out", default=f"{ROOT}/docs/paper_findings", help="JSON and PNG (full run)")
    args = p.parse_args()
    # sampling in this process: a fixed thread count, so the same seed gives the same numbers
    # (one thread: tiny matmuls gain nothing from two, and lose much on a busy machine)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.time()
    images, labels = real_digits()
    os.makedirs(args.work, exist_ok=True)
    write_folder(images, labels, f"{args.work}/digits")
    judge = Judge(images, labels)
    # the noise floor: as many real digits as samples, against all of them
    pick = np.random.default_rng(args.seed).permutation(len(images))[:args.samples]
    floor = judge.score(images[pick], labels[pick], args.seed)
    print(f"classifier: MLP 64 ReLU units, held-out accuracy {judge.accuracy:.1%}; "
          f"{args.samples} real digits: digit-FID {floor['fid']:.2f} +- {floor['fid_std']:.2f}",
          flush=True)
    results = dict(classifier=dict(model="MLPClassifier((64,)), 75/25 split",
                                   held_out_accuracy=judge.accuracy),
                   real_digits_fid=dict(fid=floor["fid"], fid_std=floor["fid_std"]),
                   settings=dict(steps=args.steps, samples=args.samples, seed=args.seed,
                                 batch=64, lr=1e-3, ema_decay=0.99, sampler="dpm++ 20",
                                 nproc=args.nproc))
    # the default model first: it is --quick, block design 1 and model 3, with the guidance sweep
    default = train_and_evaluate(DEFAULT, judge, args, args.eval_every, guidance=True)
    results["guidance"] = default["guidance"]
    results["guidance_steps"] = args.steps
    results["blocks"] = [default]
    results["models"] = [default]
    # the two studies take turns, cheapest first, so that a cut-short run has some of both
    runs = [("blocks", dict(DEFAULT, block=block)) for block in BLOCKS[1:]]
    sizes = sorted((cfg for cfg in MODELS if cfg != DEFAULT), key=gflops)
    runs = [run for pair in zip(sizes, runs) for run in (("models", pair[0]), pair[1])]
    for study, cfg in [] if args.quick else runs:
        every = args.eval_every if study == "blocks" else args.steps
        results[study].append(train_and_evaluate(cfg, judge, args, every))
    results["models"].sort(key=lambda r: r["gflops"])
    results["wall_s"] = time.time() - start
    # the compute of every run, when they were trained and scored (cached runs included)
    runs = {run_name(r["config"]): r for r in results["blocks"] + results["models"]}
    results["train_s"] = sum(r["train_s"] for r in runs.values())
    results["eval_s"] = sum(r["eval_s"] for r in runs.values())
    print_tables(results)
    print(f"\ntraining {results['train_s'] / 60:.1f} min, scoring {results['eval_s'] / 60:.1f} "
          f"min; this call {results['wall_s'] / 60:.1f} min")
    out = f"{args.work}/quick-seed{args.seed}" if args.quick else args.out
    sample.atomic_write(out + ".json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    if not args.quick:
        plot(results, out + ".png")
    print(f"wrote {out}.json" + ("" if args.quick else f" and {out}.png"))


if __name__ == "__main__":
    main()
