"""
One command that proves the CUDA paths of this project and measures DiT-XL/2 training MFU.

    python benchmarks/gpu_check.py                # on a GPU machine: about 5 minutes on an H200
    python benchmarks/gpu_check.py --smoke        # every code path at toy size on the CPU

Correctness: toy DiTs through the real entry points (train.py under python and torchrun, sample.py)
as subprocesses, most at once, compared with an fp32 run from the same seed and data; SDPA flash
attention, DiT sampling, the VAE and the Inception network on the GPU against the CPU. Speed:
DiT-XL/2 training at 32x32x4 latents through train.py (bf16, the largest batch of 256/128/64/32
that fits), without and with --compile, and its MFU; DDPM-250 guided sampling, VAE decode and
Inception features. A line is printed as soon as it is known and gpu_check.json (--out) rewritten;
a Markdown table comes last. Exit code 1 if a check failed. The weights are seeded random ones:
nothing is downloaded. --smoke prints "skipped: no GPU" where a figure needs a GPU.
"""
import argparse
import copy
import gc
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dit
import fid
import sample
import train
import vae
from bench_fid import fill_ as fill_inception
from bench_train import fill_
from diffusion import create_diffusion

# the toy DiT of the correctness runs: 2 blocks of width 64 (2 heads of 32) on 16x16 pixels
TOY = {"depth": 2, "hidden_size": 64, "num_heads": 2}
TOY_FLAGS = ["--model", "DiT-S/2", "--num-classes", 2, "--global-batch-size", 8, "--log-every", 1,
             "--ckpt-every", 1000, "--lr", 1e-3, "--ema-decay", 0.9, "--max-steps", 6]
# --smoke's VAE: 2 levels (latents at half the image size)
TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
# Max. relative difference of the 6 step losses from the reference run's. With lr 1e-3, half the
# lr moves them by 7% and no learning by 13%, so 1% catches a broken update, while bf16 autocast
# moved them by 3e-4 and fp16 by 1e-5 (on the CPU). TF32 rounds like fp16; a compiled or
# recomputing fp32 model, or torchrun with one process, differs at most in summation order.
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "tf32": 1e-3, "compile": 1e-4, "grad-ckpt": 1e-5,
             "torchrun": 1e-5}
# bf16 dense peak TFLOP/s by device name, first match
PEAKS = (("H100 PCIe", 756), ("H100 NVL", 835), ("A100", 312), ("H100", 989), ("H200", 989))
# the speed runs: DiT-XL/2 on 32x32x4 latents of 256x256 images; --smoke: the toy DiT
SPEED = dict(model="DiT-XL/2", kwargs={}, size=256, latent=32, batches=(256, 128, 64, 32), log=5,
             skip=2, measure=6, sample_batch=32, sample_steps=25, vae_batch=32, fid_batch=200,
             reps=3)
SMOKE_SPEED = dict(model="DiT-S/2", kwargs=TOY, size=16, latent=8, batches=(8,), log=1, skip=1,
                   measure=2, sample_batch=2, sample_steps=2, vae_batch=2, fid_batch=1, reps=1)
RESULTS = []

def report(name, status, value=None, unit="", note="", gpu_only=False, error=False):
    """Print a line of the table and rewrite the JSON report with every line so far."""
    if gpu_only and SMOKE and not error:
        status, value, note = "skipped", None, "skipped: no GPU"
    RESULTS.append(dict(name=name, status=status, value=value, unit=unit, note=note,
                        gpu_only=gpu_only))
    shown = "-" if value is None else f"{value:.4g} {unit}"
    print(f"{name:40s} {status:7s} {shown:>20s}  {note}", flush=True)
    INFO["seconds"] = round(time.time() - START)
    with open(f"{OUT}.tmp", "w") as f:
        json.dump({**INFO, "checks": RESULTS}, f, indent=1)
    os.replace(f"{OUT}.tmp", OUT)

def guarded(fn, *names, gpu_only=False):
    """Run a check; if it raises, each of its lines not printed yet fails with the error."""
    try:
        fn()
    except Exception as e:
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        done = {r["name"] for r in RESULTS}
        for name in names:
            if name not in done:
                report(name, "fail", note=error, gpu_only=gpu_only, error=True)

