"""
Sample images from a DiT.

    python sample.py                       # official DiT-XL/2 256x256 + SD VAE -> sample.png
    python sample.py --ckpt results/000-DiT-S-4/checkpoints/0001000.pt   # a train.py run
    torchrun --nproc_per_node=8 sample.py --num-fid-samples 50000 --cfg-scale 1.5 --vae ema

Without --num-fid-samples this is the official sample.py: same flags, defaults, noise draws and
grid. With it, it is the official sample_ddp.py: every process samples its share with its own seed
and random labels, and rank 0 writes one ADM-style .npz for fid.py. Finished batches are kept in a
folder next to the .npz, so an interrupted run continues where it stopped.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import dit
import fid
from diffusion import create_diffusion, print_progress
from vae import load_vae

# the official sample.py's classes, and the defaults of its flags
CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
DEFAULTS = dict(model="DiT-XL/2", image_size=256, num_classes=1000, vae="mse", model_kwargs="{}")

def fail(message):
    """Stop with one clear line instead of a traceback."""
    raise SystemExit(f"sample.py: error: {message}")

#################################################################################
#                                    Sampling                                   #
#################################################################################

def default_labels(num_classes, n=8):
    """The official 8 ImageNet classes (repeated), or 0, 1, 2, ... modulo the class count."""
    if num_classes == 1000:
        return (CLASS_LABELS * math.ceil(n / 8))[:n]
    return [i % num_classes for i in range(n)]

def sampling_loop(sampler, num_steps, eta=0.0, progress=False):
    """loop(model_fn, shape, noise, ...) -> x_0 of "ddpm", "ddim" or "dpm++" in num_steps calls.

    :param sampler: "ddpm" (the official sampler), "ddim" or "dpm++" (DPM-Solver++(2M)).
    :param num_steps: model evaluations; DDPM and DDIM respace the 1000 training steps.
    :param eta: DDIM's noise (0: deterministic); ignored by the other samplers.
    :param progress: print a progress line with an ETA to stderr.
    """
    if sampler == "dpm++":
        # DPM-Solver++ picks its own timesteps out of all 1000 (checked here, before sampling)
        diffusion = create_diffusion("")
        diffusion.dpm_solver_timesteps(num_steps)
        loop = functools.partial(diffusion.dpm_solver_sample_loop, num_steps=num_steps)
    elif sampler == "ddim":
        loop = functools.partial(create_diffusion(f"ddim{num_steps}").ddim_sample_loop, eta=eta)
    else:
        loop = create_diffusion(str(num_steps)).p_sample_loop
    return functools.partial(loop, progress=progress)

def sample(model, loop, z, y, guidance=None, clip_denoised=False):
    """Sample x_0 from noise z for labels y, with classifier-free guidance if asked.

    :param model: a DiT (in eval mode).
    :param loop: a sampling loop from sampling_loop().
    :param z: the noise x_T, (N, C, h, w) float, on the model's device.
    :param y: the class labels, (N,) int64 in [0, num_classes).
    :param guidance: None (unguided), or forward_with_cfg's keyword arguments: cfg_scale (the
                     official sample.py uses 4.0), cfg_channels (3: the official code guides the
                     first 3 channels; None: all) and cfg_interval ((lo, hi): only lo < t <= hi).
    :param clip_denoised: clip predicted x_0 to [-1, 1] (pixel models; latents are not clipped).
    :return: x_0, (N, C, h, w). Under torch.autocast (see autocast()), the model runs in bf16.
    """
    if guidance is None:
        fn = model.forward
        model_kwargs = dict(y=y)
    else:
        # classifier-free guidance: the batch is [z, z] with labels [y, null]
        null = torch.full_like(y, model.config["num_classes"])
        z = torch.cat([z, z], 0)
        fn = model.forward_with_cfg
        model_kwargs = dict(y=torch.cat([y, null], 0), **guidance)
    x = loop(fn, z.shape, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
             device=z.device)
    # the conditional half
    return x[: len(y)]

def autocast(device, precision):
    """The autocast context of --precision: bf16 matmuls, or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

def decode(vae, x):
    """Model-space samples -> images (N, 3, H, W) in about [-1, 1] (pixel models: as they are)."""
    if vae is None:
        return x.float()
    return vae.decode(x / vae.scaling_factor + vae.shift_factor).float()

def to_uint8(x):
    """Images in [-1, 1] -> uint8, ADM's rounding (what the FID reference batches used)."""
    return torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)

