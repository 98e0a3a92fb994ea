"""
Train DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie) with PyTorch DDP.

    python train.py --model DiT-S/2 --data-path /data/train                  # one process, GPU or CPU
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /imagenet/train
    torchrun --nnodes=4 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$HOST:29500 train.py --model DiT-XL/2 --data-path /imagenet/train

The official recipe, flags, defaults and results layout (AdamW 1e-4, no weight decay, EMA 0.9999, label
dropout 0.1, 1000-step linear diffusion, ADM center crop + random flip), plus exact resume (--resume), a
latent cache (--latent-cache), pixel-space DiTs (--vae none) and opt-in speed options (--precision, --tf32,
--compile, --grad-checkpointing). Without a GPU it runs on the CPU with the gloo backend.
"""
import argparse
import glob
import json
import logging
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
    if not os.path.isdir(root):
        fail(f"--data-path {root} is not a directory; pass a folder with one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        fail(f"--data-path {root} has no class sub-folders; put the images in {root}/<class name>/ "
             "(one sub-folder for unconditional data)")
    samples = []
    for label, name in enumerate(classes):
        count = len(samples)
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if len(samples) == count:
            fail(f"class folder {os.path.join(root, name)} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                 "add some or remove the folder")
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
    """Item (index, flip) -> (image (3, H, W) in [-1, 1], label). An unreadable file is named and replaced
    by the next readable one: a corrupt image must not kill a multi-day run, nor go unnoticed."""

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
            except Exception as e:
                print(f"train.py: warning: skipping unreadable image {path} ({e})", file=sys.stderr, flush=True)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255).sub_(0.5).div_(0.5)
        return (x.flip(-1) if flip else x), label  # ToTensor + Normalize(0.5, 0.5), bit for bit