def rel_err(a, b):
    """||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def tf32(on):
    """TF32 matmuls and convolutions on or off (sample.py turns them on, fid.py off)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on

#################################################################################
#                                  Subprocesses                                 #
#################################################################################

def launch(name, cmd, threads=1, env=None):
    """Start a command in the project's folder, in its own process group; output to name.log."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
    with open(f"{WORK}/{name}.log", "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.started = time.time()
    return proc

def stop(proc):
    """End a launched command and every process it started (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

def log_lines(name):
    """The lines a launched command printed (train.py's errors are one line, the last)."""
    with open(f"{WORK}/{name}.log", errors="replace") as f:
        return [line.strip()[:300] for line in f if line.strip()] or ["(no output)"]

def finish(proc, name, timeout=300):
    """Wait for a launched command (timeout: from its start); raise with its last line if it
    failed. A crash at exit after train.py's "Done!" (at teardown) only returns a warning."""
    try:
        proc.wait(max(1, timeout - (time.time() - proc.started)))
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RuntimeError(f"{name} still ran after {timeout} s; stopped") from None
    lines = log_lines(name)
    if proc.returncode and any(line.endswith("] Done!") for line in lines):
        return f"; but exit code {proc.returncode} after Done!: {lines[-1]}"
    if proc.returncode:
        raise RuntimeError(f"{name} exited with {proc.returncode}: {lines[-1]}")
    return ""

def train_run(name, *flags, procs=0, threads=1):
    """Launch train.py (under torchrun with procs processes if procs), results in runs/name."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [sys.executable, *(runner if procs else []), "train.py", "--results-dir",
           f"{WORK}/runs/{name}", *flags]
    return launch(name, cmd, threads)

def metrics(name):
    """The metrics.jsonl records that a train.py run has written so far (whole lines only)."""
    records = []
    for path in glob.glob(f"{WORK}/runs/{name}/*/metrics.jsonl"):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.endswith("\n")]
    return records

def checkpoint(name, step):
    """The path of a train.py run's checkpoint of a step."""
    return glob.glob(f"{WORK}/runs/{name}/*/checkpoints/{step:07d}.pt")[0]

#################################################################################
#                                   Correctness                                 #
#################################################################################

def setup():
    """Toy images, a seeded random VAE (the SD one; --smoke: a tiny one), Inception weights."""
    rng = np.random.default_rng(0)
    for i in range(32):
        os.makedirs(f"{WORK}/data/{i % 2}", exist_ok=True)
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(image).save(f"{WORK}/data/{i % 2}/{i:02d}.png")
    torch.manual_seed(0)
    autoencoder = vae.AutoencoderKL(**(TINY_VAE if SMOKE else {}))
    # a diffusers folder: config.json and the weights as a torch state dict
    os.makedirs(f"{WORK}/vae", exist_ok=True)
    with open(f"{WORK}/vae/config.json", "w") as f:
        json.dump(autoencoder.config, f)
    torch.save(autoencoder.state_dict(), f"{WORK}/vae/diffusion_pytorch_model.bin")
    inception = fid.InceptionV3()
    # He-scaled weights and sane BatchNorm statistics: the features neither vanish nor explode
    fill_inception(inception)
    torch.save(inception.state_dict(), f"{WORK}/inception.pt")

def train_line(jobs, run, name, ref=None, note=""):
    """A train.py run's line: 6 finite losses on the device, within tolerance of ref's if given."""
    warning = finish(jobs[run], run)
    records = metrics(run)
    losses = [m["loss"] for m in records]
    if len(losses) != 6 or not all(map(math.isfinite, losses)):
        raise RuntimeError(f"losses {losses}: not 6 finite ones")
    if GPU.type == "cuda" and "peak_gib" not in records[-1]:
        raise RuntimeError("train.py ran on the CPU, not on CUDA")
    if ref is None:
        report(name, "pass", losses[-1], "loss", f"6 finite losses; {note}{warning}")
        return
    finish(jobs[ref], ref)
    tol = TOLERANCE[run]
    diff = max(abs(a - m["loss"]) / abs(m["loss"]) for a, m in zip(losses, metrics(ref)))
    report(name, "pass" if diff <= tol else "fail", diff, "rel. diff",
           f"step losses vs {ref}, tolerance {tol:g}{'; ' if note else ''}{note}{warning}")

def cuda_vs_cpu(name, fn, tol, note):
    """fn(device) -> tensors, on the GPU against the CPU: the largest relative error."""
    with torch.no_grad():
        cpu, gpu = ([t.cpu() for t in fn(device)] for device in (torch.device("cpu"), GPU))
    err = max(rel_err(a, b) for a, b in zip(gpu, cpu))
    report(name, "pass" if err <= tol else "fail", err, "rel. err", f"{note} (pass: {tol:g})",
           gpu_only=True)

def flash_check():
    """DiT-XL/2's attention (16 heads of 72) under bf16 autocast: which SDPA kernel runs, and
    flash (forced) against fp32 math, forward and input gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    attn = dit.Attention(1152, 16).to(GPU)
    x, g = torch.randn(2, *((1, 16, 1152) if SMOKE else (4, 256, 1152)), device=GPU)

    def run(bf16, backend=None):
        xi = x.clone().requires_grad_()
        with sdpa_kernel(backend) if backend else nullcontext():
            with torch.autocast(GPU.type, dtype=torch.bfloat16, enabled=bf16):
                out = attn(xi).float()
            out.backward(g)
        return out, xi.grad
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(True)
    kinds = {k for e in prof.events() for k in ("flash", "efficient", "cudnn")
             if f"_scaled_dot_product_{k}" in e.name} or {"math"}
    (out, grad), (ref_out, ref_grad) = run(True, SDPBackend.FLASH_ATTENTION), run(False,
                                                                               SDPBackend.MATH)
    err = max(rel_err(out, ref_out), rel_err(grad, ref_grad))
    report("SDPA flash attention bf16 vs fp32", "pass" if err <= 2e-2 else "fail", err,
           "rel. err", f"pass: 2e-2 (bf16 rounding gave 5e-3 on the CPU); default kernel: "
           f"{', '.join(sorted(kinds))}", gpu_only=True)

def model_checks():
    """This process's checks: flash attention, sampling, the VAE and Inception, GPU vs CPU."""
    guarded(flash_check, "SDPA flash attention bf16 vs fp32", gpu_only=True)
    size = 16 if SMOKE else 256
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = dit.create_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=2, **TOY).eval()
    fill_(model)
    noise = torch.randn(4, 3, 16, 16, generator=g)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(1, 4, size // (2 if SMOKE else 8), size // (2 if SMOKE else 8), generator=g)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)

    def ddim(device):
        # unclipped: a random DiT drives clipped pixels to 0 or 255
        loop = sample.sampling_loop("ddim", 10)
        return [sample.sample(copy.deepcopy(model).to(device), loop, noise.to(device),
                              torch.tensor([0, 1, 0, 1], device=device), dict(cfg_scale=4.0))]
    name = "DiT sampling cuda vs cpu, same noise"
    guarded(lambda: cuda_vs_cpu(name, ddim, 1e-4, "toy DiT, DDIM-10, guidance 4, fp32 (fp64 "
                                "differs by 2e-7)"), name, gpu_only=True)

    def autoencode(device):
        v = vae.load_vae(f"{WORK}/vae", device)
        return v.encode(x.to(device)).mean, v.decode(z.to(device))
    name = "VAE encode + decode cuda vs cpu"
    guarded(lambda: cuda_vs_cpu(name, autoencode, 1e-4, f"{size}x{size}, fp32, TF32 off"), name,
            gpu_only=True)

    def features(device):
        return fid.load_inception(f"{WORK}/inception.pt", device)(images.to(device))
    name = "Inception features cuda vs cpu"
    guarded(lambda: cuda_vs_cpu(name, features, 1e-4, "pool3, spatial, logits; TF32 off"), name,
            gpu_only=True)

def correctness(ngpu):
    """Toy train.py runs (most at once), sample.py, and this process's GPU-vs-CPU checks."""
    pixel = [*TOY_FLAGS, "--data-path", f"{WORK}/data", "--vae", "none", "--image-size", 16,
             "--model-kwargs", json.dumps(TOY)]
    # label dropout off: a compiled graph draws its own random numbers, eager code torch's
    nodrop = [*pixel, "--model-kwargs", json.dumps({**TOY, "class_dropout_prob": 0})]
    # NCCL wants a GPU per process; --smoke: 2 processes on gloo
    procs = 2 if SMOKE else ngpu
    runs = {"fp32": pixel, "repeat": pixel, "half": [*pixel, "--max-steps", 3],
            "bf16": [*pixel, "--precision", "bf16"], "fp16": [*pixel, "--precision", "fp16"],
            "tf32": [*pixel, "--tf32"], "grad-ckpt": [*pixel, "--grad-checkpointing"],
            "eager": nodrop, "compile": [*nodrop, "--compile"],
            "latent": [*pixel, "--vae", f"{WORK}/vae", "--image-size", 16 if SMOKE else 256,
                       "--latent-cache", f"{WORK}/cache"],
            "torchrun": [*pixel, "--global-batch-size", 8 if 8 % procs == 0 else 4 * procs]}
    if SMOKE:
        # --tf32 only sets CUDA flags; compiling takes ~50 s on 2 cores (checked on GPUs only)
        for run in ("tf32", "eager", "compile"):
            del runs[run]
    jobs = {run: train_run(run, *flags, procs=procs * (run == "torchrun"))
            for run, flags in runs.items()}
    device = "cpu" if SMOKE else "cuda, 4 loader workers, pinned memory"
    guarded(lambda: train_line(jobs, "fp32", "train.py fp32", note=device), "train.py fp32")

    def start_sampling():
        cmd = [sys.executable, "sample.py", "--ckpt", checkpoint("fp32", 6), "--sampler", "ddim",
               "--num-sampling-steps", 10, "--cfg-scale", 4, "--labels", 0, 1, 0, 1]
        jobs["sample-gpu"] = launch("sample-gpu", [*cmd, "--out", f"{WORK}/sample-gpu.png"])
        jobs["sample-cpu"] = launch("sample-cpu", [*cmd, "--out", f"{WORK}/sample-cpu.png"],
                                    env={"CUDA_VISIBLE_DEVICES": ""})

    def start_resume():
        finish(jobs["half"], "half")
        jobs["resume"] = train_run("resume", *pixel, "--resume", checkpoint("half", 3))
    guarded(start_sampling, "sample.py cuda vs cpu, same seed", gpu_only=True)
    guarded(start_resume, "train.py stop + --resume")
    # while the subprocesses run
    model_checks()
    one = f"{'gloo' if SMOKE else 'nccl'}; own data shards and random streams"
    lines = [("tf32", "train.py --tf32", "fp32", ""),
             ("bf16", "train.py --precision bf16", "fp32", ""),
             ("fp16", "train.py --precision fp16 (grad scaler)", "fp32", ""),
             ("grad-ckpt", "train.py --grad-checkpointing", "fp32", ""),
             ("compile", "train.py --compile", "eager", "label dropout off in both"),
             ("latent", "train.py --latent-cache", None, "cache built with the VAE on the device"),
             ("torchrun", f"torchrun train.py, {procs} process(es)", "fp32" if procs == 1 else None,
              "one GPU: the same run as plain python" if procs == 1 else one)]
    for run, name, ref, note in lines:
        if run in jobs:
            guarded(lambda: train_line(jobs, run, name, ref, note), name)
        else:
            report(name, "skipped", gpu_only=True)
    guarded(lambda: resume_line(jobs), "train.py stop + --resume")
    guarded(lambda: sample_line(jobs), "sample.py cuda vs cpu, same seed", gpu_only=True)

def resume_line(jobs):
    """3 steps, stop, --resume to 6 against 6 straight steps (and two straight runs)."""
    warning = "".join(finish(jobs[run], run) for run in ("resume", "fp32", "repeat"))

    def weights(run):
        ckpt = torch.load(checkpoint(run, 6), map_location="cpu", weights_only=True)
        return {f"{k}.{n}": t.float() for k in ("model", "ema") for n, t in ckpt[k].items()}
    a, b, r = weights("fp32"), weights("half"), weights("repeat")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    noise = max((a[k] - r[k]).abs().max().item() for k in a)
    if diff == 0:
        status, note = "pass", "bit-exact"
    elif 0 < noise and diff <= 10 * noise:
        status, note = "pass", f"not bit-exact: two straight runs differ by {noise:.2g} too"
    else:
        status, note = "fail", f"two straight runs differ by {noise:.2g}"
    report("train.py stop + --resume", status, diff, "max abs diff",
           f"model and EMA of 3 steps + --resume + 3 vs 6 straight: {note}{warning}")

def sample_line(jobs):
    """sample.py's images from one checkpoint and seed on CUDA and on the CPU."""
    images = []
    for run in ("sample-gpu", "sample-cpu"):
        finish(jobs[run], run)
        images.append(np.asarray(Image.open(f"{WORK}/{run}.png")))
    d = np.abs(images[0].astype(int) - images[1].astype(int))
    close = (d <= 1).mean()
    # a figure, not a test: as the official sample.py, sample.py draws its noise on the device,
    # and CUDA's random numbers are not the CPU's (the same-noise line below tests GPU sampling)
    report("sample.py cuda vs cpu, same seed", "info", 100 * (d == 0).mean(), "% same",
           f"{100 * close:.2f}% within 1/255; DDIM-10, guidance 4, a 6-step toy DiT; the noise "
           "is drawn on the device, as the official sample.py does", gpu_only=True)

#################################################################################
#                                      Speed                                    #
#################################################################################

def probe(c):
    """(batch, GiB): the largest of c["batches"] whose bf16 training step (AdamW, EMA) fits."""
    cuda = GPU.type == "cuda"
    free = torch.cuda.mem_get_info(GPU)[0] if cuda else math.inf
    torch.manual_seed(0)
    with torch.device(GPU):
        model = dit.create_dit(c["model"], input_size=c["latent"], **c["kwargs"])
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
    diffusion = create_diffusion("")
    for batch in c["batches"]:
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(GPU)
            # two steps: the second one with AdamW's state
            for _ in range(2):
                x = torch.randn(batch, 4, c["latent"], c["latent"], device=GPU)
                y, t = torch.randint(0, 1000, (2, batch), device=GPU)
                with torch.autocast(GPU.type, dtype=torch.bfloat16):
                    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                train.update_ema(ema, model, 0.9999)
            peak = torch.cuda.max_memory_reserved(GPU) if cuda else 0
            # room for train.py's CUDA context and this process's
            if peak <= free - 2 * 2**30:
                return batch, peak / 2**30
        except torch.cuda.OutOfMemoryError:
            pass
        # what the failed batch holds (its graph), before the next one
        loss = None
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    raise RuntimeError(f"no batch of {c['batches']} fits")

def speed_data(c, batch):
    """A folder of 50 batches of one toy image and a latent cache for it, tiled from the
    --latent-cache run's (train.py takes a cache whose meta.json fits the folder)."""
    n = 50 * batch
    data = f"{WORK}/speed_data"
    cache = f"{WORK}/speed_cache"
    os.makedirs(f"{data}/0")
    os.makedirs(cache)
    with open(f"{WORK}/data/0/00.png", "rb") as f:
        png = f.read()
    for i in range(n):
        with open(f"{data}/0/{i:06d}.png", "wb") as f:
            f.write(png)
    latents = np.load(f"{WORK}/cache/latents.npy")
    np.save(f"{cache}/latents.npy", np.resize(latents, (n, *latents.shape[1:])))
    np.save(f"{cache}/labels.npy", np.resize(np.load(f"{WORK}/cache/labels.npy"), n))
    args = argparse.Namespace(data_path=data, image_size=c["size"], vae=f"{WORK}/vae")
    meta = train.cache_meta(args, train.find_images(data)[1], vae.load_vae(args.vae))
    with open(f"{cache}/meta.json", "w") as f:
        json.dump(meta, f)
    return data, cache

def train_speed(label, flags, c, batch, data, cache, timeout):
    """train.py on the latent cache: img/s, TFLOP/s, MFU and peak memory after a warm-up."""
    run = f"speed{len(flags)}"
    proc = train_run(run, "--data-path", data, "--model", c["model"], "--model-kwargs",
                     json.dumps(c["kwargs"]), "--vae", f"{WORK}/vae", "--image-size", c["size"],
                     "--latent-cache", cache, "--global-batch-size", batch, "--precision", "bf16",
                     "--tf32", "--max-steps", 10**6, "--ckpt-every", 10**6, "--log-every",
                     c["log"], *flags, threads=0)
    need = c["skip"] + c["measure"]
    start = time.time()
    # stopped once it has logged enough: no DiT-XL/2 checkpoint (11 GB) is written
    while proc.poll() is None and len(metrics(run)) < need and time.time() - start < timeout:
        time.sleep(0.5)
    stop(proc)
    lines = metrics(run)[c["skip"]:need]
    if len(lines) < c["measure"]:
        raise RuntimeError(f"{len(lines) + c['skip']} of {need} log lines after "
                           f"{time.time() - start:.0f} s: {log_lines(run)[-1]}")
    # the log lines cover equal numbers of steps: harmonic means
    rate = len(lines) / sum(1 / m["steps_per_sec"] for m in lines)
    tflops = len(lines) / sum(1 / m["tflops"] for m in lines) if "tflops" in lines[0] else None
    peak = INFO["bf16_peak"]
    mfu = 100 * tflops / peak if peak and tflops else None
    steps = f"steps {c['skip'] * c['log'] + 1}-{need * c['log']}"
    report(f"train {label}: img/s", "pass", rate * batch, "img/s",
           f"{c['model']}, batch {batch}, {rate:.3g} steps/s over {steps}")
    report(f"train {label}: TFLOP/s", "pass", tflops, "TFLOP/s",
           "3 x 2 x model.gflops() per image", gpu_only=True)
    report(f"train {label}: MFU", "pass", mfu, "%", f"of {peak} TFLOP/s bf16 dense" if peak else
           f"unknown: no bf16 peak known for {INFO['device']}", gpu_only=True)
    report(f"train {label}: peak memory", "pass", max(m.get("peak_gib", 0) for m in lines),
           "GiB", "torch.cuda.max_memory_allocated", gpu_only=True)
    return mfu

def inference_speed(c):
    """DDPM-250 guided sampling (all 250 steps cost the same), VAE decode, Inception, img/s."""
    torch.manual_seed(0)
    with torch.device(GPU):
        model = dit.create_dit(c["model"], input_size=c["latent"], **c["kwargs"]).eval()
    v = vae.load_vae(f"{WORK}/vae", GPU)
    inception = fid.load_inception(f"{WORK}/inception.pt", GPU)
    n, k, size = c["sample_batch"], c["sample_steps"], c["size"]
    z = torch.randn(n, 4, c["latent"], c["latent"], device=GPU)
    y = torch.randint(0, 1000, (n,), device=GPU)
    latents = torch.randn(c["vae_batch"], 4, c["latent"], c["latent"], device=GPU)
    images = torch.randint(0, 256, (c["fid_batch"], 3, size, size), dtype=torch.uint8, device=GPU)
    on = f"{size}x{size}"
    # (name, work, images per call (of a 250-step run), calls, TF32 as the script, note)
    def guided(p):
        with sample.autocast(GPU, p):
            return sample.sample(model, sample.sampling_loop("ddpm", k), z, y, dict(cfg_scale=4.0))

    def decode(p):
        with sample.autocast(GPU, p):
            return sample.decode(v, latents)
    work = [(f"sampling DDPM-250 cfg {p}", lambda p=p: guided(p), n * k / 250, 1,
             True, f"{c['model']}, {on}, batch {n} (x2 guided), {k} of 250 steps timed, no VAE")
            for p in ("bf16", "fp32")]
    work += [(f"VAE decode {p}", lambda p=p: decode(p), len(latents),
              c["reps"], True, f"{on}, batch {len(latents)}") for p in ("bf16", "fp32")]
    work += [("Inception features", lambda: inception(images), len(images), c["reps"], False,
              f"uint8 {on} -> 299x299, batch {len(images)}, fp32 (as fid.py)")]
    sync = torch.cuda.synchronize if GPU.type == "cuda" else lambda: None
    for name, fn, count, reps, tf, note in work:
        tf32(tf)
        with torch.no_grad():
            # the first call picks the kernels
            fn()
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
        report(name, "pass", count * reps / (time.perf_counter() - start), "img/s", note)

def speed(c):
    """The largest batch, training speed without and with --compile, sampling, VAE, Inception."""
    labels = ("bf16", "bf16 --compile")
    names = [[f"train {label}: {k}" for k in ("img/s", "TFLOP/s", "MFU", "peak memory")]
             for label in labels]
    found = []

    def find():
        gc.collect()
        torch.cuda.empty_cache()
        batch, peak = probe(c)
        report("largest batch that fits (bf16)", "pass", batch, "images",
               f"of {c['batches']}; a step here took {peak:.1f} GiB", gpu_only=True)
        found.extend([batch, *speed_data(c, batch)])
    guarded(find, "largest batch that fits (bf16)", *names[0], *names[1], gpu_only=True)
    gc.collect()
    torch.cuda.empty_cache()
    mfus = []
    if found:
        guarded(lambda: mfus.append(train_speed(labels[0], [], c, *found, 150)), *names[0])
    guarded(lambda: inference_speed(c), "sampling DDPM-250 cfg bf16",
            "sampling DDPM-250 cfg fp32", "VAE decode bf16", "VAE decode fp32",
            "Inception features")
    gc.collect()
    torch.cuda.empty_cache()
    if SMOKE:
        # compiling on the CPU takes minutes (and does not pay off there)
        for name in names[1]:
            report(name, "skipped", gpu_only=True)
    elif found:
        # last: compiling DiT-XL/2 takes a minute or more; all in all at most 9 minutes
        timeout = max(60, min(240, 540 - (time.time() - START)))
        guarded(lambda: mfus.append(train_speed(labels[1], ["--compile"], c, *found, timeout)),
                *names[1])
    best = max((m for m in mfus if m is not None), default=None)
    status = "skipped" if not INFO["bf16_peak"] else "pass" if best and best >= 40 else "fail"
    note = "best of the two bf16 runs" if INFO["bf16_peak"] else "unknown bf16 peak"
    report("MFU goal: 40% in bf16", status, best, "%", note, gpu_only=True)

def main():
    """Parse the flags; correctness checks, then speed runs; the table as Markdown."""
    global GPU, INFO, OUT, SMOKE, START, WORK
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, in under a minute")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report")
    p.add_argument("--workdir", default=None, help="an empty or new folder that keeps the runs, "
                   "logs and weights (default: a temporary folder, deleted)")
    args = p.parse_args()
    SMOKE = args.smoke
    START = time.time()
    OUT = os.path.abspath(args.out)
    if SMOKE:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no GPU; --smoke runs every check at toy size on the CPU")
    if args.workdir and os.path.exists(args.workdir) and os.listdir(args.workdir):
        sys.exit(f"gpu_check.py: error: --workdir {args.workdir} is not empty")
    WORK = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(WORK, exist_ok=True)
    ngpu = torch.cuda.device_count()
    GPU = torch.device("cuda", 0) if ngpu else torch.device("cpu")
    name = torch.cuda.get_device_name(GPU) if ngpu else "CPU"
    INFO = dict(device=name, gpus=ngpu, torch=torch.__version__, cuda=torch.version.cuda,
                smoke=SMOKE, bf16_peak=next((p for key, p in PEAKS if key in name), None))
    print(f"{INFO['device']} x {ngpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"work in {WORK}\n\n{'check':40s} {'status':7s} {'value':>20s}  note", flush=True)
    tf32(False)
    if SMOKE:
        # a dozen subprocesses share the cores: more threads here would only wait for them
        torch.set_num_threads(1)
    try:
        guarded(setup, "setup: data, VAE, Inception weights")
        if not RESULTS:
            correctness(ngpu)
            speed(SMOKE_SPEED if SMOKE else SPEED)
    finally:
        print("\n| check | status | value | note |\n| --- | --- | ---: | --- |")
        for r in RESULTS:
            value = "" if r["value"] is None else f"{r['value']:.4g} {r['unit']}"
            print(f"| {r['name']} | {r['status']} | {value} | {r['note']} |")
        print(f"\n{len(RESULTS)} lines in {time.time() - START:.0f} s; wrote {OUT}")
        if args.workdir is None:
            shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(1 if any(r["status"] == "fail" for r in RESULTS) else 0)

if __name__ == "__main__":
    main()
