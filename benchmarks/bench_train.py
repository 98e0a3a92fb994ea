"""
Training step: the official DiT train.py step (fp32) vs this repo's train.py step (fp32, bf16 autocast).

DiT-S/2 on 32x32x4 latents (256x256 images), batch 8: a posterior sample from the latent cache, the diffusion
loss, one AdamW step and the EMA update (train.py's loop body is mirrored below, on dit.py and diffusion.py,
as train.py exposes no step function). Each side runs in its own worker process with the same weights and
inputs; the first step's losses must agree, then the workers take turns, a block of steps each, round by round
(the machine is shared and noisy), and the medians are printed.

    python benchmarks/bench_train.py --official /path/to/DiT                              # the figures
    python benchmarks/bench_train.py --official /path/to/DiT --rounds 1 --steps 1         # smoke run
    python benchmarks/bench_train.py --official /path/to/DiT --device cuda --batch 256    # on a GPU

Needs torch, and timm for the official models.py; --python runs the official worker with another interpreter.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # the project's modules


def fill_(model, seed=0):
    """Overwrite every float tensor with seeded noise: both sides start from the same (non-trivial) weights."""
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
    """Build one side; print the first step's loss, then on each stdin line n, run n steps and print s/step."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    sys.path.insert(0, cfg["official"] if kind == "official" else ROOT)
    from copy import deepcopy
    from diffusion import create_diffusion
    if kind == "official":
        from models import DiT_models
    else:
        from dit import DiT_models
    model = DiT_models[cfg["model"]](input_size=32, num_classes=1000)
    fill_(model)
    model.to(device).train()  # train mode: label dropout for classifier-free guidance, as both scripts do
    ema = deepcopy(model).requires_grad_(False).eval()
    params, ema_params, diffusion = list(model.parameters()), list(ema.parameters()), create_diffusion("")
    # the official script takes AdamW's default implementation; train.py asks for the fused one
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True if kind != "official" else None)
    g, n = torch.Generator().manual_seed(1), cfg["batch"]
    mean, y = torch.randn(n, 4, 32, 32, generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device)
    cached = torch.stack([mean, torch.full_like(mean, 0.05)], 1)  # (N, 2, C, h, w): a cache row, mean and std
    amp = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def model_fn(x, t, y):
        """The DiT under autocast, float32 out, as in train.py."""
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(x, t, y).float()

    def official_step():
        """The official loop body: latent sample * 0.18215, loss, backward, AdamW, per-parameter EMA update."""
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
        """train.py's loop body with a latent cache, running-loss bookkeeping included (keep the two in step)."""
        x = (cached[:, 0] + cached[:, 1] * torch.randn_like(cached[:, 0])) * 0.18215  # fresh posterior sample
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
        losses = diffusion.training_losses(model_fn, x, t, dict(y=y))
        opt.zero_grad(set_to_none=True)
        losses["loss"].mean().backward()
        opt.step()
        with torch.no_grad():  # EMA as two foreach kernels
            torch._foreach_mul_(ema_params, 0.9999)
            torch._foreach_add_(ema_params, params, alpha=1 - 0.9999)
            means = torch.stack([losses[k].mean() for k in ("loss", "mse", "vb")])
            running.add_(torch.cat([means, (~torch.isfinite(means).all())[None]]))
        return losses["loss"].mean()

    running, step = torch.zeros(4, device=device), official_step if kind == "official" else our_step
    torch.manual_seed(2)  # same noise, timesteps and label dropout on both sides
    print("loss", step().item(), flush=True)  # also the warm-up
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of github.com/facebookresearch/DiT")
    p.add_argument("--python", default=sys.executable, help="interpreter for the official worker (needs timm)")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per worker per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (the machine is shared)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.official, "models.py")):
        sys.exit(f"--official {args.official} has no models.py; pass a checkout of facebookresearch/DiT")
    cfg = json.dumps({**vars(args), "official": os.path.abspath(args.official)})
    sides = {"official fp32": (args.python, "official", "fp32"), "train.py fp32": (sys.executable, "ours", "fp32"),
             "train.py bf16": (sys.executable, "ours", "bf16")}  # each a process: both sides have a "diffusion"
    procs, losses, times = {}, {}, {name: [] for name in sides}
    for name, (python, kind, precision) in sides.items():
        procs[name] = subprocess.Popen([python, os.path.abspath(__file__), "--worker", kind, precision, cfg],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = procs[name].stdout.readline().split()
        if not line or line[0] != "loss":
            sys.exit(f"the {name} worker failed (see its error above)")
        losses[name] = float(line[1])
    print("first-step loss: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    if abs(losses["train.py fp32"] - losses["official fp32"]) > 1e-4 * abs(losses["official fp32"]):
        sys.exit("train.py fp32 and the official step disagree: not timing different computations")
    for r in range(args.rounds):
        for name, proc in procs.items():
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            times[name].append(json.loads(proc.stdout.readline()))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
    for proc in procs.values():
        proc.stdin.close()
    base = statistics.median(times["official fp32"])
    print(f"\n{args.model}, 32x32x4 latents, batch {args.batch}, {args.device}, {args.threads} thread(s) per worker, "
          f"median of {args.rounds} rounds x {args.steps} steps:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:14s} {m * 1e3:8.1f} ms/step {args.batch / m:8.2f} img/s {base / m:6.2f}x official fp32")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        main()
