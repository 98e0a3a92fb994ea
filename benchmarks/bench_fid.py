"""
Inception feature extraction throughput (uint8 images -> pool3 features, the work behind FID):
fid.py vs torch-fidelity's FeatureExtractorInceptionV3, the same network with the same (seeded
random) weights saved to a temporary file that both load. The pool3 features must agree before
anything is timed; rounds alternate the order of the sides, medians are printed.

    # the figures
    python benchmarks/bench_fid.py
    # a smoke run
    python benchmarks/bench_fid.py --rounds 1 --batch 8
    # on a GPU
    python benchmarks/bench_fid.py --device cuda --batch 250

Needs torch and torch-fidelity.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def fill_(model, seed=0):
    """Seeded weights with sane BatchNorm statistics, so that the features stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                # positive variances
                r = 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)
            elif t.dim() > 1:
                # He scale: activations keep their size through 90-odd layers
                r = r * (2 / (t.numel() // t.shape[0])) ** 0.5
            elif name.endswith("weight"):
                # BatchNorm gamma
                r = 1 + 0.1 * r
            else:
                r = 0.1 * r
            t.copy_(r)


def main():
    """Check that both extractors agree, then time them round by round."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256, help="image side (both resize to 299x299)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = fid.InceptionV3()
    fill_(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        # the key names of the FID Inception file, which both read
        torch.save(model.state_dict(), path)
        ours = fid.load_inception(path, device)
        theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                             feature_extractor_weights_path=path)
    theirs = theirs.eval().to(device)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    sides = {"fid.py": lambda: ours(x)[0], "torch-fidelity": lambda: theirs(x)[0]}
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} uint8 {args.size}x{args.size}")
    times = {k: [] for k in sides}
    with torch.inference_mode():
        # also the warm-up
        a = sides["fid.py"]()
        b = sides["torch-fidelity"]()
        err = ((a - b).abs().max() / b.abs().max()).item()
        print(f"pool3 fid.py vs torch-fidelity: max |diff| / max |feature| {err:.1e}")
        if err > 1e-4:
            sys.exit("fid.py and torch-fidelity disagree: not timing different computations")
        for r in range(args.rounds):
            for k in (list(sides) if r % 2 == 0 else reversed(list(sides))):
                sync(device)
                t0 = time.perf_counter()
                sides[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
            rates = [f"{k} {args.batch / v[-1]:.1f} img/s" for k, v in times.items()]
            print(f"round {r}: " + ", ".join(rates), flush=True)
    for k, ts in times.items():
        print(f"{k:15s} {args.batch / statistics.median(ts):8.2f} img/s (median)")
    # the per-round ratio is robust to the machine's load changing between rounds
    ratios = [b / a for a, b in zip(times["fid.py"], times["torch-fidelity"])]
    print(f"fid.py speed-up over torch-fidelity: {statistics.median(ratios):.2f}x "
          "(median of per-round ratios)")


def sync(device):
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
