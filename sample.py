"""
Sample images from a DiT.

    python sample.py                          # official DiT-XL/2 256x256 + SD VAE -> sample.png (8 classes)
    torchrun --nproc_per_node=8 sample.py --num-fid-samples 50000 --cfg-scale 1.5 --vae ema   # -> samples.npz

Without --num-fid-samples this is the official sample.py: same flags, defaults, noise draws and grid, so the
same seed and weights give the same sample.png. With it, it is the official sample_ddp.py: every process
samples its share with its own seed and random labels, and rank 0 writes one ADM-style .npz for fid.py.
Finished batches are kept in a folder next to the .npz, so an interrupted run continues where it stopped.
"""
import argparse
import json
import math
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from diffusion import create_diffusion
from dit import DiT, DiT_models, find_model
from vae import load_vae

CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py's classes

#################################################################################
#                                  Arguments                                    #
#################################################################################

def parse_args(argv=None):
    """Command line -> argparse.Namespace (official flags and defaults first)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default="DiT-XL/2", help=f"one of {', '.join(DiT_models)}")
    p.add_argument("--vae", type=str, default="mse",
                   help="ema, mse, a Hugging Face repo id, a local VAE folder or file, or none (pixel-space DiT)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1.5 for FID)")
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="FID sets: process r draws with seed * world_size + r")
    p.add_argument("--ckpt", type=str, default=None,
                   help="DiT checkpoint: raw state dict or train.py checkpoint (uses its EMA weights); "
                        "default: download the official DiT-XL/2 for --image-size 256 or 512")
    # Beyond the official sample.py:
    p.add_argument("--model-kwargs", type=str, default="{}",
                   help="the --model-kwargs JSON of a train.py run with a custom DiT, e.g. '{\"depth\": 4}'")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (default: the official 8)")
    p.add_argument("--out", type=str, default=None, help="output file (default sample.png, or samples.npz for FID)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument("--cfg-all-channels", action="store_true",
                   help="guide all latent channels (the official code guides the first 3, for reproducibility)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast model and VAE")
    # FID sample sets (the official sample_ddp.py):
    p.add_argument("--num-fid-samples", type=int, default=None, help="write this many images with random labels")
    p.add_argument("--per-proc-batch-size", type=int, default=32, help="FID sets: images per process and batch")
    return p.parse_args(argv)


def check_args(args):
    """Rejects bad input with a message naming the problem and the fix, before anything is loaded."""
    if args.model not in DiT_models:
        fail(f"unknown --model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.image_size <= 0 or (args.image_size % 8 and args.vae != "none"):
        fail(f"--image-size {args.image_size} is not a multiple of 8 (the VAE downsamples by 8); use e.g. 256 or 512")
    official = args.model == "DiT-XL/2" and args.image_size in (256, 512) and args.num_classes == 1000
    if args.ckpt is None and not official:
        fail("only DiT-XL/2 with --image-size 256 or 512 and --num-classes 1000 can be downloaded; "
             "for other models pass --ckpt PATH")
    if args.ckpt is None and args.vae == "none":
        fail("the official DiT-XL/2 is a latent model; --vae none needs a pixel-space --ckpt from train.py --vae none")
    try:
        assert isinstance(json.loads(args.model_kwargs), dict)
    except (ValueError, AssertionError):
        fail(f"--model-kwargs {args.model_kwargs!r} is not a JSON object, e.g. '{{\"depth\": 4}}'")
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        fail(f"--ckpt {args.ckpt} is not a file; give a checkpoint path, or leave --ckpt out to download DiT-XL/2")
    if args.labels is not None and args.num_fid_samples:
        fail("--labels is for a grid; --num-fid-samples draws uniformly random labels (as the official sample_ddp.py)")
    bad = [l for l in (args.labels or CLASS_LABELS) if not 0 <= l < args.num_classes]
    if bad and not args.num_fid_samples:
        fail(f"labels {bad} are out of range for --num-classes {args.num_classes}; "
             f"pass --labels between 0 and {args.num_classes - 1}")
    if args.num_sampling_steps < 1 or args.per_proc_batch_size < 1 or (args.num_fid_samples or 1) < 1:
        fail("--num-sampling-steps, --per-proc-batch-size and --num-fid-samples must be positive")


def fail(msg):
    """Stops with a one-line error (no traceback: the message says what to fix)."""
    raise SystemExit(f"sample.py: error: {msg}")

#################################################################################
#                               Model, VAE, sampling                            #
#################################################################################

def load_model(args, vae):
    """-> DiT (eval mode, on CPU) with the checkpoint's weights, or a clear error if they belong to another model."""
    factor, kwargs = 1 if vae is None else vae.downsample_factor, json.loads(args.model_kwargs)
    latent_size, patch = args.image_size // factor, kwargs.get("patch_size", int(args.model.split("/")[1]))
    if latent_size % patch:
        fail(f"--image-size {args.image_size} gives a {latent_size}x{latent_size} latent, not divisible by the "
             f"patch size {patch} of {args.model}; use a multiple of {factor * patch}")
    ckpt = args.ckpt or f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"
    # The official code builds the model right after torch.manual_seed, and on CPU its random init draws from the
    # same generator as the sampling noise: building it at the same point keeps CPU samples seed-for-seed equal.
    # A custom train.py model (--model-kwargs) is built as train.py builds it: DiT defaults, the named patch size.
    build = (lambda **kw: DiT(**{"patch_size": patch, **kwargs}, **kw)) if kwargs else DiT_models[args.model]
    try:
        model = build(input_size=latent_size, num_classes=args.num_classes,
                      in_channels=3 if vae is None else vae.config["latent_channels"])
    except TypeError as e:  # a misspelled --model-kwargs key
        fail(f"--model-kwargs {args.model_kwargs}: {e}")
    try:
        model.load_state_dict(find_model(ckpt))
    except (ValueError, RuntimeError) as e:
        fail(f"{ckpt} does not fit --model {args.model} --image-size {args.image_size} --num-classes "
             f"{args.num_classes} --vae {args.vae}: {e}")
    return model.eval()