def generate(model, vae, loop, n, generator=None, guidance=None):
    """n images of random classes, drawn as the official sample_ddp.py draws them.

    :param vae: the VAE that decodes latents, or None for a pixel model (then x_0 is clipped).
    :param generator: a torch.Generator on the model's device; None: the global random state.
    :param guidance: as for sample().
    :return: (images, labels): uint8 (n, 3, H, W) and int64 (n,).
    """
    device = next(model.parameters()).device
    size = model.config["input_size"]
    z = torch.randn(n, model.in_channels, size, size, generator=generator, device=device)
    y = torch.randint(0, model.config["num_classes"], (n,), generator=generator, device=device)
    x = sample(model, loop, z, y, guidance=guidance, clip_denoised=vae is None)
    return to_uint8(decode(vae, x)), y

#################################################################################
#                             Image files and FID sets                          #
#################################################################################

def make_grid(images, nrow=4, padding=2):
    """uint8 images (N, 3, H, W) -> a grid (H', W', 3) laid out as torchvision's save_image."""
    # rows of nrow images with black padding, what the official sample.py writes
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding,
                       dtype=torch.uint8)
    for i in range(n):
        top = (i // cols) * (h + padding) + padding
        left = (i % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = images[i]
    return grid.permute(1, 2, 0).numpy()

def atomic_write(path, write):
    """Call write(file) on a temp file next to path, then rename it into place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def remove_dead_writers_files(folder):
    """Delete the temp files (<name>.<pid>.tmp) that writers killed mid-write left in folder."""
    for name in os.listdir(folder):
        match = re.fullmatch(r".+\.(\d+)\.tmp", name)
        if match is None:
            continue
        try:
            # signal 0 only asks whether the process exists
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            os.remove(os.path.join(folder, name))
        except PermissionError:
            # another user's live process
            pass

def write_npz(path, chunks, shape):
    """Stream uint8 chunks into an .npz of one array arr_0 (as np.savez, with less memory)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for chunk in chunks:
                    out.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
    atomic_write(path, write)

def file_sha256(path):
    """sha256 of a file's content: FID batches are tied to the weights, not to a path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()

def sample_fid(model, vae, loop, guidance, args, config):
    """Sample --num-fid-samples over all ranks; rank 0 writes them to the .npz --out.

    :param guidance: as for sample(), or None.
    :param args: the flags: num_fid_samples, per_proc_batch_size, seed, out, precision.
    :param config: what decides the images (the flags, the weights' sha256, the world size):
                   finished batches of another config are never reused.
    """
    device = next(model.parameters()).device
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    n = args.per_proc_batch_size
    # batches per rank; the images past num_images are dropped at the end
    iters = math.ceil(args.num_fid_samples / (n * world_size))
    parts = os.path.splitext(args.out)[0] + "_parts"
    # finished batches may only be reused by a run that would draw exactly the same images
    config_path = os.path.join(parts, "config.json")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        remove_dead_writers_files(parts)
        if not os.path.exists(config_path):
            atomic_write(config_path, lambda f: f.write(json.dumps(config, indent=1).encode()))
    if world_size > 1:
        dist.barrier()
    check_parts_config(config_path, config)
    def shard(r, b):
        return os.path.join(parts, f"rank{r:03d}-batch{b:06d}.npz")
    start = finished_batches(shard, rank, iters)
    if start == 0:
        # per-rank seed, as the official sample_ddp.py
        torch.manual_seed(args.seed * world_size + rank)
    else:
        # continue the random stream (of the device that draws the noise) where the last
        # finished batch left it
        with np.load(shard(rank, start - 1)) as f:
            state = torch.from_numpy(f["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
    if rank == 0:
        print(f"sampling {args.num_fid_samples} images: {world_size} process(es) x {iters} "
              f"batches of {n}, {start} batches already done, into {parts}", file=sys.stderr)
    t0 = time.time()
    total = (iters - start) * n * world_size
    for b in range(start, iters):
        with autocast(device, args.precision):
            images, labels = generate(model, vae, loop, n, guidance=guidance)
        images = images.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
        state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        atomic_write(shard(rank, b), lambda f: np.savez(f, images=images,
                                                        labels=labels.cpu().numpy(), rng=state))
        if rank == 0:
            print_progress("images", (b - start + 1) * n * world_size, total, t0)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        size = model.config["input_size"] * (1 if vae is None else vae.downsample_factor)
        shape = (args.num_fid_samples, size, size, 3)
        write_npz(args.out, fid_chunks(shard, iters, world_size, args.num_fid_samples), shape)
        print(f"saved {args.out} (arr_0: {shape} uint8)", file=sys.stderr)

def check_parts_config(config_path, config):
    """Refuse a _parts folder whose batches were sampled with other options."""
    try:
        with open(config_path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{config_path} cannot be read ({e}); delete its folder")
    if old != config:
        diff = ", ".join(f"{k}: {old.get(k)} -> {config.get(k)}"
                         for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k))
        fail(f"{os.path.dirname(config_path)} holds batches sampled with other options ({diff}); "
             "delete it or pass another --out")

def finished_batches(shard, rank, iters):
    """How many of this rank's batches are done; a cut or empty one is sampled again."""
    for b in range(iters):
        try:
            with np.load(shard(rank, b)) as f:
                # reading every array checks the zip's CRCs: a damaged file fails here
                [f[key] for key in ("images", "labels", "rng")]
        except FileNotFoundError:
            return b
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"sample.py: warning: {shard(rank, b)} is damaged ({e}); sampling it and "
                  "the batches after it again", file=sys.stderr)
            # the random stream continues from the batch before: later batches are redone too
            for later in range(b, iters):
                if os.path.exists(shard(rank, later)):
                    os.remove(shard(rank, later))
            return b
    return iters

def fid_chunks(shard, iters, world_size, total):
    """The first `total` images of the finished batches, in the official sample_ddp.py order."""
    # image b * n * world_size + i * world_size + r is rank r's batch b, row i
    left = total
    for b in range(iters):
        batch = []
        for r in range(world_size):
            with np.load(shard(r, b)) as f:
                batch.append(f["images"])
        batch = np.stack(batch, 1).reshape(-1, *batch[0].shape[1:])  # (n * world_size, H, W, 3)
        yield batch[:left]
        left -= len(batch[:left])

#################################################################################
#                             Arguments and checkpoint                          #
#################################################################################

def parse_args(argv=None):
    """Command line -> argparse.Namespace (the official flags first)."""
    p = argparse.ArgumentParser(prog="sample.py", description="Sample a grid of images, or an "
                                "FID set, from a DiT.", epilog=EXAMPLES, formatter_class=Help)
    # unset, these come from a train.py checkpoint, else they are the official defaults
    p.add_argument("--model", choices=list(dit.DiT_models), help="DiT config (default: the "
                   "checkpoint's, else DiT-XL/2)")
    p.add_argument("--vae", help="ema, mse, a Hugging Face repo id, a VAE folder or file, or none "
                   "for pixel models (default: the checkpoint's, else mse)")
    p.add_argument("--image-size", type=count(1), help="pixels (default: checkpoint's, else 256)")
    p.add_argument("--num-classes", type=count(1), help="default: the checkpoint's, else 1000")
    p.add_argument("--cfg-scale", type=number(0, math.inf), default=4.0, help="guidance (FID: 1.5)")
    p.add_argument("--num-sampling-steps", type=count(1), help="default: 250, dpm++: 20")
    p.add_argument("--seed", type=int, default=0, help="FID: rank r uses seed*world_size+r")
    p.add_argument("--ckpt", help="a train.py checkpoint (its EMA) or a state dict (default: the "
                   "official DiT-XL/2 of --image-size 256 or 512)")
    p.add_argument("--model-kwargs", help="JSON of DiT arguments (default: the checkpoint's)")
    p.add_argument("--labels", type=int, nargs="+", help="classes (default: official 8 or 0..7)")
    p.add_argument("--out", help="default: sample.png; samples.npz for FID sets")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddpm",
                   help="ddpm (official), ddim, or DPM-Solver++(2M)")
    p.add_argument("--eta", type=number(0, math.inf), default=0.0, help="DDIM noise (0: none)")
    p.add_argument("--cfg-interval", type=number(-1, 1000), nargs=2, metavar=("LO", "HI"),
                   help="guide only timesteps LO < t <= HI of 0..999 (default: all)")
    p.add_argument("--cfg-all-channels", action="store_true",
                   help="guide all latent channels (the official code guides the first 3)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--check", action="store_true", help="load everything, say where the files "
                   "are, sample nothing")
    p.add_argument("--num-fid-samples", type=count(1), help="write this many images with random "
                   "labels into an .npz (sample_ddp.py)")
    p.add_argument("--per-proc-batch-size", type=count(1), default=32, help="FID sets: batch size")
    return p.parse_args(argv)

class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with the defaults shown (unless the text says them) and the examples as written."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help:
            return action.help
        return super()._get_help_string(action)

def count(low):
    """An argparse type: a whole number of at least low."""
    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text} is not a whole number >= {low}")
        return int(text)
    return parse

