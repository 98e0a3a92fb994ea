"""
Train DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie) with PyTorch DDP.

    python train.py --model DiT-S/2 --data-path /data/train        # one process, GPU or CPU
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /imagenet/train

The official recipe, flags and results layout; plus exact --resume (also after SIGTERM), a latent
cache, pixel-space models (--vae none), mixed precision, sample grids and FID while training.
The file reads in the order it runs: main, parse_args, train (the story), then each of its steps.
"""
import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

import fid
import sample
from sample import Help, count, number
from diffusion import create_diffusion, print_progress
from dit import PRETRAINED, DiT_models, create_dit, load_checkpoint, load_pretrained
from vae import load_vae

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# set by SIGTERM, what cluster schedulers send before they stop a job: save, then exit
PREEMPTED = threading.Event()

def fail(message):
    """Stop with one clear line instead of a traceback (every rank checks the same things)."""
    raise SystemExit(f"train.py: error: {message}")

#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    """Join the process group (torchrun's, a group of one, or the caller's), train, leave."""
    args = parse_args(argv)
    own_group = not dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if own_group:
        # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; plain python: one process
        alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend, **alone)
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # The official script always enables TF32; here it is opt-in, so fp32 means fp32:
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    # as official: each rank its own random stream
    torch.manual_seed(args.global_seed * world_size + rank)
    PREEMPTED.clear()
    old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: PREEMPTED.set())
    try:
        train(args, rank, world_size, device)
    except (OSError, ValueError) as e:
        # a failed download, a corrupt file: one line that says what to do
        fail(str(e))
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        # DDP's reducer sits in a reference cycle and holds the group: freed first, or gloo may
        # abort the process at exit ("terminate called without an active exception")
        gc.collect()
        if own_group:
            dist.destroy_process_group()

def parse_args(argv=None):
    """The official flags and defaults, plus resume, caching, speed and monitoring flags."""
    p = argparse.ArgumentParser(prog="train.py", description="Train a class-conditional DiT "
                                "with DDP.", epilog=EXAMPLES, formatter_class=Help)
    p.add_argument("--data-path", required=True, help="folder of <class>/<images>")
    p.add_argument("--results-dir", default="results", help="experiments go here")
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument("--image-size", type=count(1), default=256, help="pixels (square)")
    p.add_argument("--num-classes", type=count(1), default=1000, help="1: unconditional")
    p.add_argument("--epochs", type=count(1), default=1400, help="passes over the data")
    p.add_argument("--global-batch-size", type=count(1), default=256, help="over all processes")
    p.add_argument("--global-seed", type=int, default=0, help="data order, weights, noise")
    p.add_argument("--vae", default="ema", help="ema, mse, repo id, folder, file; none")
    p.add_argument("--num-workers", type=count(0), help="default: 4 on GPUs, 0 on CPUs")
    p.add_argument("--log-every", type=count(1), default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=count(1), default=50_000, help="steps between checkpoints")
    p.add_argument("--lr", type=number(0, math.inf), help="default: 1e-4, or the resumed run's")
    p.add_argument("--ema-decay", type=number(0, 1), default=0.9999, help="short runs: 0.999")
    p.add_argument("--max-steps", type=count(1), help="stop (and save) at this step")
    p.add_argument("--resume", help="a checkpoint, or an experiment folder (its last)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune: a new run from a checkpoint's weights, or DiT-XL-2-256x256.pt")
    p.add_argument("--init-classes", type=count(0), nargs="+", metavar="OLD",
                   help="new class i starts from --init-from's class OLD_i")
    p.add_argument("--keep-last", type=count(0), default=0, help="keep the newest N (0: all)")
    p.add_argument("--latent-cache", help="folder of the data's VAE latents (made once)")
    p.add_argument("--sample-every", type=count(0), default=0, help="EMA sample grid every N steps")
    p.add_argument("--precision", choices=list(AMP), default="fp32", help="autocast dtype")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions on GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="less memory, more compute")
    p.add_argument("--model-kwargs", default="{}", help="JSON: DiT arguments over --model")
    p.add_argument("--fid-every", type=count(0), default=0, help="FID and IS every N steps, at end")
    p.add_argument("--fid-ref", help="FID reference: ADM .npz, stats .npz, images")
    p.add_argument("--fid-num-samples", type=count(2), default=10_000, help="EMA samples per FID")
    p.add_argument("--fid-steps", type=count(1), default=50, help="DDIM steps of the FID samples")
    p.add_argument("--fid-cfg-scale", type=number(0, math.inf), default=1.0, help="1: unguided")
    p.add_argument("--fid-inception", help="weights file (default: fid.py's download)")
    return p.parse_args(argv)

