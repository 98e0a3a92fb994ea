"""
Train DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie) with PyTorch DDP.

    python train.py --model DiT-S/2 --data-path /data/train                  # one process, GPU or CPU
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /imagenet/train
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 train.py ...  # 4 nodes

Official recipe, flags and results layout; exact --resume, --latent-cache, --vae none, opt-in speed options.
"""
import argparse
import glob
import json
import math
import os
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from diffusion import create_diffusion
from dit import DiT, DiT_models
from vae import load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def fail(message):
    """Stop with a clear error instead of a traceback (all ranks check the same things, so all stop)."""
    raise SystemExit(f"train.py: error: {message}")

#################################################################################
#                                      Data                                     #
#################################################################################

def find_images(root):
    """(classes, [(path, label)]) for root/<class>/**/<image>, in torchvision ImageFolder's order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    if not classes:
        fail(f"--data-path {root} is not a directory with class sub-folders; put the images in {root}/<class>/")
    samples = [(os.path.join(folder, f), label) for label, name in enumerate(classes)
               for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True))
               for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        fail(f"--data-path {root} has no images ({' '.join(IMAGE_EXTENSIONS)}) in its class folders; add some")
    return classes, samples


def center_crop_arr(pil_image, image_size):
    """ADM center crop: box-halve while the short side >= 2 * size, bicubic-resize it to size, crop the middle."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]  # (H, W, 3) uint8


class ImageFolder(Dataset):
    """Item (index, flip) -> (image (3, H, W) in [-1, 1], label); an unreadable file is named and skipped."""

    def __init__(self, samples, image_size):
        self.samples, self.image_size = samples, image_size

    def __getitem__(self, item):
        index, flip = item
        for j in range(index, index + len(self.samples)):
            path, label = self.samples[j % len(self.samples)]
            try:
                with Image.open(path) as image:
                    arr = center_crop_arr(image.convert("RGB"), self.image_size)
                break
            except Exception as e:  # the next image instead: a corrupt file must not kill a multi-day run
                print(f"train.py: warning: skipping unreadable image {path} ({e})", file=sys.stderr, flush=True)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255).sub_(0.5).div_(0.5)
        return (x.flip(-1) if flip else x), label  # ToTensor + Normalize(0.5, 0.5), bit for bit


class LatentCache(Dataset):
    """Item (index, flip) -> (VAE posterior mean and std stacked (2, C, h, w), label), from build_cache's files."""

    def __init__(self, path):
        self.path, self.latents, self.labels = path, None, np.load(os.path.join(path, "labels.npy"))

    def __getitem__(self, item):
        index, flip = item
        if self.latents is None:  # mapped lazily: each loader worker maps the file itself
            self.latents = np.load(os.path.join(self.path, "latents.npy"), mmap_mode="r")
        return torch.from_numpy(np.array(self.latents[index, flip])), int(self.labels[index])


def epoch_order(n, epoch, seed, rank, world_size):
    """This rank's (index, flip) items of an epoch: DistributedSampler's shuffle and padding, a flip bit per image."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()  # the same order as DistributedSampler(seed=seed)
    flips = torch.randint(0, 2, (n,), generator=g).tolist()  # in the data order: resumable, loader workers need no RNG
    total = math.ceil(n / world_size) * world_size
    perm = (perm * math.ceil(total / n))[:total]
    return [(i, flips[i]) for i in perm[rank:total:world_size]]


@torch.no_grad()
def to_latent(x, vae, cached):
    """Training input from a batch: pixels as they are, or a fresh posterior sample scaled by the VAE's factor."""
    if vae is None:
        return x
    z = x[:, 0] + x[:, 1] * torch.randn_like(x[:, 0]) if cached else vae.encode(x).sample()  # (N, C, h, w)
    return (z - vae.shift_factor) * vae.scaling_factor


