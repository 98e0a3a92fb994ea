"""
Sampling throughput: sample.py's loop (dit.py + diffusion.py) vs the official loop (models.py
forward_with_cfg + the official diffusion's ddim_sample_loop), 256x256 images (32x32x4 latents),
50 DDIM steps, classifier-free guidance at scale 4 (the batch doubled), fp32 and bf16 autocast.
Same weights, same noise: the fp32 outputs must agree before anything is timed. Rounds alternate
the order of the two sides. The VAE decode is left out (bench_vae.py times it).

    # the figures
    python benchmarks/bench_sample.py --official /path/to/DiT
    # a smoke run
    python benchmarks/bench_sample.py --official /path/to/DiT --models DiT-S/2 --steps 2 --rounds 1
    # on a GPU
    python benchmarks/bench_sample.py --official /path/to/DiT --device cuda --batch 64

Needs torch, and timm for the official models.py.
"""
import argparse
import os
import statistics
import sys
import time

import torch


def load_official(path):
    """The official DiT_models and create_diffusion, imported without taking their module names."""
    clash = lambda name: name.split(".")[0] in ("models", "diffusion")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if clash(k)}
    sys.path.insert(0, path)
    try:
        import models
        import diffusion
        return models.DiT_models, diffusion.create_diffusion
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if clash(k)]:
            del sys.modules[k]
        sys.modules.update(ours)


def fill_(model, seed=0):
    """Overwrite every float tensor with seeded noise: both sides get the same weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.1))


def main():
    """Check that both loops give the same samples, then time them round by round."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True,
                   help="a checkout of github.com/facebookresearch/DiT")
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch", type=int, default=4,
                   help="images per batch (the model sees twice as many)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.official, "models.py")):
        sys.exit(f"--official {args.official} has no models.py; "
                 "pass a checkout of facebookresearch/DiT")
    official_models, official_diffusion = load_official(os.path.abspath(args.official))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import dit
    import sample
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, ddim{args.steps}, cfg 4.0, 256x256")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ours_loop = sample.sampling_loop("ddim", args.steps)
    theirs_d = official_diffusion(f"ddim{args.steps}")

    for name in args.models:
        ours = dit.DiT_models[name](input_size=32).eval()
        fill_(ours)
        theirs = official_models[name](input_size=32).eval()
        theirs.load_state_dict(ours.state_dict())
        ours = ours.to(device)
        theirs = theirs.to(device)
        outs = {}
        for precision in args.precisions:

            def run_ours():
                """sample.py's sampling call (guidance on the first 3 channels, as official)."""
                with sample.autocast(z.device, precision):
                    return sample.sample(ours, ours_loop, z, y, dict(cfg_scale=4.0))

            def run_official():
                """The official sample.py's guided loop (with DDIM), under autocast for bf16."""
                # the batch [z, z] with labels [y, null]
                z2 = torch.cat([z, z])
                y2 = torch.cat([y, torch.full_like(y, 1000)])
                bf16 = precision == "bf16"
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    x = theirs_d.ddim_sample_loop(theirs.forward_with_cfg, z2.shape, z2,
                                                  clip_denoised=False,
                                                  model_kwargs=dict(y=y2, cfg_scale=4.0),
                                                  progress=False, device=device)
                return x.chunk(2)[0]

            sides = {"sample.py": run_ours, "official": run_official}
            times = {k: [] for k in sides}
            # round 0 is the warm-up and the check
            for r in range(args.rounds + 1):
                for label in (sides if r % 2 else reversed(sides)):
                    # the DDIM loops draw (unused) noise each step, the same on both sides
                    torch.manual_seed(0)
                    sync(device)
                    t0 = time.perf_counter()
                    out = sides[label]().float()
                    sync(device)
                    if r:
                        times[label].append(time.perf_counter() - t0)
                    else:
                        outs[label, precision] = out
            err = (outs["sample.py", precision] - outs["official", precision]).abs().max().item()
            if precision == "fp32" and err > 1e-3:
                sys.exit(f"{name} fp32: sample.py and the official loop differ by {err:.2e}: "
                         "not timing")
            medians = {k: statistics.median(ts) for k, ts in times.items()}
            line = [f"{k} {args.batch / m:.3f} img/s ({m / args.steps * 1e3:.0f} ms/step)"
                    for k, m in medians.items()]
            speedup = medians["official"] / medians["sample.py"]
            print(f"{name} {precision}: " + " | ".join(line)
                  + f" | sample.py {speedup:.2f}x official | max |diff| {err:.1e}", flush=True)


def sync(device):
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