def number(low, high):
    """An argparse type: a number in [low, high) (never NaN)."""
    def parse(text):
        value = float(text)
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"{text} is not a number in [{low}, {high})")
        return value
    return parse

EXAMPLES = """examples:
  python sample.py --sampler dpm++ --precision bf16 --labels 207 88      # a first image on a CPU
  python sample.py --ckpt results/000-DiT-S-2/checkpoints/0100000.pt --cfg-scale 2
  torchrun --nproc_per_node=8 sample.py --num-fid-samples 50000 --cfg-scale 1.5 --vae ema"""

def check_args(args):
    """Reject bad flags with a message naming the problem and the fix, before anything loads."""
    if args.cfg_interval and not args.cfg_interval[0] < args.cfg_interval[1]:
        fail(f"--cfg-interval {args.cfg_interval[0]} {args.cfg_interval[1]}: LO must be below HI")
    if args.num_sampling_steps is None:
        args.num_sampling_steps = 20 if args.sampler == "dpm++" else 250
    try:
        if args.model_kwargs is not None and not isinstance(json.loads(args.model_kwargs), dict):
            raise ValueError("not a JSON object")
        # the step count must fit the 1000 training steps (and DDIM's integer stride)
        sampling_loop(args.sampler, args.num_sampling_steps)
    except ValueError as e:
        fail(f"{e} (--model-kwargs {args.model_kwargs}, --num-sampling-steps "
             f"{args.num_sampling_steps})")
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        fail(f"--ckpt {args.ckpt} is not a file; give a checkpoint, or leave --ckpt out to "
             "download the official DiT-XL/2")
    official = (args.model in (None, "DiT-XL/2") and args.image_size in (None, 256, 512)
                and args.num_classes in (None, 1000) and args.vae != "none")
    if args.ckpt is None and not official:
        fail("only the latent DiT-XL/2 with --image-size 256 or 512 and --num-classes 1000 "
             "can be downloaded; for other models pass --ckpt PATH")
    if args.labels is not None and args.num_fid_samples:
        fail("--labels is for a grid; FID sets draw uniformly random labels (as sample_ddp.py)")
    args.out = args.out or ("samples.npz" if args.num_fid_samples else "sample.png")
    extension = os.path.splitext(args.out)[1].lower()
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out} is a folder, or its folder does not exist")
    if args.num_fid_samples and extension != ".npz":
        fail(f"--out {args.out}: FID sets are written as .npz files")
    if not args.num_fid_samples and extension not in Image.registered_extensions():
        fail(f"--out {args.out}: not an image file name (.png, .jpg, ...)")