@torch.no_grad()
def build_cache(path, meta, samples, args, vae, device, log):
    """Encode every image and its mirror once, the ranks sharing the work, into path's latents.npy and labels.npy."""
    rank, world_size, tmp = dist.get_rank(), dist.get_world_size(), path + ".tmp"
    size = args.image_size // vae.downsample_factor
    shapes = {"latents": ((len(samples), 2, 2, vae.config["latent_channels"], size, size), np.float32),
              "labels": ((len(samples),), np.int64)}  # (N, flip, mean/std, C, h, w): the posterior, not one sample, so
    if rank == 0:  # training still draws a fresh latent per step, as official. Rank 0 creates, every rank fills
        os.makedirs(tmp, exist_ok=True)
        for k, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), "w+", dtype, shape)
    dist.barrier()
    latents, labels = (np.load(os.path.join(tmp, f"{k}.npy"), mmap_mode="r+") for k in shapes)
    rows, batch = list(range(rank, len(samples), world_size)), args.global_batch_size // world_size
    loader = DataLoader(ImageFolder(samples, args.image_size), batch_size=batch, sampler=[(i, 0) for i in rows],
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    start = time.time()
    for b, (x, y) in enumerate(loader):
        posterior = vae.encode(torch.cat([x, x.flip(-1)]).to(device))  # images, then their mirrors: (2B, C, h, w)
        stats = torch.stack([posterior.mean, posterior.std], 1).float().unflatten(0, (2, -1))  # (2, B, 2, C, h, w)
        these = rows[b * batch: (b + 1) * batch]
        latents[these], labels[these] = stats.transpose(0, 1).cpu().numpy(), y.numpy()
        if rank == 0 and b % 20 == 0:
            done = min(len(samples), (b + 1) * batch * world_size)
            eta = (time.time() - start) / done * (len(samples) - done)
            print(f"latent cache: {done}/{len(samples)} images, eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
    latents.flush()
    labels.flush()
    dist.barrier()
    if rank == 0:  # meta.json last, then one rename: a cache folder is either complete or absent
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)
        log(f"Wrote latent cache {path}: {len(samples):,} images x 2 flips in {time.time() - start:.0f} s")
    dist.barrier()


@torch.no_grad()
def save_sample_grid(ema, vae, args, shape, path, device):
    """A 4x4 PNG grid of EMA samples (DDIM-50, fixed noise and classes); the training RNG is left untouched."""
    noise = torch.randn(16, *shape, generator=torch.Generator(device).manual_seed(args.global_seed), device=device)
    y = torch.arange(16, device=device) * args.num_classes // 16  # classes spread over the label range
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = create_diffusion("ddim50", learn_sigma=ema.learn_sigma).ddim_sample_loop(
            ema, noise.shape, noise=noise, clip_denoised=vae is None, model_kwargs=dict(y=y), device=device)
        x = x if vae is None else vae.decode(x / vae.scaling_factor + vae.shift_factor)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (16, 3, H, W)
    grid = x.unflatten(0, (4, 4)).permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)  # (4 * H, 4 * W, 3)
    Image.fromarray(grid.numpy()).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)

#################################################################################
#                                  Training Loop                                #
#################################################################################

