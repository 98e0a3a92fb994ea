"""
Training step: the official DiT train.py step (fp32) vs this repo's train.py step (fp32, bf16).

DiT-S/2 on 32x32x4 latents (256x256 images), batch 8: a posterior sample from the latent cache,
the diffusion loss, one AdamW step and the EMA update (train.py exposes no step function, so its
loop body is mirrored below, on dit.py, diffusion.py and train.py's update_ema). Each side runs
in its own worker process with the same weights and inputs; the first step's losses must agree,
then the workers take turns, a block of steps each, round by round (the machine is shared and
noisy), and the medians are printed.

    # the figures
    python benchmarks/bench_train.py --official /path/to/DiT
    # a smoke run
    python benchmarks/bench_train.py --official /path/to/DiT --rounds 1 --steps 1
    # on a GPU
    python benchmarks/bench_train.py --official /path/to/DiT --device cuda --batch 256

Needs torch, and timm for the official models.py; --python runs the official worker with another
interpreter.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from copy import deepcopy

import torch

# the project's modules
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def fill_(model, seed=0):
    """Overwrite every float tensor with seeded noise: both sides start from the same weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.1))


def sync(device):
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(kind, precision, cfg):
    """Build one side; print its first loss, then per stdin line n, run n steps, print s/step."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    sys.path.insert(0, cfg["official"] if kind == "official" else ROOT)
    from diffusion import create_diffusion
    if kind == "official":
        from models import DiT_models
    else:
        from dit import DiT_models
        from train import AMP, update_ema
    model = DiT_models[cfg["model"]](input_size=32, num_classes=1000)
    fill_(model)
    # train mode: label dropout for classifier-free guidance, as both scripts do
    model.to(device).train()
    ema = deepcopy(model).requires_grad_(False).eval()
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    diffusion = create_diffusion("")
    # the official script takes AdamW's default implementation; train.py asks for the fused one
    fused = None if kind == "official" else True
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=fused)
    n = cfg["batch"]
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(n, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    # a latent cache row: the posterior's mean and std
    cached = torch.stack([mean, torch.full_like(mean, 0.05)], 1)  # (N, 2, C, h, w)
    # train.py's summed losses (a NaN stays in the sum until the next log line)
    keys = ["loss", "mse", "vb"]
    running = torch.zeros(len(keys), device=device)
    if kind != "official":
        # train.py's autocast context, built once, and its loss scaler (off unless fp16)
        ctx = torch.autocast(device.type, dtype=AMP[precision], enabled=precision != "fp32")
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def official_step():
        """The official loop body: latent * 0.18215, loss, backward, AdamW, per-parameter EMA."""
        x = (mean + 0.05 * torch.randn_like(mean)) * 0.18215
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        return loss

    def our_step():
        """train.py's loop body on a latent cache, with its loss bookkeeping (keep them in step)."""
        # a fresh posterior sample
        x = (cached[:, 0] + cached[:, 1] * torch.randn_like(cached[:, 0])) * 0.18215
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
        with ctx:
            loss_dict = diffusion.training_losses(model, x, t, dict(y=y))
        loss = loss_dict["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        update_ema(ema, model, 0.9999)
        running.add_(torch.stack([loss_dict[k].mean() for k in keys]).detach())
        return loss

    step = official_step if kind == "official" else our_step
    # same noise, timesteps and label dropout on both sides
    torch.manual_seed(2)
    # the first step is also the warm-up
    print("loss", step().item(), flush=True)
    for line in sys.stdin:
        k = int(line)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        sync(device)
        print(json.dumps((time.perf_counter() - t0) / k), flush=True)


def main():
    """Start the workers, check their first losses agree, then time them interleaved."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True,
                   help="a checkout of github.com/facebookresearch/DiT")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the official worker (needs timm)")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per worker per round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (the machine is shared)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.official, "models.py")):
        sys.exit(f"--official {args.official} has no models.py; "
                 "pass a checkout of facebookresearch/DiT")
    cfg = json.dumps({**vars(args), "official": os.path.abspath(args.official)})
    # each side a process: both have a module named "diffusion"
    sides = {
        "official fp32": (args.python, "official", "fp32"),
        "train.py fp32": (sys.executable, "ours", "fp32"),
        "train.py bf16": (sys.executable, "ours", "bf16"),
    }
    procs = {}
    losses = {}
    times = {name: [] for name in sides}
    for name, (python, kind, precision) in sides.items():
        command = [python, os.path.abspath(__file__), "--worker", kind, precision, cfg]
        procs[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        line = procs[name].stdout.readline().split()
        if not line or line[0] != "loss":
            sys.exit(f"the {name} worker failed (see its error above)")
        losses[name] = float(line[1])
    print("first-step loss: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    reference = losses["official fp32"]
    if abs(losses["train.py fp32"] - reference) > 1e-4 * abs(reference):
        sys.exit("train.py fp32 and the official step disagree: not timing different computations")
    for r in range(args.rounds):
        for name, proc in procs.items():
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            times[name].append(json.loads(proc.stdout.readline()))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    for proc in procs.values():
        proc.stdin.close()
    base = statistics.median(times["official fp32"])
    print(f"\n{args.model}, 32x32x4 latents, batch {args.batch}, {args.device}, "
          f"{args.threads} thread(s) per worker, median of {args.rounds} rounds x {args.steps} "
          "steps:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:14s} {m * 1e3:8.1f} ms/step {args.batch / m:8.2f} img/s "
              f"{base / m:6.2f}x official fp32")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        main()