def apply_checkpoint(args, ckpt, path):
    """Fill unset flags from the args a train.py checkpoint stores -> its DiT config or None."""
    saved = ckpt.get("args", {})
    # the official train.py stored an argparse.Namespace
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    types = dict(model=str, image_size=int, num_classes=int, vae=str, model_kwargs=(str, dict))
    bad = not isinstance(saved, dict) or not isinstance(ckpt.get("config", {}), dict)
    bad = bad or any(k in saved and not isinstance(saved[k], t) for k, t in types.items())
    if bad:
        fail(f"{path} stores its settings in a form train.py never writes; save its weights "
             "alone (torch.save(ckpt['ema'], ...)) and pass --model, --image-size and the rest")
    explicit = args.model is not None or args.model_kwargs is not None
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))
    if not isinstance(args.model_kwargs, str):
        args.model_kwargs = json.dumps(args.model_kwargs)
    bad = [label for label in args.labels or () if not 0 <= label < args.num_classes]
    if bad:
        fail(f"labels {bad} are out of range for {args.num_classes} classes; pass --labels "
             f"between 0 and {args.num_classes - 1}")
    # explicit model flags win over the stored config (and are checked against the weights)
    return None if explicit else ckpt.get("config")

def build_model(args, vae, config=None):
    """The DiT of a checkpoint's config, or of --model and --model-kwargs, for --image-size."""
    factor = 1 if vae is None else vae.downsample_factor
    kwargs = dict(config) if config else json.loads(args.model_kwargs)
    channels = 3 if vae is None else vae.config["latent_channels"]
    kwargs.update(input_size=args.image_size // factor, in_channels=channels,
                  num_classes=args.num_classes)
    if args.image_size % factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's {factor}")
    try:
        return dit.create_dit(args.model, **kwargs)
    except ValueError as e:
        raise ValueError(f"{e} (--model {args.model}, --model-kwargs {args.model_kwargs}, "
                         f"--image-size {args.image_size}, VAE factor {factor})") from None