def train(args, rank, world_size, device):
    """Check every input (bad input stops before any compute), then build everything and run the official loop."""
    if args.global_batch_size % world_size:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes; change it")
    if args.latent_cache and args.vae == "none":
        fail("--latent-cache needs a VAE; drop it for pixel-space training (--vae none)")
    try:
        model_kwargs = dict(json.loads(args.model_kwargs))
    except (ValueError, TypeError) as e:
        fail(f"--model-kwargs must be a JSON object such as '{{\"depth\": 4}}' ({e})")
    args.model_kwargs = json.dumps(model_kwargs, sort_keys=True)  # canonical: compared on resume
    classes, samples = find_images(args.data_path)
    if args.num_classes != 1 and len(classes) > args.num_classes:
        fail(f"--data-path has {len(classes)} class folders but --num-classes is {args.num_classes}; raise it (or 1)")
    batch = args.global_batch_size // world_size
    steps_per_epoch = len(epoch_order(len(samples), 0, 0, rank, world_size)) // batch
    if steps_per_epoch == 0:
        fail(f"{len(samples)} images do not fill one batch of {args.global_batch_size}; lower --global-batch-size")
    vae = None if args.vae == "none" else load_vae(args.vae, device=device)
    factor, patch = 1 if vae is None else vae.downsample_factor, model_kwargs.get("patch_size", int(args.model[-1]))
    if args.image_size % (factor * patch):
        fail(f"--image-size {args.image_size} is not a multiple of {factor * patch} (VAE down-sampling {factor} x "
             f"patch size {patch}); use e.g. {max(1, round(args.image_size / (factor * patch))) * factor * patch}")
    if args.latent_cache:  # what the cache depends on; one built with other values is refused
        meta = {"image_size": args.image_size, "vae": args.vae, "num_images": len(samples),
                "files": [os.path.relpath(p, args.data_path) for p, _ in samples[:: max(1, len(samples) // 1000)]]}
        meta_path = os.path.join(args.latent_cache, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f) != meta:
                    fail(f"--latent-cache {args.latent_cache} holds other images or settings; delete it or use another")
    latent_size, channels = args.image_size // factor, 3 if vae is None else vae.config["latent_channels"]
    kwargs = dict(input_size=latent_size, in_channels=channels, num_classes=args.num_classes)
    model = DiT(**{"patch_size": patch, **model_kwargs}, **kwargs) if model_kwargs else DiT_models[args.model](**kwargs)
    model.grad_checkpointing = args.grad_checkpointing
    ckpt = last_good = None
    if args.resume:  # a checkpoint file, or the latest (zero-padded step names) of an experiment folder
        found = [args.resume] if os.path.isfile(args.resume) else glob.glob(f"{args.resume}/**/*.pt", recursive=True)
        last_good = max(found, key=os.path.basename, default=args.resume)
        try:  # memory-mapped: the ranks of a node share one copy in the page cache
            ckpt = torch.load(last_good, map_location="cpu", weights_only=True, mmap=True)
            step = ckpt["step"]  # official checkpoints fail here (no training state) or above (a pickled Namespace)
        except Exception as e:
            fail(f"--resume {last_good} is not a checkpoint written by this train.py, nor a folder with one ({e!r})")
        for key in ("model", "model_kwargs", "image_size", "num_classes", "global_batch_size", "global_seed", "vae"):
            if ckpt["args"].get(key) != getattr(args, key):
                fail(f"--resume {last_good} was trained with --{key.replace('_', '-')} {ckpt['args'].get(key)}, "
                     f"not {getattr(args, key)}; pass the same value to resume")
        model.load_state_dict(ckpt["model"])

    # Experiment folder, official layout (results/NNN-DiT-XL-2/checkpoints/0050000.pt); resume continues in it:
    shared = [os.path.dirname(os.path.dirname(os.path.abspath(last_good))) if ckpt is not None else None]
    if ckpt is None and rank == 0:
        shared[0] = f"{args.results_dir}/{len(glob.glob(f'{args.results_dir}/*')):03d}-{args.model.replace('/', '-')}"
        os.makedirs(f"{shared[0]}/checkpoints", exist_ok=True)
    dist.broadcast_object_list(shared)  # the folder rank 0 picked
    experiment_dir = shared[0]

    def log(message):
        """Rank 0 logs to stdout and experiment_dir/log.txt (appended to on resume); other ranks stay quiet."""
        if rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            print(line, flush=True)
            with open(f"{experiment_dir}/log.txt", "a") as f:
                print(line, file=f)

    log(f"{'Resuming from ' + last_good if ckpt else 'New experiment ' + experiment_dir} ({world_size} processes)")
    log(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}, {model.gflops():.2f} Gflops/image")
    if args.latent_cache and not os.path.exists(meta_path):
        build_cache(args.latent_cache, meta, samples, args, vae, device, log)
    dataset = LatentCache(args.latent_cache) if args.latent_cache else ImageFolder(samples, args.image_size)
    total_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)

    # Model, EMA (a copy of rank 0's initial weights), optimizer:
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 only
    net = torch.compile(model) if args.compile else model
    net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else net
    ema = deepcopy(model).requires_grad_(False).eval()  # after DDP: it broadcast rank 0's weights
    step, epoch, start_batch = (ckpt["step"], ckpt["epoch"], ckpt["batch"]) if ckpt is not None else (0, 0, 0)
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt["world_size"] == world_size:  # every rank continues its own random streams
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        else:  # another world size: fresh streams, so the resume is not bit-exact
            torch.manual_seed((args.global_seed * world_size + rank) * 1_000_003 + step)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=model.learn_sigma)  # 1000 steps, linear betas
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model.train()  # enables label dropout for classifier-free guidance

    def model_fn(x, t, y):
        """The DiT under autocast, returning float32 so that the diffusion loss math stays float32."""
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return net(x, t, y).float()

    keys = ["loss", "mse", "vb"] if model.learn_sigma else ["loss", "mse"]
    running = torch.zeros(len(keys) + 1, device=device)  # sums of the losses + a NaN flag, kept on the device
    log_steps, start_time = 0, time.time()
    log(f"Dataset contains {len(samples):,} images in {len(classes)} classes ({args.data_path}), {steps_per_epoch:,} "
        f"steps per epoch; training from step {step} to {total_steps} in {args.precision}")
    while step < total_steps:
        order = epoch_order(len(samples), epoch, args.global_seed, rank, world_size)
        loader = DataLoader(dataset, batch_size=batch, sampler=order[start_batch * batch:], drop_last=True,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator())  # its own generator: the global RNG stays untouched
        for batch_index, (x, y) in enumerate(loader, start=start_batch):
            x = to_latent(x.to(device, non_blocking=True), vae, cached=bool(args.latent_cache))
            y = (y * 0 if args.num_classes == 1 else y).to(device, non_blocking=True)  # unconditional: class 0 (+ null)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            losses = diffusion.training_losses(model_fn, x, t, dict(y=y))
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"].mean()).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():  # EMA: ema = 0.9999 * ema + 0.0001 * param, the official arithmetic, foreach
                torch._foreach_mul_(ema_params, 0.9999)
                torch._foreach_add_(ema_params, params, alpha=1 - 0.9999)
                means = torch.stack([losses[k].mean() for k in keys])
                running += torch.cat([means, (~torch.isfinite(means).all())[None]])
            step, log_steps = step + 1, log_steps + 1
            done = step >= total_steps
            save = step % args.ckpt_every == 0 or done
            if step % args.log_every == 0 or save:  # the loop's only host sync; checked before any checkpoint
                totals, rate = running.clone(), log_steps / (time.time() - start_time)
                dist.all_reduce(totals)  # summed over ranks
                if totals[-1] > 0:  # said in log.txt too
                    log(message := f"loss is NaN/inf at step {step} or before; last good checkpoint: {last_good}")
                    fail(message + ". Resume from it with a lower --lr, or use --precision bf16/fp32 instead of fp16")
                losses_avg = (totals[:-1] / (log_steps * world_size)).tolist()
                line = (f"(step={step:07d}) " + ", ".join(f"{k} {v:.4f}" for k, v in zip(keys, losses_avg)) +
                        f" | {rate:.2f} steps/s, {rate * args.global_batch_size:.1f} img/s, "
                        f"eta {(total_steps - step) / rate / 3600:.2f} h")
                if device.type == "cuda":  # training = 3x the forward flops (backward is 2x)
                    line += (f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB, "
                             f"{3 * model.gflops() * rate * batch / 1e3:.1f} TFLOP/s per GPU")
                log(line)
                running.zero_()
                log_steps, start_time = 0, time.time()
            if save:
                rng = [None] * world_size  # every rank's generators
                cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                dist.all_gather_object(rng, {"cpu": torch.get_rng_state(), "cuda": cuda_rng})
                path = f"{experiment_dir}/checkpoints/{step:07d}.pt"
                if rank == 0:  # written to a temporary name, then renamed: a checkpoint is complete or absent
                    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                "args": vars(args), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                "step": step, "epoch": epoch, "batch": batch_index + 1, "world_size": world_size,
                                "rng": rng}, path + ".tmp")
                    os.replace(path + ".tmp", path)
                    log(f"Saved checkpoint to {path}")
                    for stale in sorted(glob.glob(f"{experiment_dir}/checkpoints/*.pt"))[:-args.keep_last]:
                        os.remove(stale)  # all but the newest --keep-last (0: [:-0] is empty, none)
                last_good = path
                dist.barrier()
            if args.sample_every and (step % args.sample_every == 0 or done) and rank == 0:
                path = f"{experiment_dir}/samples/{step:07d}.png"
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_sample_grid(ema, vae, args, (channels, latent_size, latent_size), path, device)
                log(f"Saved EMA samples to {path}")
            if done:
                break
        epoch, start_batch = epoch + 1, 0
    log("Done!")