def sample(model, diffusion, z, y, args, guided, progress=False):
    """Noise z (N, C, h, w) and labels y (N,) -> samples (N, C, h, w) of the reverse process."""
    n = len(y)
    if guided:  # classifier-free guidance: the batch is [z, z] with labels [y, null]
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, args.num_classes)], 0)  # the null class is num_classes
        kwargs = dict(y=y, cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_all_channels else 3)
        fn = model.forward_with_cfg
    else:
        kwargs, fn = dict(y=y), model.forward
    loop = diffusion.ddim_sample_loop if args.sampler == "ddim" else diffusion.p_sample_loop
    extra = dict(eta=args.eta) if args.sampler == "ddim" else {}
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        x = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=z.device, progress=progress, **extra)
    return x[:n]  # drop the unconditional half


def decode(vae, x, args):
    """Model-space samples -> images (N, 3, H, W) in about [-1, 1]."""
    if vae is None:  # pixel-space DiT
        return x.float()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        return vae.decode(x / vae.scaling_factor + vae.shift_factor).float()

#################################################################################
#                                 Image files                                   #
#################################################################################

def make_grid(x, nrow=4, padding=2):
    """Images (N, 3, H, W) in [-1, 1] -> uint8 grid (H', W', 3): torchvision save_image(normalize=True,
    value_range=(-1, 1)) pixels, i.e. rows of nrow images with 2-pixel black padding."""
    x = x.float().clamp(-1, 1).sub(-1).div(2)  # normalize: clamp to the range, then (x - low) / (high - low)
    x = x.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8)  # round half up, as save_image
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def to_uint8(x):
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), the ADM/official sample_ddp.py pixel rounding."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def atomic_write(path, write):
    """Calls write(file object) on a temp file next to path, then renames it into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_npz(path, chunks, shape):
    """Streams uint8 chunks into an .npz holding one array arr_0 of the given shape (as np.savez, without
    holding 50k images in memory)."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for chunk in chunks:
                    out.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
    atomic_write(path, write)


def progress(done, total, t0, what):
    """One status line on stderr: done/total, rate and time left."""
    el = time.time() - t0
    eta = el / max(done, 1e-9) * (total - done)
    sys.stderr.write(f"\r{what} {done}/{total} | {done / max(el, 1e-9):.2f}/s | eta {eta // 60:.0f}m{eta % 60:02.0f}s ")
    sys.stderr.write("\n" if done == total else "")
    sys.stderr.flush()

#################################################################################
#                                 FID sample sets                               #
#################################################################################

