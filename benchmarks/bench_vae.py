"""
VAE decode throughput at 256x256 (latents 4x32x32): vae.py vs diffusers' AutoencoderKL, the SD VAE
architecture with the same (seeded random) weights, fp32 and bf16 (the weights cast, as
`load_vae(dtype=...)` does). The fp32 outputs must agree before anything is timed; rounds
alternate the order of the sides, medians are printed.

    # the figures
    python benchmarks/bench_vae.py
    # a smoke run
    python benchmarks/bench_vae.py --rounds 1
    # on a GPU
    python benchmarks/bench_vae.py --device cuda --batch 16

Needs torch and diffusers.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch


def main():
    """Check that both decoders agree, then time them round by round."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import vae
    from diffusers import AutoencoderKL
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    theirs = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                           latent_channels=4, norm_num_groups=32,
                           down_block_types=["DownEncoderBlock2D"] * 4,
                           up_block_types=["UpDecoderBlock2D"] * 4).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, t in sorted(theirs.state_dict().items()):
            t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.1))
    ours = vae.AutoencoderKL().eval()
    # diffusers' key names are vae.py's
    ours.load_state_dict(theirs.state_dict())
    z = torch.randn(args.batch, 4, 32, 32, generator=g).to(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    sides = {}
    for precision in args.precisions:
        dtype = dtypes[precision]
        d = copy.deepcopy(theirs).to(device, dtype)
        o = copy.deepcopy(ours).to(device, dtype)
        sides["diffusers", precision] = lambda d=d, dtype=dtype: d.decode(z.to(dtype)).sample
        sides["vae.py", precision] = lambda o=o, dtype=dtype: o.decode(z.to(dtype))
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, 256x256 decode")
    times = {k: [] for k in sides}
    outs = {}
    with torch.inference_mode():
        # the warm-up (oneDNN / cuDNN picks its kernels) and the check
        for k, f in sides.items():
            outs[k] = f().float()
        for precision in args.precisions:
            err = (outs["vae.py", precision] - outs["diffusers", "fp32"]).abs().max().item()
            print(f"{precision} vae.py vs diffusers fp32: max |diff| {err:.1e}")
            if precision == "fp32" and err > 1e-4:
                sys.exit("vae.py and diffusers disagree in fp32: not timing different computations")
        for r in range(args.rounds):
            for k in (list(sides) if r % 2 == 0 else reversed(list(sides))):
                sync(device)
                t0 = time.perf_counter()
                sides[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
            last = [f"{impl} {precision} {v[-1]:.2f} s" for (impl, precision), v in times.items()]
            print(f"round {r}: " + ", ".join(last), flush=True)
    for precision in args.precisions:
        for impl in ("diffusers", "vae.py"):
            m = statistics.median(times[impl, precision])
            print(f"{precision} {impl:9s} {m * 1e3:8.0f} ms/batch {args.batch / m:7.3f} img/s")
        # the per-round ratio is robust to the machine's load changing between rounds
        r = [a / b for a, b in zip(times["diffusers", precision], times["vae.py", precision])]
        print(f"{precision} vae.py speed-up over diffusers: {statistics.median(r):.2f}x "
              "(median of per-round ratios)")


def sync(device):
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