def parse_args(argv=None):
    """The official flags with their defaults, plus resume, caching, pixel-space and speed options."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", type=str, required=True, help="image folder: one sub-folder per class")
    p.add_argument("--results-dir", type=str, default="results", help="experiment folders go here")
    p.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2", help="DiT config")
    p.add_argument("--image-size", type=int, default=256, help="pixels (square)")
    p.add_argument("--num-classes", type=int, default=1000, help="1: unconditional (class folders are ignored)")
    p.add_argument("--epochs", type=int, default=1400, help="passes over the data")
    p.add_argument("--global-batch-size", type=int, default=256, help="images per step, over all processes")
    p.add_argument("--global-seed", type=int, default=0, help="seeds data order, weights and noise")
    p.add_argument("--vae", type=str, default="ema", help="ema, mse, a HF repo id, a VAE folder or file; none: pixels")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU/process")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (and save a checkpoint)")
    p.add_argument("--resume", type=str, default=None, help="a checkpoint, or an experiment folder (its latest)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    p.add_argument("--latent-cache", type=str, default=None, help="folder of VAE posteriors, built on first use")
    p.add_argument("--sample-every", type=int, default=0, help="write a grid of EMA samples every N steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions (Ampere or newer GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--model-kwargs", type=str, default="{}", help="DiT(**JSON) instead of the --model preset")
    return p.parse_args(argv)


def main(argv=None):
    """Join the process group (torchrun's, or a group of one for plain python; or the caller's), train, leave."""
    args = parse_args(argv)
    backend, own_group = "nccl" if torch.cuda.is_available() else "gloo", not dist.is_initialized()
    if own_group:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; plain python: a group of one
        alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend, **alone)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The official script always enables TF32; here it is opt-in, so fp32 means fp32:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.global_seed * world_size + rank)  # as official: each rank its own random stream
    try:
        train(args, rank, world_size, device)
    finally:
        if own_group:  # a caller's group (train.main from a script) stays
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