EXAMPLES = """examples:
  python train.py --model DiT-XL/2 --data-path /imagenet/train --precision bf16 --tf32
  torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /imagenet/train \\
      --fid-every 50000 --fid-ref VIRTUAL_imagenet256_labeled.npz
  python train.py --model DiT-S/2 --vae none --image-size 8 --num-classes 10 \\
      --data-path digits --ema-decay 0.99 --max-steps 1500 --sample-every 500
  torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --data-path mine --num-classes 3 \\
      --init-from DiT-XL-2-256x256.pt --init-classes 207 360 387 --precision bf16"""

#################################################################################
#                                 Training Loop                                 #
#################################################################################

def train(args, rank, world_size, device):
    """Check the inputs, set up model, data and optimizer, then run the official loop."""
    # Check the inputs before anything is downloaded or computed:
    classes, samples = check_args(args, world_size)
    ckpt = load_resume(args, classes) if args.resume else None
    last_good = ckpt["path"] if ckpt else None
    if args.lr is None:
        # the official 1e-4, or the resumed run's
        args.lr = ckpt["args"]["lr"] if ckpt else 1e-4

    # Create model (before any folder is made: an image size the model cannot take stops here):
    vae = None if args.vae == "none" else load_vae(args.vae, device=device)
    model = sample.build_model(args, vae)
    model.grad_checkpointing = args.grad_checkpointing
    if ckpt:
        model.load_state_dict(ckpt["model"])
    # fine-tuning: the weights of --init-from that fit this model; the rest as DiT initializes it
    loaded = init_from(args, model, rank) if args.init_from else None
    model.to(device)
    net = model
    if world_size > 1:
        # DDP broadcasts rank 0's weights: every rank starts from the same model
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    # Note that parameter initialization is done within the DiT constructor
    ema = deepcopy(model).requires_grad_(False).eval()
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=model.learn_sigma)

    # Setup data:
    dataset = build_dataset(args, samples, vae, device)
    steps_per_epoch = math.ceil(len(samples) / world_size) // (args.global_batch_size // world_size)
    total_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)

    # Setup an experiment folder:
    experiment_dir = experiment_folder(args, last_good, rank)
    log = create_logger(experiment_dir, rank)
    log(f"Resuming from {last_good}" if ckpt else f"New experiment {experiment_dir}")
    if loaded:
        log(loaded)
    log(describe_classes(classes))

    # Setup optimizer (the official: AdamW, constant lr, no weight decay) and loss scaler:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0,
                            fused=device.type in ("cuda", "cpu"))
    # fp16 needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if ckpt:
        restore_training_state(ckpt, ema, opt, scaler=scaler, log=log)

    # Setup FID monitoring: Inception on every rank, the reference statistics on rank 0
    inception = None
    reference = None
    if args.fid_every:
        # rank 0 first: it downloads the weights, the other ranks then find them in the cache
        if rank > 0:
            dist.barrier()
        inception = fid.load_inception(args.fid_inception, device)
        if rank == 0:
            reference = fid.reference(args.fid_ref, inception, 50)[0]
            dist.barrier()

    # Restore every rank's random streams last, so that nothing above draws from them:
    if ckpt:
        restore_random_state(ckpt, args, rank, device)
    step = ckpt["step"] if ckpt else 0
    epoch = ckpt["epoch"] if ckpt else 0
    start_batch = ckpt["batch"] if ckpt else 0
    ctx = torch.autocast(device.type, dtype=AMP[args.precision], enabled=args.precision != "fp32")
    # a gloo group for the preemption flag: checked every step without a device sync
    stop_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    log(f"{len(samples):,} images in {len(classes)} classes, {model.gflops():.2f} Gflops/image DiT "
        f"of {sum(p.numel() for p in model.parameters()):,} parameters; steps {step} to "
        f"{total_steps} in {args.precision}, {world_size} process(es), lr {args.lr}")

    # Important: train mode enables the label dropout that classifier-free guidance needs
    model.train()
    keys = ["loss", "mse", "vb"] if model.learn_sigma else ["loss", "mse"]
    # the losses summed on the device: the loop syncs with the host only to log
    running = torch.zeros(len(keys), device=device)
    log_steps = 0
    start_time = time.time()
    while step < total_steps:
        items = epoch_order(len(samples), epoch, args.global_seed, rank=rank,
                            world_size=world_size)
        skip = start_batch * (args.global_batch_size // world_size)
        loader = data_loader(dataset, items[skip:], args, device)
        for batch_index, (x, y) in enumerate(loader, start=start_batch):
            x = to_latent(x.to(device, non_blocking=True), vae, cached=bool(args.latent_cache))
            y = y.to(device, non_blocking=True)
            if args.num_classes == 1:
                # unconditional: every image is class 0 (row 1 of the label table is the null)
                y = torch.zeros_like(y)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            # Forward and loss under autocast (bf16/fp16 matmuls, float32 loss math):
            with ctx:
                loss_dict = diffusion.training_losses(net, x, t, dict(y=y))
            loss = loss_dict["loss"].mean()
            # Backward and optimizer step, then the EMA:
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, args.ema_decay)

            # Log loss values (a NaN or inf stays in the sum until the next log line):
            running += torch.stack([loss_dict[k].mean() for k in keys]).detach()
            log_steps += 1
            step += 1
            done = step >= total_steps
            # a SIGTERM on any rank: every rank saves at this same step, then stops
            preempted = preemption_requested(stop_group)
            save = step % args.ckpt_every == 0 or done or preempted
            if step % args.log_every == 0 or save:
                losses = mean_over_ranks(running, keys, log_steps)
                # before a checkpoint is written: a NaN loss stops the run here
                if not all(math.isfinite(value) for value in losses.values()):
                    log(f"loss is NaN/inf at step {step} or before")
                    fail(f"loss is NaN/inf at step {step} or before; resume from the last good "
                         f"checkpoint {last_good} with a lower --lr (or bf16 instead of fp16)")
                steps_per_sec = log_steps / (time.time() - start_time)
                metrics = {"step": step, **losses, "steps_per_sec": steps_per_sec,
                           "img_per_sec": steps_per_sec * args.global_batch_size}
                log_losses(log, metrics, total_steps, model)
                running.zero_()
                log_steps = 0
                start_time = time.time()

            # Save DiT checkpoint:
            if save:
                checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(),
                              "opt": opt.state_dict(), "args": vars(args), "config": model.config,
                              "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                              "classes": classes, "step": step, "epoch": epoch,
                              "batch": batch_index + 1, "world_size": world_size,
                              "rng": gather_random_states(device)}
                last_good = save_checkpoint(checkpoint, experiment_dir, args.keep_last)
                log(f"Saved checkpoint to {last_good}")
            if preempted:
                log(f"Stopped by SIGTERM at step {step}; continue with --resume {experiment_dir}")
                dist.barrier()
                return

            # Monitor: EMA sample grids and FID
            if args.sample_every and (step % args.sample_every == 0 or done) and rank == 0:
                path = f"{experiment_dir}/samples/{step:07d}.png"
                save_sample_grid(ema, vae, args, path)
                log(f"Saved EMA samples to {path}")
            if args.fid_every and (step % args.fid_every == 0 or done):
                metrics = evaluate_fid(ema, vae, args, inception=inception, reference=reference)
                if rank == 0:
                    log(f"(step={step:07d}) FID {metrics['fid']:.4f}, IS {metrics['is']:.4f} "
                        f"({args.fid_num_samples} EMA samples, DDIM-{args.fid_steps})",
                        {"step": step, **metrics})
            if done:
                break
        epoch += 1
        start_batch = 0
    log("Done!")
    # every rank done before the process group goes (gloo aborts if one leaves too early)
    dist.barrier()