def rng_state(device):
    """The state of the generator that draws the sampling noise on device."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state, device):
    """Restores rng_state(device)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def sample_fid(args, model, vae, diffusion, device, rank, world):
    """Samples args.num_fid_samples images over all ranks; rank 0 writes them to args.out as arr_0 (N, H, W, 3)."""
    n = args.per_proc_batch_size
    iters = math.ceil(args.num_fid_samples / (n * world))  # batches per rank; extra images are dropped at the end
    parts = os.path.splitext(args.out)[0] + "_parts"
    # Finished batches may only be reused by a run that would draw exactly the same images.
    config = {k: v for k, v in vars(args).items() if k not in ("num_fid_samples", "out")}
    config.update(world_size=world, device=device.type)
    config_path = os.path.join(parts, "config.json")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(config_path):
            atomic_write(config_path, lambda f: f.write(json.dumps(config, indent=1).encode()))
    if world > 1:
        dist.barrier()
    with open(config_path) as f:
        old = json.load(f)
    if old != config:
        diff = ", ".join(f"{k}: {old.get(k)} -> {config.get(k)}"
                         for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k))
        fail(f"{parts} holds batches sampled with other options ({diff}); delete it or pass another --out")

    shard = lambda r, b: os.path.join(parts, f"rank{r:03d}-batch{b:06d}.npz")
    start = next((b for b in range(iters) if not os.path.exists(shard(rank, b))), iters)
    if start == 0:
        torch.manual_seed(args.seed * world + rank)  # per-rank seed, as the official sample_ddp.py
    else:  # continue the random stream where the last finished batch left it
        with np.load(shard(rank, start - 1)) as f:
            set_rng_state(torch.from_numpy(f["rng"]), device)
    if rank == 0:
        print(f"sampling {args.num_fid_samples} images: {world} process(es) x {iters} batches of {n}, "
              f"{start} batches already done, into {parts}", file=sys.stderr)
    guided = args.cfg_scale > 1.0  # as the official sample_ddp.py: cfg 1.0 samples without the null batch
    latent, t0 = model.config["input_size"], time.time()
    for b in range(start, iters):
        z = torch.randn(n, model.in_channels, latent, latent, device=device)
        y = torch.randint(0, args.num_classes, (n,), device=device)
        images = to_uint8(decode(vae, sample(model, diffusion, z, y, args, guided), args))
        state = rng_state(device).cpu().numpy()
        atomic_write(shard(rank, b), lambda f: np.savez(f, images=images, labels=y.cpu().numpy(), rng=state))
        if rank == 0:
            progress((b - start + 1) * n * world, (iters - start) * n * world, t0, "images")
    if world > 1:
        dist.barrier()
    if rank == 0:
        # Global image index b * n * world + i * world + r, as the official sample_ddp.py numbers its PNGs.
        def chunks():
            left = args.num_fid_samples
            for b in range(iters):
                batch = []
                for r in range(world):
                    with np.load(shard(r, b)) as f:
                        batch.append(f["images"])
                batch = np.stack(batch, 1).reshape(-1, *batch[0].shape[1:])  # (n * world, H, W, 3)
                yield batch[:left]
                left -= len(batch[:left])
        shape = (args.num_fid_samples, args.image_size, args.image_size, 3)
        write_npz(args.out, chunks(), shape)
        print(f"saved {args.out} (arr_0: {shape} uint8)", file=sys.stderr)

#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    args.out = args.out or ("samples.npz" if args.num_fid_samples else "sample.png")
    rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_fid_samples and "RANK" in os.environ:  # started by torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":  # TF32 matmuls, as the official scripts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with torch.no_grad():
        if rank > 0:
            dist.barrier()  # rank 0 downloads the weights first; the other ranks then find them in the cache
        # The VAE is loaded before seeding: like diffusers' from_pretrained, loading it draws no random numbers.
        vae = None if args.vae == "none" else load_vae(args.vae, device=device)
        if vae is not None and args.image_size % vae.downsample_factor:
            fail(f"--image-size {args.image_size} is not divisible by the VAE's downsampling {vae.downsample_factor}")
        torch.manual_seed(args.seed)
        model = load_model(args, vae).to(device)
        if rank == 0 and world > 1:
            dist.barrier()
        steps = args.num_sampling_steps
        diffusion = create_diffusion(f"ddim{steps}" if args.sampler == "ddim" else str(steps))
        if args.num_fid_samples:
            sample_fid(args, model, vae, diffusion, device, rank, world)
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
            return
        labels = args.labels or CLASS_LABELS
        latent = model.config["input_size"]
        z = torch.randn(len(labels), model.in_channels, latent, latent, device=device)
        y = torch.tensor(labels, device=device)
        x = decode(vae, sample(model, diffusion, z, y, args, guided=True, progress=True), args)
    grid = make_grid(x)
    ext = os.path.splitext(args.out)[1]
    fmt = Image.registered_extensions().get(ext, "PNG")
    atomic_write(args.out, lambda f: Image.fromarray(grid).save(f, format=fmt))
    print(f"saved {args.out} ({len(labels)} images, classes {labels})", file=sys.stderr)


if __name__ == "__main__":
    main()
