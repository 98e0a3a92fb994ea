"""
Few-step samplers against the converged ODE solution: for a trained DiT, the distance of DDIM and
DPM-Solver++(2M) samples at 10, 15, 20, 25 and 50 steps from DDIM with all 1000 steps (eta 0, the
probability-flow ODE solved finely) from the same noise, and the wall time per image of each.

    python benchmarks/bench_solvers.py --ckpt results/000-DiT-S-2/checkpoints/0001500.pt
    python benchmarks/bench_solvers.py --ckpt ... --cfg-scale 4 --images 64

The distance is the root mean square pixel difference in [-1, 1] (decoded images for latent models),
averaged over the images; the model is a train.py checkpoint (its EMA weights and its own flags).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import sample  # noqa: E402
from vae import load_vae  # noqa: E402


def run(model, vae, loop, z, y, cfg_scale, clip):
    """Decoded samples (N, 3, H, W) in [-1, 1] and the seconds they took."""
    start = time.time()
    with torch.no_grad():
        guidance = None if cfg_scale is None else dict(cfg_scale=cfg_scale, cfg_channels=None)
        x = sample.sample(model, loop, z, y, guidance, clip_denoised=clip)
        images = sample.decode(vae, x).clamp(-1, 1)
    return images, time.time() - start


def main():
    """Sample the same noise with each solver and step count; print distances and times."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    p.add_argument("--images", type=int, default=100, help="images per run (one batch)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: none)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 50])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ckpt = dit.load_checkpoint(args.ckpt)
    saved = ckpt["args"]
    vae = None if saved["vae"] == "none" else load_vae(saved["vae"])
    model = dit.DiT(**ckpt["config"]).eval()
    model.load_state_dict(ckpt["ema"])
    size = model.config["input_size"]
    generator = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.images, model.in_channels, size, size, generator=generator)
    y = torch.randint(0, saved["num_classes"], (args.images,), generator=generator)
    clip = vae is None
    reference, seconds = run(model, vae, sample.sampling_loop("ddim", 1000), z, y,
                             args.cfg_scale, clip)
    print(f"converged: DDIM-1000, {seconds / args.images * 1e3:.1f} ms/image "
          f"({args.images} images, guidance {args.cfg_scale or 'none'}, {args.ckpt})")
    print("| steps | DDIM RMSE | DDIM ms/image | DPM-Solver++ RMSE | DPM-Solver++ ms/image |"
          " DDIM / DPM++ RMSE |")
    print("|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        row = [f"{steps}"]
        errors = []
        for sampler in ("ddim", "dpm++"):
            loop = sample.sampling_loop(sampler, steps)
            images, seconds = run(model, vae, loop, z, y, args.cfg_scale, clip)
            rmse = (images - reference).square().mean((1, 2, 3)).sqrt().mean().item()
            errors.append(rmse)
            row += [f"{rmse:.4f}", f"{seconds / args.images * 1e3:.2f}"]
        row.append(f"{errors[0] / errors[1]:.1f}x")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