#################################################################################
#                           Setup: inputs and classes                           #
#################################################################################

def check_args(args, world_size):
    """Check the inputs before anything is downloaded or computed -> (classes, samples)."""
    if args.global_batch_size % world_size:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} "
             f"processes; use a multiple of {world_size}")
    if args.latent_cache and args.vae == "none":
        fail("--latent-cache needs a VAE; drop it for pixel-space training (--vae none)")
    check_model_kwargs(args)
    if not os.path.isdir(args.data_path):
        fail(f"--data-path {args.data_path} is not a folder; put the images in <it>/<class>/")
    classes, samples = find_images(args.data_path)
    if not samples:
        fail(f"--data-path {args.data_path} has no images ({' '.join(fid.IMAGE_EXTENSIONS)}) "
             "in class sub-folders; put them in <data-path>/<class>/")
    if args.num_classes != 1 and len(classes) > args.num_classes:
        fail(f"--data-path has {len(classes)} class folders but --num-classes is "
             f"{args.num_classes}; raise it (or use 1: unconditional)")
    if math.ceil(len(samples) / world_size) < args.global_batch_size // world_size:
        fail(f"{len(samples)} images do not fill a batch of {args.global_batch_size}; lower "
             "--global-batch-size")
    if not any(read_image(path, args.image_size) is not None for path, _ in samples):
        fail(f"none of the {len(samples)} images in --data-path can be read")
    if args.init_from and args.resume:
        fail("--init-from starts a new run and --resume continues one; give only one of them")
    if args.init_classes and len(args.init_classes) != args.num_classes:
        fail(f"--init-classes gives {len(args.init_classes)} old classes for --num-classes "
             f"{args.num_classes}; give one per new class (or leave it out: new label rows)")
    if args.init_classes and not args.init_from:
        fail("--init-classes picks rows of --init-from's label table; give --init-from too")
    official = args.init_from in PRETRAINED
    if args.init_from and not official and not os.path.isfile(args.init_from):
        fail(f"--init-from {args.init_from} is not a file; give a checkpoint, a state dict or one "
             f"of {', '.join(PRETRAINED)}")
    if args.resume and not os.path.exists(args.resume):
        fail(f"--resume {args.resume} does not exist; give a checkpoint or an experiment folder")
    if args.fid_every and not (args.fid_ref and os.path.exists(args.fid_ref)):
        fail(f"--fid-ref {args.fid_ref} does not exist; --fid-every needs an ADM .npz, a "
             "fid.py --save-stats .npz or an image folder")
    if args.fid_every and args.fid_inception and not os.path.isfile(args.fid_inception):
        fail(f"--fid-inception {args.fid_inception} is not a file")
    try:
        create_diffusion(f"ddim{args.fid_steps}")
    except ValueError as e:
        fail(f"--fid-steps {args.fid_steps}: {e}")
    return classes, samples