#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    """Sample a grid (the official sample.py) or an FID set (the official sample_ddp.py)."""
    args = parse_args(argv)
    check_args(args)
    rank = 0
    world_size = 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_fid_samples and "RANK" in os.environ:
        # started by torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        world_size = dist.get_world_size()
    if device.type == "cuda":
        # TF32 matmuls, as the official scripts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.no_grad():
            run(args, rank, world_size, device)
    except (OSError, ValueError) as e:
        # a failed download, a corrupt or foreign file: one line that says what to do
        fail(str(e))
    finally:
        if world_size > 1:
            dist.destroy_process_group()

def run(args, rank, world_size, device):
    """Load the checkpoint and the VAE, build the DiT, then sample."""
    # rank 0 downloads first; the other ranks then find the files in the cache
    if rank > 0:
        dist.barrier()
    size = args.image_size or DEFAULTS["image_size"]
    ckpt_path = args.ckpt or os.path.join(dit.cache_dir(), f"DiT-XL-2-{size}x{size}.pt")
    ckpt = dit.load_checkpoint(args.ckpt or os.path.basename(ckpt_path))
    config = apply_checkpoint(args, ckpt, ckpt_path)
    # Loading the VAE draws no random numbers (as diffusers' from_pretrained): it may come first.
    vae = None if args.vae == "none" else load_vae(args.vae, device=device)
    # The official code builds the model right after torch.manual_seed, and its random init draws
    # from the generator of the CPU noise: building it here keeps CPU samples seed-for-seed equal.
    torch.manual_seed(args.seed)
    model = build_model(args, vae, config).eval()
    try:
        model.load_state_dict(ckpt.get("ema", ckpt))
    except (ValueError, RuntimeError) as e:
        fail(f"{ckpt_path} does not fit --model {args.model} --image-size {args.image_size} "
             f"--num-classes {args.num_classes} --vae {args.vae}: {e}; pass the flags it was "
             "trained with, or leave them out for a train.py checkpoint")
    model.to(device)
    if rank == 0 and world_size > 1:
        dist.barrier()
    if args.check:
        # what was loaded from where, and whether fid.py's Inception weights are there
        inception = os.path.join(dit.cache_dir(), fid.INCEPTION_FILE)
        found = "found" if os.path.isfile(inception) else "missing (needed by fid.py only)"
        print(f"DiT checkpoint: {ckpt_path} ({dit.describe_state_dict(model.state_dict())})\n"
              f"VAE: {args.vae}, loaded\n"
              f"Inception weights for fid.py: {inception}: {found}\n"
              "everything needed to sample is in place")
        return
    guidance = dict(cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_all_channels else 3,
                    cfg_interval=args.cfg_interval)
    if args.num_fid_samples:
        # the options that decide the images (not the output's name, not the checkpoint's path)
        ignored = ("num_fid_samples", "out", "ckpt")
        config = {k: v for k, v in vars(args).items() if k not in ignored}
        config.update(weights_sha256=file_sha256(ckpt_path), world_size=world_size,
                      device=device.type)
        loop = sampling_loop(args.sampler, args.num_sampling_steps, args.eta)
        # as the official sample_ddp.py: a scale of 1 samples without the null batch
        sample_fid(model, vae, loop, guidance if args.cfg_scale > 1 else None, args=args,
                   config=config)
        return
    # a grid, as the official sample.py: always guided (the null batch even at scale 1)
    loop = sampling_loop(args.sampler, args.num_sampling_steps, args.eta, progress=True)
    labels = args.labels or default_labels(args.num_classes)
    size = model.config["input_size"]
    z = torch.randn(len(labels), model.in_channels, size, size, device=device)
    y = torch.tensor(labels, device=device)
    with autocast(device, args.precision):
        x = sample(model, loop, z, y, guidance=guidance, clip_denoised=vae is None)
        images = to_uint8(decode(vae, x))
    grid = make_grid(images)
    file_format = Image.registered_extensions()[os.path.splitext(args.out)[1].lower()]
    atomic_write(args.out, lambda f: Image.fromarray(grid).save(f, format=file_format))
    print(f"saved {args.out} ({len(labels)} images, classes {labels})", file=sys.stderr)

if __name__ == "__main__":
    main()