class LatentCache(Dataset):
    """Item (index, flip) -> (VAE posterior mean and std stacked (2, C, h, w), label), from build_cache's files."""

    def __init__(self, path):
        self.path, self.arrays, self.labels = path, None, np.load(os.path.join(path, "labels.npy"))

    def __getitem__(self, item):
        index, flip = item
        if self.arrays is None:  # mapped lazily: each loader worker maps the files itself
            self.arrays = [np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r") for k in ("mean", "std")]
        return torch.from_numpy(np.stack([a[index, flip] for a in self.arrays])), int(self.labels[index])


def epoch_order(n, epoch, seed, rank, world_size):
    """This rank's (index, flip) items of an epoch: DistributedSampler's shuffle and padding, one flip bit per
    image. The flips are part of the data order, so resuming restores them and loader workers need no RNG."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()  # the same order as DistributedSampler(seed=seed)
    flips = torch.randint(0, 2, (n,), generator=g).tolist()
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


def cache_meta(samples, args, vae):
    """What a latent cache depends on; a cache built with other values is refused."""
    return {"image_size": args.image_size, "vae": args.vae, "num_images": len(samples),
            "files": [os.path.relpath(p, args.data_path) for p, _ in samples[:: max(1, len(samples) // 1000)]],
            "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor}


@torch.no_grad()
def build_cache(path, samples, args, vae, device, logger):
    """Encode every image and its mirror once (ranks share the work) and store the posterior mean and std, not
    one sample, so that training still draws a fresh latent at every step as the official script does."""
    rank, world_size, tmp = dist.get_rank(), dist.get_world_size(), path + ".tmp"
    size = args.image_size // vae.downsample_factor
    shape = (len(samples), 2, vae.config["latent_channels"], size, size)  # (N, flip, C, h, w)
    shapes = {"mean": shape, "std": shape, "labels": (len(samples),)}
    if rank == 0:  # rank 0 creates the arrays, then every rank fills its rows in place
        os.makedirs(tmp, exist_ok=True)
        for k, shape in shapes.items():
            dtype = np.int64 if k == "labels" else np.float32
            np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), "w+", dtype, shape)
    dist.barrier()
    arrays = {k: np.load(os.path.join(tmp, f"{k}.npy"), mmap_mode="r+") for k in shapes}
    order, batch = [(i, 0) for i in range(rank, len(samples), world_size)], args.global_batch_size // world_size
    loader = DataLoader(ImageFolder(samples, args.image_size), batch_size=batch, sampler=order,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    start = time.time()
    for b, (x, y) in enumerate(loader):
        rows = [i for i, _ in order[b * batch: (b + 1) * batch]]
        posterior = vae.encode(torch.cat([x, x.flip(-1)]).to(device))  # images, then their mirrors: (2B, C, h, w)
        for k in ("mean", "std"):
            arrays[k][rows] = getattr(posterior, k).float().unflatten(0, (2, -1)).transpose(0, 1).cpu().numpy()
        arrays["labels"][rows] = y.numpy()
        if rank == 0 and (b % 20 == 0 or b == len(loader) - 1):
            done = min(len(samples), (b + 1) * batch * world_size)
            eta = (time.time() - start) / done * (len(samples) - done)
            print(f"latent cache: {done}/{len(samples)} images, eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
    for a in arrays.values():
        a.flush()
    dist.barrier()
    if rank == 0:  # meta.json last, then one rename: a cache folder is either complete or absent
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(cache_meta(samples, args, vae), f)
        os.replace(tmp, path)
        logger.info(f"Wrote latent cache {path}: {len(samples):,} images x 2 flips in {time.time() - start:.0f} s")
    dist.barrier()

#################################################################################
#                                Training Helpers                               #
#################################################################################

@torch.no_grad()
def update_ema(ema_params, params, decay=0.9999):
    """ema = decay * ema + (1 - decay) * param: the official arithmetic, as two foreach kernels."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def find_checkpoint(path):
    """A checkpoint file, or the latest one of an experiment folder."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "checkpoints", "*.pt")) + glob.glob(os.path.join(path, "*.pt"))
    if not found:
        fail(f"--resume {path}: not a checkpoint file, nor an experiment folder with checkpoints/*.pt")
    return max(found, key=os.path.basename)  # names are zero-padded step numbers


@torch.no_grad()
def save_sample_grid(ema, vae, args, shape, path, device, n=16):
    """A PNG grid of EMA samples (DDIM-50, fixed noise and classes); the training RNG is left untouched."""
    noise = torch.randn(n, *shape, generator=torch.Generator(device).manual_seed(args.global_seed), device=device)
    y = torch.arange(n, device=device) * args.num_classes // n  # classes spread over the label range
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        diffusion = create_diffusion("ddim50", learn_sigma=ema.learn_sigma)
        x = diffusion.ddim_sample_loop(ema, noise.shape, noise=noise, clip_denoised=vae is None,
                                       model_kwargs=dict(y=y), device=device)
        x = x if vae is None else vae.decode(x / vae.scaling_factor + vae.shift_factor)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    h, w = x.shape[1:3]
    grid = x.reshape(n // 4, 4, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(n // 4 * h, 4 * w, 3)  # 4 per row
    Image.fromarray(grid).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def create_logger(experiment_dir, rank):
    """Rank 0 logs to stdout and experiment_dir/log.txt (appended to on resume); other ranks stay quiet."""
    logger = logging.getLogger("train")
    for handler in logger.handlers[:]:  # a previous run's, when train.main runs twice in one process
        handler.close()
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in [logging.StreamHandler(sys.stdout), logging.FileHandler(f"{experiment_dir}/log.txt")] * (rank == 0):
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger

#################################################################################
#                                  Training Loop                                #
#################################################################################

def train(args, rank, world_size, device):
    """Check every input, then build data, model, EMA and optimizer and run the official loop, resumably."""
    # Bad input stops here, before any compute:
    if args.global_batch_size % world_size:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes; "
             f"use a multiple of {world_size}")
    if args.latent_cache and args.vae == "none":
        fail("--latent-cache needs a VAE; drop it for pixel-space training (--vae none)")
    try:
        model_kwargs = dict(json.loads(args.model_kwargs))
    except (ValueError, TypeError) as e:
        fail(f"--model-kwargs must be a JSON object such as '{{\"depth\": 4}}' ({e})")
    args.model_kwargs = json.dumps(model_kwargs, sort_keys=True)  # canonical: compared on resume
    classes, samples = find_images(args.data_path)
    if args.num_classes != 1 and len(classes) > args.num_classes:
        fail(f"--data-path has {len(classes)} class folders but --num-classes is {args.num_classes}; "
             f"pass --num-classes {len(classes)} (or 1 for unconditional training)")
    batch = args.global_batch_size // world_size
    steps_per_epoch = len(epoch_order(len(samples), 0, 0, rank, world_size)) // batch
    if steps_per_epoch == 0:
        fail(f"{len(samples)} images do not fill one batch of {args.global_batch_size}; lower --global-batch-size")
    vae = None if args.vae == "none" else load_vae(args.vae, device=device)
    factor, patch = 1 if vae is None else vae.downsample_factor, model_kwargs.get("patch_size", int(args.model[-1]))
    if args.image_size % (factor * patch):
        fail(f"--image-size {args.image_size} is not a multiple of {factor * patch} (VAE down-sampling {factor} x "
             f"patch size {patch}); use e.g. {max(1, round(args.image_size / (factor * patch))) * factor * patch}")
    meta_path = os.path.join(args.latent_cache or "", "meta.json")
    if args.latent_cache and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta != json.loads(json.dumps(cache_meta(samples, args, vae))):
            fail(f"--latent-cache {args.latent_cache} holds other images or settings (image size {meta['image_size']}, "
                 f"vae {meta['vae']}, {meta['num_images']} images); delete it or pass another path")
    latent_size, channels = args.image_size // factor, 3 if vae is None else vae.config["latent_channels"]
    kwargs = dict(input_size=latent_size, in_channels=channels, num_classes=args.num_classes)
    model = DiT(**{"patch_size": patch, **model_kwargs}, **kwargs) if model_kwargs else DiT_models[args.model](**kwargs)
    model.grad_checkpointing = args.grad_checkpointing
    ckpt = last_good = None
    if args.resume:
        last_good = find_checkpoint(args.resume)
        try:  # memory-mapped: the ranks of a node share one copy in the page cache
            ckpt = torch.load(last_good, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # e.g. the official train.py's checkpoints pickle args as a Namespace
            fail(f"--resume {last_good} is not a checkpoint written by this train.py ({type(e).__name__}: {e})")
        if not isinstance(ckpt, dict) or "step" not in ckpt:
            fail(f"--resume {last_good} is not a checkpoint written by this train.py (it has no training state)")
        saved = ckpt["args"]
        for key in ("model", "model_kwargs", "image_size", "num_classes", "global_batch_size", "global_seed"):
            if saved.get(key) != getattr(args, key):
                fail(f"--resume {last_good} was trained with --{key.replace('_', '-')} {saved.get(key)}, "
                     f"not {getattr(args, key)}; pass the same value to resume")
        try:
            model.load_state_dict(ckpt["model"])
        except (ValueError, RuntimeError) as e:
            fail(f"--resume {last_good}: {e}")

    # Experiment folder, official layout (results/NNN-DiT-XL-2/checkpoints/0050000.pt); resume continues in it:
    if ckpt is not None:
        experiment_dir = os.path.dirname(os.path.dirname(os.path.abspath(last_good)))
    elif rank == 0:
        os.makedirs(args.results_dir, exist_ok=True)
        index = len(glob.glob(f"{args.results_dir}/*"))
        experiment_dir = f"{args.results_dir}/{index:03d}-{args.model.replace('/', '-')}"
        os.makedirs(f"{experiment_dir}/checkpoints", exist_ok=True)
    shared = [experiment_dir if rank == 0 else None]
    dist.broadcast_object_list(shared)  # the folder rank 0 picked
    experiment_dir, logger = shared[0], create_logger(shared[0], rank)
    logger.info(f"{'Resuming from ' + last_good if ckpt else 'Experiment directory created at ' + experiment_dir}"
                f" ({world_size} processes, {device.type})")
    logger.info(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}, {model.gflops():.2f} Gflops/image")
    if args.latent_cache and not os.path.exists(meta_path):
        build_cache(args.latent_cache, samples, args, vae, device, logger)
    dataset = LatentCache(args.latent_cache) if args.latent_cache else ImageFolder(samples, args.image_size)
    total_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    logger.info(f"Dataset contains {len(samples):,} images in {len(classes)} classes ({args.data_path}), "
                f"{steps_per_epoch:,} steps per epoch")

    # Model, EMA (a copy of rank 0's initial weights), optimizer:
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 only
    net = torch.compile(model) if args.compile else model
    net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else net
    ema = deepcopy(model).requires_grad_(False).eval()  # after DDP: it broadcast rank 0's weights
    step, epoch, start_batch = 0, 0, 0
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, start_batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        if ckpt["world_size"] == world_size:  # every rank continues its own random streams
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        else:
            logger.info(f"Note: saved with {ckpt['world_size']} processes, not {world_size}: resume is not bit-exact")
            torch.manual_seed((args.global_seed * world_size + rank) * 1_000_003 + step)
        del ckpt
    params, ema_params = list(model.parameters()), list(ema.parameters())
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=model.learn_sigma)  # 1000 steps, linear betas
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model.train()  # enables label dropout for classifier-free guidance

    def model_fn(x, t, y):
        """The DiT under autocast, returning float32 so that the diffusion loss math stays float32."""
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return net(x, t, y).float()

    def all_reduce_checked():
        """Sum the running stats over ranks; any NaN/inf loss stops the run before its checkpoint is written."""
        totals = running.clone()
        dist.all_reduce(totals)
        if totals[-1] > 0:
            logger.info(f"Loss is NaN/inf at step {step} or before; stopping. Last good checkpoint: {last_good}")
            fail(f"loss is NaN/inf at step {step} or before; last good checkpoint: {last_good}. "
                 "Resume from it with a lower --lr, or use --precision bf16/fp32 instead of fp16")
        return totals

    keys = ["loss", "mse", "vb"] if model.learn_sigma else ["loss", "mse"]
    running = torch.zeros(len(keys) + 1, device=device)  # sums of the losses + a NaN flag, kept on the device
    log_steps, start_time = 0, time.time()
    logger.info(f"Training from step {step} to {total_steps} ({args.precision}{', tf32' * args.tf32}"
                f"{', compile' * args.compile}{', grad checkpointing' * args.grad_checkpointing})")
    while step < total_steps:
        if start_batch >= steps_per_epoch:
            epoch, start_batch = epoch + 1, 0
        order = epoch_order(len(samples), epoch, args.global_seed, rank, world_size)
        loader = DataLoader(dataset, batch_size=batch, sampler=order[start_batch * batch:], drop_last=True,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator())  # its own generator: the global RNG stays untouched
        for batch_index, (x, y) in enumerate(loader, start=start_batch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = to_latent(x, vae, cached=bool(args.latent_cache))
            y = torch.zeros_like(y) if args.num_classes == 1 else y  # unconditional: one class (+ the null class)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            losses = diffusion.training_losses(model_fn, x, t, dict(y=y))
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"].mean()).backward()
            scaler.step(opt)
            scaler.update()
            update_ema(ema_params, params)
            with torch.no_grad():
                means = torch.stack([losses[k].mean() for k in keys])
                running += torch.cat([means, (~torch.isfinite(means).all())[None]])
            step, log_steps = step + 1, log_steps + 1
            done = step >= total_steps

            if step % args.log_every == 0 or done:  # the loop's only host sync
                totals, seconds = all_reduce_checked(), time.time() - start_time
                losses_avg = (totals[:-1] / (log_steps * world_size)).tolist()
                rate = log_steps / seconds
                line = (f"(step={step:07d}) " + ", ".join(f"{k} {v:.4f}" for k, v in zip(keys, losses_avg)) +
                        f" | {rate:.2f} steps/s, {rate * args.global_batch_size:.1f} img/s, "
                        f"eta {(total_steps - step) / rate / 3600:.2f} h")
                if device.type == "cuda":  # training = 3x the forward flops (backward is 2x)
                    line += (f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB, "
                             f"{3 * model.gflops() * rate * batch / 1e3:.1f} TFLOP/s per GPU")
                logger.info(line)
                running.zero_()
                log_steps, start_time = 0, time.time()

            if step % args.ckpt_every == 0 or done:
                all_reduce_checked()
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
                    logger.info(f"Saved checkpoint to {path}")
                    if args.keep_last:
                        for stale in sorted(glob.glob(f"{experiment_dir}/checkpoints/*.pt"))[:-args.keep_last]:
                            os.remove(stale)
                last_good = path
                dist.barrier()

            if args.sample_every and (step % args.sample_every == 0 or done) and rank == 0:
                os.makedirs(f"{experiment_dir}/samples", exist_ok=True)
                save_sample_grid(ema, vae, args, (channels, latent_size, latent_size),
                                 f"{experiment_dir}/samples/{step:07d}.png", device)
                logger.info(f"Saved EMA samples to {experiment_dir}/samples/{step:07d}.png")
            if done:
                break
        start_batch = steps_per_epoch
    logger.info("Done!")


def parse_args(argv=None):
    """The official flags with their defaults, plus resume, caching, pixel-space and speed options."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--model-kwargs", type=str, default="{}",
                   help="build DiT(**JSON) instead of the --model preset (patch size from --model unless given), "
                        "e.g. '{\"depth\": 2, \"hidden_size\": 64, \"num_heads\": 2}' for quick experiments")
    args = p.parse_args(argv)
    for name in ("image_size", "num_classes", "epochs", "global_batch_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    """Join the process group (torchrun's, or a group of one for plain python; or the caller's), train, leave."""
    args = parse_args(argv)
    backend, own_group = "nccl" if torch.cuda.is_available() else "gloo", not dist.is_initialized()
    if own_group and "RANK" in os.environ:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        dist.init_process_group(backend)
    elif own_group:  # plain python: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
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