def check_model_kwargs(args):
    """Refuse unknown DiT arguments, bad head counts or block designs; store them canonically."""
    try:
        kwargs = json.loads(args.model_kwargs)
        # Built on the meta device (no memory, no compute) at the smallest input the patch size
        # fits: only the arguments are checked, not the image size (check_args does that later).
        with torch.device("meta"):
            create_dit(args.model, **{**kwargs, "input_size": kwargs.get("patch_size", 8)})
    except (ValueError, TypeError) as e:
        fail(f"--model-kwargs {args.model_kwargs} is not a JSON object of DiT arguments ({e}); "
             "e.g. '{\"depth\": 4}'")
    # canonical, so that --resume compares the arguments, not their spelling
    args.model_kwargs = json.dumps(kwargs, sort_keys=True)

def class_order(names):
    """Class folders in label order: sorted as torchvision's ImageFolder, numbers as numbers."""
    # folders 0..10 get labels 0..10 (by name they would be 0, 1, 10, 2, ...)
    if names and all(name.isdigit() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)

def find_images(root):
    """(classes, [(path, label)]) of the regular files root/<class>/**/<image>, in label order."""
    classes = class_order([e.name for e in os.scandir(root) if e.is_dir()])
    samples = []
    tops = {os.path.realpath(os.path.join(root, name)) for name in classes}
    seen = {os.path.realpath(root)}
    for label, name in enumerate(classes):
        top = os.path.join(root, name)
        found = []
        for folder, subfolders, files in os.walk(top, followlinks=True):
            # Links are followed, but a real folder is entered once (a loop would repeat its
            # images), and a class folder only as its own class.
            real = os.path.realpath(folder)
            if real in seen or (folder != top and real in tops):
                subfolders.clear()
                continue
            seen.add(real)
            for f in files:
                # regular files only: reading a named pipe would wait forever
                if f.lower().endswith(fid.IMAGE_EXTENSIONS) and os.path.isfile(f"{folder}/{f}"):
                    found.append((folder, f))
        # sorted by folder, then by file name
        samples += [(os.path.join(folder, f), label) for folder, f in sorted(found)]
    return classes, samples

def describe_classes(classes):
    """The class-to-label mapping, as one log line (every checkpoint stores it whole)."""
    pairs = [f"{label}={name}" for label, name in enumerate(classes)]
    return "Class labels: " + ", ".join(pairs if len(pairs) <= 12 else [*pairs[:10], "..."])

def center_crop_arr(pil_image, image_size):
    """ADM center crop: box-halve while the short side >= 2 * size, bicubic to size, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    size = tuple(round(s * scale) for s in pil_image.size)
    arr = np.asarray(pil_image.resize(size, resample=Image.BICUBIC))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]  # (H, W, 3) uint8

WARNED = set()

def read_image(path, image_size):
    """The center crop of an image file, uint8 (H, W, 3); None, with a warning, if unreadable."""
    try:
        with warnings.catch_warnings():
            # large photos train as well as small ones (they are downscaled); PIL still refuses
            # images over twice its limit as decompression bombs
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return center_crop_arr(fid.to_rgb(image), image_size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # once per file and process, not once per epoch
        if path not in WARNED:
            WARNED.add(path)
            print(f"train.py: warning: skipping unreadable image {path} ({e})", file=sys.stderr)
        return None

#################################################################################
#                          Setup: resume and experiment                         #
#################################################################################

def load_resume(args, classes):
    """The checkpoint to resume (a file, or an experiment's highest step), checked against args."""
    path = args.resume
    if os.path.isdir(path):
        path = last_checkpoint(path)
    # memory-mapped: the ranks of a node share one copy in the page cache
    ckpt = load_checkpoint(path)
    needed = {"model", "ema", "opt", "args", "step", "epoch", "batch", "rng", "world_size"}
    if not (isinstance(ckpt, dict) and needed <= ckpt.keys() and isinstance(ckpt["args"], dict)):
        fail(f"--resume {path} is not a checkpoint written by this train.py (it lacks the "
             "training state); to start from its weights, use --init-from")
    for key in ("model", "model_kwargs", "image_size", "num_classes", "global_batch_size",
                "global_seed", "vae"):
        if ckpt["args"].get(key) != getattr(args, key):
            fail(f"--resume {path} was trained with --{key.replace('_', '-')} "
                 f"{ckpt['args'].get(key)!r}, not {getattr(args, key)!r}; pass the same value")
    # older checkpoints did not store the classes
    if ckpt.get("classes", classes) != classes:
        fail(f"--resume {path} was trained on the classes {ckpt['classes'][:5]}..., not the "
             f"{classes[:5]}... of --data-path; pass the data it was trained on")
    ckpt["path"] = path
    return ckpt

def init_from(args, model, rank):
    """Load --init-from's weights (a train.py run: its EMA) into the new model -> a log line."""
    # rank 0 first: it downloads an official checkpoint, the other ranks then find it cached
    if rank > 0:
        dist.barrier()
    try:
        ckpt = load_checkpoint(args.init_from)
        # a train.py checkpoint: its EMA, and its config (class count, null row, heads)
        config = ckpt.get("config") if "ema" in ckpt else None
        report = load_pretrained(model, ckpt.get("ema", ckpt), args.init_classes, config)
    except (OSError, ValueError) as e:
        fail(f"--init-from {args.init_from}: {e}")
    finally:
        if rank == 0:
            dist.barrier()
    return f"Initialized from {args.init_from}: {report}"

def checkpoint_steps(folder):
    """{step: path} of the step-numbered checkpoints (0001000.pt) in a folder."""
    if not os.path.isdir(folder):
        return {}
    names = [name for name in os.listdir(folder) if re.fullmatch(r"\d+\.pt", name)]
    return {int(name[:-3]): os.path.join(folder, name) for name in names}

def last_checkpoint(folder):
    """The highest-step checkpoint of an experiment folder (or of its checkpoints/ folder)."""
    steps = checkpoint_steps(os.path.join(folder, "checkpoints")) or checkpoint_steps(folder)
    if not steps:
        fail(f"--resume {folder} holds no step-numbered checkpoint (checkpoints/0001000.pt); "
             "give a checkpoint file")
    return steps[max(steps)]

def experiment_folder(args, resume_path, rank):
    """The run's folder: the resumed checkpoint's experiment, else a new results/NNN-<model>."""
    checkpoints = os.path.dirname(os.path.abspath(resume_path or "."))
    if resume_path and os.path.basename(checkpoints) == "checkpoints":
        if rank == 0:
            sample.remove_dead_writers_files(checkpoints)
        return os.path.dirname(checkpoints)
    # a new folder in the official layout (also for a checkpoint kept elsewhere)
    shared = [None]
    if rank == 0:
        shared[0] = new_experiment_folder(args.results_dir, args.model.replace("/", "-"))
    dist.broadcast_object_list(shared)
    return shared[0]

def new_experiment_folder(results_dir, name):
    """Make results_dir/NNN-name with the next free number (atomic: two runs never share one)."""
    os.makedirs(results_dir, exist_ok=True)
    while True:
        numbers = [int(m[1]) for n in os.listdir(results_dir) if (m := re.match(r"(\d+)-", n))]
        path = f"{results_dir}/{max(numbers, default=-1) + 1:03d}-{name}"
        # mkdir fails if another run made the same folder first: then take the next number
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            os.mkdir(f"{path}/checkpoints")
            return path

def create_logger(experiment_dir, rank):
    """log(message, metrics): rank 0 prints and appends to log.txt, metrics to metrics.jsonl."""
    jsonl = f"{experiment_dir}/metrics.jsonl"
    if rank == 0 and os.path.exists(jsonl):
        # a line cut by a crash (a full disk) is dropped: one JSON object per line
        with open(jsonl, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)

    def log(message, metrics=None):
        if rank != 0:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(f"{experiment_dir}/log.txt", "a") as f:
            f.write(line + "\n")
        if metrics is not None:
            with open(jsonl, "a") as f:
                f.write(json.dumps(metrics) + "\n")
    return log

def restore_training_state(ckpt, ema, opt, scaler, log):
    """Load the EMA, optimizer and loss scaler of a checkpoint; a new --lr replaces its lr."""
    ema.load_state_dict(ckpt["ema"])
    lr = opt.param_groups[0]["lr"]
    opt.load_state_dict(ckpt["opt"])
    old_lr = opt.param_groups[0]["lr"]
    if lr != old_lr:
        log(f"--lr {lr} replaces the checkpoint's {old_lr}")
        for group in opt.param_groups:
            group["lr"] = lr
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])

def restore_random_state(ckpt, args, rank, device):
    """Every rank continues its own random streams (exact), or new ones for another world size."""
    world_size = dist.get_world_size()
    if ckpt["world_size"] != world_size:
        # another number of processes: fresh streams, so the resume is not bit-exact
        torch.manual_seed((args.global_seed * world_size + rank) * 1_000_003 + ckpt["step"])
        return
    torch.set_rng_state(ckpt["rng"][rank]["cpu"])
    if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)

#################################################################################
#                                  Setup: data                                  #
#################################################################################

def build_dataset(args, samples, vae, device):
    """The training images, or their VAE posteriors from --latent-cache (built on first use)."""
    if not args.latent_cache:
        return ImageFolder(samples, args.image_size)
    meta = cache_meta(args, samples, vae)
    if not os.path.exists(f"{args.latent_cache}/meta.json"):
        build_cache(args, samples, vae, meta)
    return LatentCache(args.latent_cache, meta)

class ImageFolder(Dataset):
    """Item (index, flip) -> (image (3, H, W) in [-1, 1], label); unreadable files are skipped."""
    def __init__(self, samples, image_size):
        self.samples = samples
        self.image_size = image_size

    def __getitem__(self, item):
        index, flip = item
        # a corrupt file must not end a multi-day run: the next readable image stands in
        for j in range(index, index + len(self.samples)):
            path, label = self.samples[j % len(self.samples)]
            arr = read_image(path, self.image_size)
            if arr is not None:
                break
        else:
            raise OSError(f"none of the {len(self.samples)} images can be read any more")
        # ToTensor + Normalize(0.5, 0.5), bit for bit
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255).sub_(0.5).div_(0.5)
        return (x.flip(-1) if flip else x), label

def cache_meta(args, samples, vae):
    """What a latent cache depends on: every image (name, label, size, time), the VAE, the size."""
    files = hashlib.sha256()
    for path, label in samples:
        stat = os.stat(path)
        name = os.path.relpath(path, args.data_path)
        files.update(f"{name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    size = args.image_size // vae.downsample_factor
    meta = dict(image_size=args.image_size, vae=args.vae, vae_config=vae.config,
                latent_shape=[vae.config["latent_channels"], size, size],
                num_images=len(samples), files_sha256=files.hexdigest())
    # as meta.json reads back (tuples become lists)
    return json.loads(json.dumps(meta))

@torch.no_grad()
def build_cache(args, samples, vae, meta):
    """Encode every image and its mirror once, the ranks sharing the work, into --latent-cache."""
    rank = dist.get_rank()
    device = next(vae.parameters()).device
    tmp = f"{args.latent_cache}.tmp"
    # the posterior's mean and std, not a sample: training still draws a fresh latent per step
    shape = (len(samples), 2, 2, *meta["latent_shape"])  # (N, flip, 2, C, h, w)
    if rank == 0:
        os.makedirs(tmp, exist_ok=True)
        np.lib.format.open_memmap(f"{tmp}/latents.npy", "w+", np.float32, shape)
        np.lib.format.open_memmap(f"{tmp}/labels.npy", "w+", np.int64, (len(samples),))
    dist.barrier()
    latents = np.load(f"{tmp}/latents.npy", mmap_mode="r+")
    labels = np.load(f"{tmp}/labels.npy", mmap_mode="r+")
    rows = list(range(rank, len(samples), dist.get_world_size()))
    images = ImageFolder(samples, args.image_size)
    loader = data_loader(images, [(i, 0) for i in rows], args, device, drop_last=False)
    start = time.time()
    for b, (x, y) in enumerate(loader):
        # the images, then their mirrors
        posterior = vae.encode(torch.cat([x, x.flip(-1)]).to(device))
        stats = torch.stack([posterior.mean, posterior.std], 1).float()  # (2B, 2, C, h, w)
        these = rows[b * loader.batch_size: (b + 1) * loader.batch_size]
        latents[these] = stats.unflatten(0, (2, -1)).transpose(0, 1).cpu().numpy()
        labels[these] = y.numpy()
        if rank == 0:
            print_progress("latent cache: batches", b + 1, len(loader), start)
    latents.flush()
    labels.flush()
    dist.barrier()
    if rank == 0:
        # meta.json last, then one rename: a cache folder is either complete or absent
        with open(f"{tmp}/meta.json", "w") as f:
            json.dump(meta, f)
        os.replace(tmp, args.latent_cache)
        print(f"Wrote latent cache {args.latent_cache}: {len(samples):,} images and mirrors")
    dist.barrier()

class LatentCache(Dataset):
    """Item (index, flip) -> (VAE posterior mean and std (2, C, h, w), label), from build_cache."""
    def __init__(self, path, meta):
        self.path = path
        self.latents = None
        with open(f"{path}/meta.json") as f:
            built = json.load(f)
        differ = sorted(k for k in set(built) | set(meta) if built.get(k) != meta.get(k))
        try:
            shape = np.load(f"{path}/latents.npy", mmap_mode="r").shape
            self.labels = np.load(f"{path}/labels.npy")
        except (OSError, ValueError) as e:
            differ.append(f"files ({e})")
        if differ or shape != (len(self.labels), 2, 2, *meta["latent_shape"]):
            raise ValueError(f"--latent-cache {path} was built for other {', '.join(differ)} "
                             "(images, VAE, size or files); delete it (it is rebuilt) or use "
                             "another folder")

    def __getitem__(self, item):
        index, flip = item
        if self.latents is None:
            # mapped lazily: each loader worker maps the file itself
            self.latents = np.load(os.path.join(self.path, "latents.npy"), mmap_mode="r")
        return torch.from_numpy(np.array(self.latents[index, flip])), int(self.labels[index])

#################################################################################
#                               Steps of the loop                               #
#################################################################################

def epoch_order(n, epoch, seed, rank, world_size):
    """This rank's (index, flip) items of an epoch: DistributedSampler's order, a flip per image."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    # flips in the data order: resumable, and loader workers need no random state
    flips = torch.randint(0, 2, (n,), generator=g).tolist()
    # padded to a multiple of world_size, as DistributedSampler(seed=seed) does
    total = math.ceil(n / world_size) * world_size
    perm = (perm * math.ceil(total / n))[:total]
    return [(i, flips[i]) for i in perm[rank:total:world_size]]

def data_loader(dataset, items, args, device, drop_last=True):
    """Batches of dataset items; no loader processes by default on the CPU (they slow training)."""
    workers = args.num_workers if args.num_workers is not None else 4 * (device.type == "cuda")
    # its own generator: the global random state stays untouched
    return DataLoader(dataset, batch_size=args.global_batch_size // dist.get_world_size(),
                      sampler=items, num_workers=workers, pin_memory=device.type == "cuda",
                      drop_last=drop_last, generator=torch.Generator(),
                      worker_init_fn=ignore_sigterm)

def ignore_sigterm(worker_id):
    """Loader processes outlive a SIGTERM sent to the whole job (Slurm): the run saves first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

@torch.no_grad()
def to_latent(x, vae, cached):
    """The DiT's input for a batch: pixels as they are, or a fresh latent sample, scaled."""
    if vae is None:
        return x
    # a fresh draw from the posterior: mean + std * eps from the cache, or from an encoding
    z = x[:, 0] + x[:, 1] * torch.randn_like(x[:, 0]) if cached else vae.encode(x).sample()
    return (z - vae.shift_factor) * vae.scaling_factor

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, the official arithmetic (with foreach kernels)."""
    ema_params = list(ema.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, list(model.parameters()), alpha=1 - decay)

def preemption_requested(group):
    """Whether any rank got SIGTERM: every rank asks at every step, so all stop at the same one."""
    flag = torch.tensor([float(PREEMPTED.is_set())])
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())

def mean_over_ranks(running, keys, log_steps):
    """{loss name: mean over the steps since the last log line and over the ranks}."""
    totals = running.clone()
    dist.all_reduce(totals)
    means = (totals / (log_steps * dist.get_world_size())).tolist()
    return dict(zip(keys, means))

def log_losses(log, metrics, total_steps, model):
    """Log losses, speed and ETA (and metrics to metrics.jsonl); on a GPU, TFLOP/s and memory."""
    step = metrics["step"]
    speed = metrics["steps_per_sec"]
    losses = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "mse", "vb") if k in metrics)
    left = round((total_steps - step) / speed)
    line = (f"(step={step:07d}) {losses} | {speed:.2f} steps/s, {metrics['img_per_sec']:.1f} "
            f"img/s, ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
    device = next(model.parameters()).device
    if device.type == "cuda":
        # training = 3x the forward flops (the backward pass is 2x), 2 flops a multiply-add
        metrics["tflops"] = 3 * 2 * model.gflops() * metrics["img_per_sec"] / 1e3
        metrics["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f" | peak {metrics['peak_gib']:.1f} GiB, {metrics['tflops']:.1f} TFLOP/s"
    log(line, metrics)

def gather_random_states(device):
    """Every rank's random state (CPU, CUDA): a resume continues each stream exactly."""
    states = [None] * dist.get_world_size()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    dist.all_gather_object(states, {"cpu": torch.get_rng_state(), "cuda": cuda})
    return states

def save_checkpoint(checkpoint, experiment_dir, keep_last):
    """Rank 0 writes checkpoints/<step>.pt atomically and prunes older ones -> its path."""
    folder = f"{experiment_dir}/checkpoints"
    path = f"{folder}/{checkpoint['step']:07d}.pt"
    error = [None]
    if dist.get_rank() == 0:
        try:
            sample.atomic_write(path, lambda f: torch.save(checkpoint, f))
            if keep_last > 0:
                prune_checkpoints(folder, checkpoint["step"], keep_last)
        except (OSError, RuntimeError) as e:
            # model, EMA and AdamW's two moments: 16 bytes per parameter
            need = 16 * sum(p.numel() for p in checkpoint["model"].values()) / 2**20
            error[0] = (f"could not save {path} ({str(e).splitlines()[0]}); it needs about "
                        f"{need:,.0f} MiB: free some space, then --resume from the last checkpoint")
    # every rank learns whether it worked, so that all stop together
    dist.broadcast_object_list(error)
    if error[0] is not None:
        fail(error[0])
    return path

def prune_checkpoints(folder, step, keep_last):
    """Keep the newest keep_last of this run's checkpoints up to step; never touch later ones."""
    # later steps belong to a run resumed from an older checkpoint: not this run's to delete
    steps = sorted(s for s in checkpoint_steps(folder) if s <= step)
    for old in steps[:-keep_last]:
        os.remove(checkpoint_steps(folder)[old])

@torch.no_grad()
def save_sample_grid(ema, vae, args, path):
    """A 4x4 PNG grid of EMA samples (fixed noise and labels); the training RNG is untouched."""
    device = next(ema.parameters()).device
    size = ema.config["input_size"]
    generator = torch.Generator(device).manual_seed(args.global_seed)
    z = torch.randn(16, ema.in_channels, size, size, generator=generator, device=device)
    y = torch.tensor(sample.default_labels(args.num_classes, 16), device=device)
    loop = sample.sampling_loop("ddim", 50)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = sample.sample(ema, loop, z, y, clip_denoised=vae is None)
        grid = sample.make_grid(sample.to_uint8(sample.decode(vae, x)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sample.atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))

@torch.no_grad()
def evaluate_fid(ema, vae, args, inception, reference):
    """FID and Inception Score of the EMA's samples (all ranks sample) -> dict on rank 0."""
    world_size = dist.get_world_size()
    features = []
    device = next(ema.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for images in fid_images(ema, vae, args, rank=dist.get_rank(), world_size=world_size):
            pool3, _, logits = inception(images)
            features.append(torch.cat([pool3, logits], 1))  # (B, 2048 + 1008)
    features = torch.cat(features)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features)
    if dist.get_rank() > 0:
        return None
    features = torch.cat(gathered)[: args.fid_num_samples].double().cpu().numpy()
    fid_value = fid.frechet_distance(*fid.statistics(features[:, :2048]), *reference)
    return {"fid": fid_value, "is": fid.inception_score(features[:, 2048:])}

def fid_images(ema, vae, args, rank, world_size):
    """This rank's share of the FID samples, batches of uint8 images (a generator of its own)."""
    device = next(ema.parameters()).device
    generator = torch.Generator(device).manual_seed(args.global_seed * world_size + rank)
    per_rank = math.ceil(args.fid_num_samples / world_size)
    batch_size = args.global_batch_size // world_size
    guidance = dict(cfg_scale=args.fid_cfg_scale) if args.fid_cfg_scale > 1 else None
    loop = sample.sampling_loop("ddim", args.fid_steps)
    for i in range(0, per_rank, batch_size):
        n = min(batch_size, per_rank - i)
        images, _ = sample.generate(ema, vae, loop, n, generator=generator, guidance=guidance)
        yield images

if __name__ == "__main__":
    main()
