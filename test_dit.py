"""
The tests of the whole project, one section per file in README's order: sample.py, train.py,
fid.py, dit.py, diffusion.py, vae.py (and benchmarks/gpu_check.py last).

    python -m pytest test_dit.py -q                  # everything, as CI runs it
    python -m pytest test_dit.py -q -m "not slow"    # a sanity run that touches every file

Every test is named test_<file>_<behaviour>: `-k sample`, `-k train`, `-k fid`, `-k diffusion`,
`-k vae` select the tests of one file (for dit.py use `-k test_dit_`: `-k dit` also matches the name
of this file, so it selects everything). Tests marked slow take more than ~2 s each: torchrun
launches and the FID evaluation while training. No network is used: downloads come from local
servers that the tests start.

The golden numbers come from golden.json (next to this file), loaded once into GOLDEN: the reference
implementations (the official DiT code, diffusers' AutoencoderKL and DPMSolverMultistepScheduler,
torch-fidelity's port of the TF Inception) computed them on weights filled by fill_ below.
"""
import argparse
import functools
import hashlib
import http.server
import inspect
import itertools
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zipfile

import numpy as np
from PIL import Image
import pytest
import torch

import diffusion
from diffusion import create_diffusion
import dit
import fid
import sample
import train
import vae

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "golden.json")) as f:
    GOLDEN = json.load(f)

#################################################################################
#                                    Helpers                                    #
#################################################################################

def fill_(state_dict, seed=0, scale=1.0):
    """The golden weight fill (see golden.json's provenance): deterministic values, drawn in the
    order of the sorted key names, so that every output depends on every layer. scale multiplies
    the weights of 2 or more dimensions (below 1: deep stacks do not saturate). Returns
    state_dict, filled in place (a module's state_dict() fills the module)."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(state_dict):
        t = state_dict[name]
        if not t.is_floating_point():
            continue
        shape = t.shape
        if name.endswith("running_var"):
            v = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif name.endswith("running_mean"):
            v = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif t.dim() >= 2:
            fan_in = t.numel() // shape[0]
            v = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(2 / fan_in) * scale
        elif t.dim() == 1 and name.endswith("weight"):
            v = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            v = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            t.copy_(v.to(t.dtype))
    return state_dict


def randn(shape, seed):
    """Standard normal float32 numbers, drawn in float64 from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def projections(x):
    """The 8 random projections of golden.json's summaries (x flattened, float64)."""
    for k in range(8):
        g = torch.Generator().manual_seed(12345 + k)
        yield torch.dot(x, torch.randn(x.numel(), generator=g, dtype=torch.float64)).item()


def assert_summary(x, ref, rtol=1e-4, atol=1e-4):
    """Compare a tensor with a golden summary: shape, sums, strided values, 8 random projections."""
    assert list(x.shape) == list(ref["shape"])
    x = x.detach().double().flatten()
    scale = x.abs().max().item() + 1e-12
    sum_atol = atol * scale * x.numel() ** 0.5
    for key, val in [("sum", x.sum()), ("abs_sum", x.abs().sum()), ("sq_sum", x.square().sum())]:
        assert val.item() == pytest.approx(ref[key], rel=rtol, abs=sum_atol), key
    vals = x[:: ref["stride"]][: len(ref["values"])]
    expected = torch.tensor(ref["values"], dtype=torch.float64)
    assert torch.allclose(vals, expected, rtol=rtol, atol=atol * scale)
    for k, (proj, p) in enumerate(zip(projections(x), ref["proj8"])):
        assert proj == pytest.approx(p, rel=rtol, abs=sum_atol), f"proj8[{k}]"


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run tiny models: one thread is faster, and torchrun children start 2 processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 for every download test, answering GET and HEAD as a file
    host or as the Hugging Face Hub. Yields a namespace: routes maps a path to (status, headers,
    body); other paths serve the files under root (tmp_path/www); anything else is the Hub's 404.
    log records "METHOD path"; url is the base URL. HF_ENDPOINT points at it, DIT_CACHE and
    HF_HUB_CACHE at folders in tmp_path (made on use); HF_HOME and HF_HUB_OFFLINE are unset."""
    server = types.SimpleNamespace(root=tmp_path / "www", routes={}, log=[])
    server.root.mkdir()

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, with_body):
            server.log.append(f"{self.command} {self.path}")
            file = server.root / self.path.lstrip("/")
            if self.path in server.routes:
                status, headers, body = server.routes[self.path]
            elif file.is_file():
                status, headers, body = 200, {}, file.read_bytes()
            else:
                status, headers, body = 404, {}, b"Entry not found"
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):
            self.answer(True)

        def do_HEAD(self):
            self.answer(False)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    serve = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    serve.daemon = True
    serve.start()
    for k in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "dit_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    yield server
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def tcp_server():
    """Servers on 127.0.0.1 that are not HTTP servers, or broken ones: start(reply) starts one that
    answers every connection with the bytes reply, then closes it; it returns its http:// URL."""
    servers = []

    def start(reply):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        servers.append(server)

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.recv(4096)
                conn.sendall(reply)
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


# what a wrong port sends (tcp_server's reply for "not HTTP")
SSH_BANNER = b"SSH-2.0-OpenSSH_9.6\r\n"


# what urllib says when nothing listens
REFUSED = "<urlopen error [Errno 111] Connection refused>"


def closed_port_url():
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class RunsCode:
    """Pickles as a call of os.mkdir(path): a file that runs code when unpickled without
    weights_only (path then exists)."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def put(path, data):
    """path, written with the bytes data."""
    path.write_bytes(data)
    return path


def empty_folder(path):
    """path, made as an empty folder."""
    path.mkdir()
    return path


def save(obj, path, keep=None):
    """torch.save(obj, path); with keep, the file is then cut to its first keep bytes (a truncated
    file). Returns path."""
    torch.save(obj, path)
    if keep is not None:
        path.write_bytes(path.read_bytes()[:keep])
    return path


def run_cli(module, monkeypatch, capsys, *argv):
    """module.main() in this process: (SystemExit code or None, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    try:
        module.main()
        code = None
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_script(name, *argv):
    """python name *argv in a process of its own (one thread, no GPU): the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, os.path.join(HERE, name), *map(str, argv)],
                          capture_output=True, text=True, timeout=120, env=env)


TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


# safetensors' dtype names
ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors, path):
    """A dict of tensors as a .safetensors file at path, written by hand: the u64 little-endian
    header length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes. Returns
    path."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        blobs.append(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


def write_vae_folder(m, folder):
    """A VAE in diffusers' layout: config.json (with the block types diffusers needs) and
    diffusion_pytorch_model.safetensors in folder; returns folder."""
    os.makedirs(folder, exist_ok=True)
    n = len(m.config["block_out_channels"])
    config = {"_class_name": "AutoencoderKL", **m.config,
              "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(m.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return folder


def tiny_vae(seed=0, save_to=None, **config):
    """A small SD-style VAE with the golden fill: TINY_VAE (down-sampling 2, 4 latent channels)
    updated by config. With save_to, also saved there in diffusers' layout (for --vae)."""
    m = vae.AutoencoderKL(**{**TINY_VAE, **config}).eval()
    fill_(m.state_dict(), seed)
    if save_to is not None:
        write_vae_folder(m, save_to)
    return m


def run_torchrun(script_and_args, cwd, nproc=2):
    """torchrun with nproc gloo processes (1 thread each) on the CPU; returns the finished
    process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", *map(str, script_and_args)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


#################################################################################
#                                   sample.py                                   #
#################################################################################

# fast on 2 cores
SAMPLE_TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=8)


SAMPLE_TINY_ARGS = ["--model", "DiT-S/8",
                    "--model-kwargs", '{"depth": 2, "hidden_size": 64, "num_heads": 2}']


SAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def sample_grid_reference(x, nrow=4, pad=2):
    """torchvision save_image(x, nrow=4, normalize=True, value_range=(-1, 1)) pixels, written in
    numpy float32."""
    x = np.clip(x.astype(np.float32), -1, 1)
    x = (x - np.float32(-1)) / np.float32(2)
    x = np.clip(x * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    g = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        g[top:top + h, left:left + w] = x[i].transpose(1, 2, 0)
    return g


def sample_png(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """Local checkpoints: raw and train.py-style latent DiT (32x32 images), pixel-space DiT, tiny
    VAE folder."""
    root = tmp_path_factory.mktemp("sample_files")
    out = {}
    sd = fill_(dit.DiT(input_size=16, num_classes=1000, **SAMPLE_TINY).state_dict(), 1, scale=0.5)
    out["raw"] = str(root / "raw.pt")
    torch.save(sd, out["raw"])
    # train.py layout: sampling must use "ema", not "model"
    out["train"] = str(root / "train.pt")
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"model": zeros, "ema": sd, "opt": {}}, out["train"])
    out["pixel"] = str(root / "pixel.pt")
    pixel = dit.DiT(input_size=16, in_channels=3, num_classes=10, **SAMPLE_TINY)
    torch.save(fill_(pixel.state_dict(), 2, scale=0.5), out["pixel"])
    # down-samples 2x
    out["vae"] = str(root / "vae")
    tiny_vae(seed=3, save_to=out["vae"])
    return out


def sample_latent_args(files, out, *extra):
    return [*SAMPLE_TINY_ARGS, "--ckpt", files["train"], "--vae", files["vae"],
            "--image-size", "32", "--num-sampling-steps", "4", "--out", str(out), *extra]


def sample_pixel_args(files, out, *extra):
    return ["--ckpt", files["pixel"], *SAMPLE_TINY_ARGS, "--vae", "none", "--image-size", "16",
            "--num-classes", "10", "--out", str(out), *extra]


def sample_pixel_set_args(out, n, *extra):
    """An .npz set of n pixel-space images, 3 DDPM steps, batches of 2 (no --ckpt)."""
    return [*SAMPLE_TINY_ARGS, "--vae", "none", "--image-size", "16", "--num-classes", "10",
            "--num-sampling-steps", "3", "--per-proc-batch-size", "2",
            "--num-fid-samples", str(n), "--out", str(out), *extra]


# sha256 of the pixels torchvision 0.29's save_image(x, nrow=4, normalize=True,
# value_range=(-1, 1)) writes for x = randn((n, 3, 6, 7), seed n) * 1.5 (computed once with
# torchvision; it is not a dependency).
TORCHVISION_GRID_SHA256 = {5: "227e872104a061968cb0c271f0dc6fb5da3996b90e403a1a2b5d3b91240be46d",
                           8: "f8ca214d4be3d88a91e877ae163caf8f351f7be78752338fe677012621686ee3"}


@pytest.mark.parametrize("n", [5, 8])
def test_sample_grid_matches_torchvision_save_image(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn((n, 3, 6, 7), generator=g, dtype=torch.float64).float() * 1.5
    grid = sample.make_grid(sample.to_uint8(x))
    assert grid.shape == (2 * (6 + 2) + 2, 4 * (7 + 2) + 2, 3) and grid.dtype == np.uint8
    assert hashlib.sha256(grid.tobytes()).hexdigest() == TORCHVISION_GRID_SHA256[n]
    # the test's own reference agrees too
    assert np.array_equal(grid, sample_grid_reference(x.numpy()))


# the flags, and what the official sample.py does for them: its labels, respacing, loop and guided
# channels
@pytest.mark.parametrize("extra, labels, spacing, loop, cfg_channels", [
    pytest.param([], SAMPLE_LABELS, "4", "p_sample_loop", 3, id="ddpm"),
    pytest.param(["--sampler", "ddim", "--cfg-all-channels", "--labels", "3", "999", "0", "5", "7"],
                 [3, 999, 0, 5, 7], "ddim4", "ddim_sample_loop", None,
                 id="ddim-all-channels-5-labels"),
])
def test_sample_matches_reference_built_from_the_other_files(sample_files, tmp_path, extra, labels,
                                                            spacing, loop, cfg_channels):
    out = tmp_path / "grid.png"
    sample.main(sample_latent_args(sample_files, out, "--seed", "3", *extra))
    # The official sample.py, written with dit.py, diffusion.py and vae.py. Its VAE loader
    # (diffusers' from_pretrained) draws no random numbers, so loading ours before seeding is the
    # same program.
    v = vae.load_vae(sample_files["vae"])
    torch.manual_seed(3)
    # init draws from the CPU generator, as official
    model = dit.DiT(input_size=16, num_classes=1000, **SAMPLE_TINY)
    model.load_state_dict(torch.load(sample_files["raw"], weights_only=True))
    model.eval()
    d = create_diffusion(spacing)
    z = torch.randn(len(labels), 4, 16, 16)
    y = torch.tensor(labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([1000] * len(labels))], 0)
    kwargs = dict(y=y, cfg_scale=4.0, cfg_channels=cfg_channels)
    with torch.no_grad():
        x = getattr(d, loop)(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                             model_kwargs=kwargs, device="cpu")
        x, _ = x.chunk(2, dim=0)
        images = v.decode(x / 0.18215).numpy()
    expected = sample_grid_reference(images)
    got = sample_png(out)
    assert got.shape == (2 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)
    # not saturated, not flat
    assert 0.05 < (images.clip(-1, 1) == images).mean() and images.std() > 0.1
    assert np.array_equal(got, expected)


def test_sample_same_seed_same_image(sample_files, tmp_path):
    def run(name, *extra):
        sample.main(sample_latent_args(sample_files, tmp_path / name, "--labels", "1", "2", *extra))
        return (tmp_path / name).read_bytes()

    assert run("a.png") == run("b.png")
    assert run("c.png", "--seed", "1") != run("a.png")
    bf16 = run("d.png", "--precision", "bf16")
    assert bf16 == run("e.png", "--precision", "bf16")
    diff = sample_png(tmp_path / "d.png").astype(int) - sample_png(tmp_path / "a.png").astype(int)
    # bf16 rounding changes pixels a little, not the picture
    assert 0 < np.abs(diff).mean() < 8


# the checkpoint holds a latent DiT-S/8 of depth 2 and width 64 for 32x32 images; the last of a
# repeated flag wins
@pytest.mark.parametrize("change, message", [
    pytest.param(["--model-kwargs", "{}"], "does not fit", id="another-model"),
    pytest.param(["--model-kwargs", '{"dept": 2}'], "DiT has no argument dept", id="unknown-kwarg"),
    pytest.param(["--model-kwargs", "[2]"], "not a JSON object", id="kwargs-not-an-object"),
    pytest.param(["--image-size", "64"], "does not fit", id="another-image-size"),
    pytest.param(["--vae", "none", "--image-size", "16"], "does not fit", id="pixels-asked"),
    pytest.param(["--image-size", "36"], "input_size 18 is not divisible by patch_size 8",
                 id="size-not-a-multiple-of-the-patch"),
    pytest.param(["--labels", "5", "1000"], "out of range", id="label-out-of-range"),
    pytest.param(["--ckpt", "missing.pt"], "is not a file", id="missing-checkpoint"),
])
def test_sample_bad_input_fails_before_sampling(sample_files, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as e:
        sample.main(sample_latent_args(sample_files, tmp_path / "x.png", *change))
    assert message in str(e.value)
    assert not (tmp_path / "x.png").exists() and "sampling step" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--num-sampling-steps", "2000"], "cannot take 2000 sampling steps out of 1000"),
    (["--sampler", "ddim", "--num-sampling-steps", "999"], "cannot take exactly 999 DDIM steps"),
    (["--sampler", "dpm++", "--num-sampling-steps", "1001"], "DPM-Solver++ takes 1 to 1000"),
    (["--num-fid-samples", "0"], "argument --num-fid-samples: 0 is not a whole number >= 1"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: nan is not a number in [0, inf)"),
    (["--cfg-interval", "600", "100"], "--cfg-interval 600.0 100.0: LO must be below HI"),
    (["--out", "{tmp}"], "--out {tmp} is a folder, or its folder does not exist"),
    (["--out", "{tmp}/missing/x.png"], "--out {tmp}/missing/x.png is a folder, or its folder"),
    (["--out", "{tmp}/x.npz"], "--out {tmp}/x.npz: not an image file name"),
    (["--num-fid-samples", "4", "--out", "{tmp}/x.png"], "FID sets are written as .npz files"),
    (["--ckpt", "{tmp}/empty.pt"], "empty.pt is not a readable checkpoint: empty, truncated"),
    (["--ckpt", "{tmp}/random.pt"], "random.pt is not a readable checkpoint: empty, truncated"),
    (["--ckpt", "{tmp}/evil.pt"], "evil.pt is not a readable checkpoint: it holds pickled Python"),
], ids=["ddpm-2000", "ddim-999", "dpm-1001", "set-of-0", "cfg-nan", "interval", "out-folder",
        "out-missing-folder", "grid-npz", "set-png", "empty", "random", "pickled-code"])
def test_sample_bad_flags_and_files_fail_in_one_line(sample_files, tmp_path, capsys, flags,
                                                      message):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(os.urandom(3000))
    torch.save({"model": RunsCode(str(tmp_path / "code_ran"))}, tmp_path / "evil.pt")
    argv = sample_pixel_args(sample_files, tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        sample.main(argv + [f.format(tmp=tmp_path) for f in flags])
    text = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert text.startswith("sample.py: error: ") and message.format(tmp=tmp_path) in text
    assert "weights_only" not in text and "\n" not in text
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.npz").exists()


def test_sample_download_requires_official_model():
    with pytest.raises(SystemExit, match="only the latent DiT-XL/2"):
        sample.main([*SAMPLE_TINY_ARGS, "--image-size", "32"])


def test_sample_default_labels_fit_any_class_count():
    assert sample.default_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert sample.default_labels(10) == list(range(8))
    assert sample.default_labels(3) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert sample.default_labels(1) == [0] * 8


def test_sample_dpm_solver_and_interval_reach_the_solver_loop(sample_files, tmp_path):
    out = tmp_path / "dpm.png"
    sample.main(sample_pixel_args(sample_files, out, "--labels", "1", "2", "--sampler", "dpm++",
                                  "--num-sampling-steps", "3", "--cfg-interval", "300", "900"))
    torch.manual_seed(0)
    model = dit.DiT(input_size=16, in_channels=3, num_classes=10, **SAMPLE_TINY).eval()
    model.load_state_dict(torch.load(sample_files["pixel"], weights_only=True))
    z = torch.randn(2, 3, 16, 16)
    kwargs = dict(y=torch.tensor([1, 2, 10, 10]), cfg_scale=4.0, cfg_interval=(300, 900))
    with torch.no_grad():
        x = create_diffusion("").dpm_solver_sample_loop(
            model.forward_with_cfg, (4, 3, 16, 16), torch.cat([z, z]), num_steps=3,
            clip_denoised=True, model_kwargs=kwargs, device="cpu")[:2]
    expected = sample.make_grid(sample.to_uint8(x))
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_sample_run_checkpoint_needs_no_other_flag(tmp_path):
    # pixel_run, TINY: the train.py section's tiny run
    root = pixel_run(tmp_path, "--max-steps", "1", "--ema-decay", "0")
    ckpt = str(root / "000-DiT-S-8" / "checkpoints" / "0000001.pt")
    sample.main(["--ckpt", ckpt, "--num-sampling-steps", "2", "--out", str(tmp_path / "a.png")])
    explicit = ["--model", "DiT-S/8", "--model-kwargs", TINY[3], "--vae", "none",
                "--image-size", "16", "--num-classes", "2"]
    sample.main(["--ckpt", ckpt, "--num-sampling-steps", "2", "--out", str(tmp_path / "b.png"),
                 *explicit])
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert a.shape == (2 * 18 + 2, 4 * 18 + 2, 3)
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b.png")))
    with pytest.raises(SystemExit, match="does not fit --model DiT-S/8 --image-size 32"):
        sample.main(["--ckpt", ckpt, "--num-sampling-steps", "2", "--image-size", "32",
                     "--out", str(tmp_path / "c.png")])


def test_sample_check_loads_everything_and_samples_nothing(sample_files, tmp_path, capsys):
    sample.main(sample_pixel_args(sample_files, tmp_path / "x.png", "--check"))
    out = capsys.readouterr().out
    assert f"DiT checkpoint: {sample_files['pixel']}" in out and "pixels" in out
    assert "everything needed to sample is in place" in out
    assert not (tmp_path / "x.png").exists()


def test_sample_npz_set_resume_equals_uninterrupted_run(sample_files, tmp_path):
    fresh, resumed = tmp_path / "fresh.npz", tmp_path / "resumed.npz"
    ckpt = ["--ckpt", sample_files["pixel"]]
    sample.main(sample_pixel_set_args(fresh, 5, *ckpt))
    # "interrupted" after one batch
    sample.main(sample_pixel_set_args(resumed, 2, *ckpt))
    first = os.stat(tmp_path / "resumed_parts" / "rank000-batch000000.npz").st_mtime_ns
    sample.main(sample_pixel_set_args(resumed, 5, *ckpt))
    # not redone
    assert os.stat(tmp_path / "resumed_parts" / "rank000-batch000000.npz").st_mtime_ns == first
    a, b = np.load(fresh)["arr_0"], np.load(resumed)["arr_0"]
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 5 and a.std() > 10
    # finished batches of other options are never mixed in
    with pytest.raises(SystemExit, match="cfg_scale"):
        sample.main(sample_pixel_set_args(resumed, 5, *ckpt, "--cfg-scale", "2"))


def test_sample_npz_set_batches_are_tied_to_the_weights(sample_files, tmp_path):
    ckpt = tmp_path / "w.pt"
    shutil.copy(sample_files["pixel"], ckpt)
    argv = sample_pixel_set_args(tmp_path / "s.npz", 2, "--ckpt", str(ckpt),
                                 "--num-sampling-steps", "2")
    sample.main(argv)
    weights = torch.load(ckpt, weights_only=True)
    torch.save({k: v * 1.01 for k, v in weights.items()}, ckpt)
    with pytest.raises(SystemExit, match="weights_sha256"):
        sample.main(argv)


@pytest.mark.slow
def test_sample_npz_set_two_processes_torchrun_and_resume(sample_files, tmp_path):
    out = tmp_path / "fid.npz"

    def torchrun(n):
        args = sample_latent_args(sample_files, out, "--num-fid-samples", str(n),
                                  "--per-proc-batch-size", "2", "--cfg-scale", "1.5")
        run_torchrun([os.path.join(HERE, "sample.py"), *args], cwd=tmp_path)
        return np.load(out)["arr_0"]

    # 2 ranks x 1 batch of 2, the last image dropped
    first = torchrun(3)
    parts = tmp_path / "fid_parts"
    shards = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    assert sorted(shards) == ["rank000-batch000000.npz", "rank001-batch000000.npz"]
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    # continues: one more batch per rank
    full = torchrun(7)
    # finished batches kept
    assert all(os.stat(parts / name).st_mtime_ns == t for name, t in shards.items())
    assert len(list(parts.glob("*.npz"))) == 4
    assert full.shape == (7, 32, 32, 3) and np.array_equal(full[:3], first)
    # ranks drew different noise
    assert len({x.tobytes() for x in full}) == 7
    # image b * 4 + i * 2 + r comes from rank r's batch b, row i (the official sample_ddp.py
    # numbering)
    assert np.array_equal(full[5], np.load(parts / "rank001-batch000001.npz")["images"][0])
    labels = np.concatenate([np.load(p)["labels"] for p in sorted(parts.glob("*.npz"))])
    assert labels.min() >= 0 and labels.max() < 1000


def test_sample_default_download_from_local_servers(tmp_path, monkeypatch, http_server):
    # Stand-ins: the official DiT-XL/2 is the tiny model (so its checkpoint is small), the SD VAE a
    # tiny one that downsamples 8x, both served over HTTP from 127.0.0.1 as the two real hosts
    # would.
    monkeypatch.setitem(dit.DiT_models, "DiT-XL/2", lambda **kw: dit.DiT(**SAMPLE_TINY, **kw))
    root, requests = http_server.root, http_server.log
    (root / "dit").mkdir(parents=True)
    official = dit.DiT(input_size=32, num_classes=1000, **SAMPLE_TINY).state_dict()
    torch.save(fill_(official, 4, scale=0.5), root / "dit" / "DiT-XL-2-256x256.pt")
    hub_folder = root / "stabilityai" / "sd-vae-ft-mse" / "resolve" / "main"
    tiny_vae(seed=5, save_to=hub_folder, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    # http_server points HF_ENDPOINT at it and the caches at tmp_path
    monkeypatch.setenv("DIT_WEIGHTS_URL", http_server.url + "/dit")
    args = ["--num-sampling-steps", "2", "--labels", "1", "2"]
    # everything else default: DiT-XL/2, 256, mse
    sample.main(args + ["--out", str(tmp_path / "a.png")])
    assert "GET /dit/DiT-XL-2-256x256.pt" in requests
    assert "GET /stabilityai/sd-vae-ft-mse/resolve/main/config.json" in requests
    served = len(requests)
    assert sample_png(tmp_path / "a.png").shape == (256 + 4, 2 * 256 + 6, 3)
    sample.main(args + ["--out", str(tmp_path / "b.png")])
    # the second run reads the caches
    assert len(requests) == served
    sample.main(args + ["--out", str(tmp_path / "c.png"),
                        "--ckpt", str(root / "dit" / "DiT-XL-2-256x256.pt"),
                        "--vae", str(hub_folder)])
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "b.png"))
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "c.png"))

#################################################################################
#                                    train.py                                   #
#################################################################################

def write_images(root, per_class=(5, 5), flat=False, seed=0):
    """root/class_k/i.png: random RGB images of odd sizes, or flat colours per class (a learnable
    set); returns str(root)."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(per_class):
        os.makedirs(f"{root}/class_{k}", exist_ok=True)
        for i in range(n):
            h, w = rng.integers(16, 40, size=2)
            if flat:
                colour = np.array([[200, 30, 30], [30, 30, 200]][k % 2], np.uint8)
                a = np.broadcast_to(colour, (h, w, 3))
            else:
                a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(np.ascontiguousarray(a)).save(f"{root}/class_{k}/{i}.png")
    return str(root)


# a train.py run with a tiny pixel-space DiT (2 blocks of width 32, patch 8)
TINY = ["--model", "DiT-S/8", "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}',
        "--num-workers", "0", "--log-every", "1"]


PIXEL = [*TINY, "--vae", "none", "--image-size", "16", "--num-classes", "2",
         "--global-batch-size", "2"]


def pixel_run(tmp_path, *extra, data=None):
    """A tiny pixel-space run in this process (one thread: see one_thread); returns its experiment
    folder's parent. The last of a repeated flag wins."""
    data = data or write_images(tmp_path / "data")
    train.main([*PIXEL, "--data-path", data, "--results-dir", str(tmp_path / "r"), *extra])
    return tmp_path / "r"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


TRAIN = os.path.join(HERE, "train.py")


DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import train
# train.main uses the caller's group: several runs in one launch
dist.init_process_group("gloo")
for argv in json.load(open(sys.argv[1])):
    train.main(argv)
dist.destroy_process_group()
"""


def run_torchrun_many(runs, cwd, nproc=2):
    """train.main(argv) for each argv in runs, all in one torchrun launch (start-up is most of the
    time here)."""
    with open(os.path.join(cwd, "driver.py"), "w") as f:
        f.write(DRIVER.format(repo=HERE))
    with open(os.path.join(cwd, "runs.json"), "w") as f:
        json.dump(runs, f)
    return run_torchrun(["driver.py", "runs.json"], cwd, nproc)


# 8x8 latents: 16 tokens
TINY_LATENT = '{"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}'


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2-process gloo runs: `torchrun train.py` pixel space 5 steps straight (a); then in one more
    launch: 2 steps then resumed to 5 (b), and a latent run with a tiny VAE whose cache both ranks
    build (c). Only slow tests use it."""
    root = tmp_path_factory.mktemp("ddp")
    # 13 images, batch 4 on 2 ranks: 3 steps per epoch
    data = write_images(root / "data", per_class=(7, 6))
    pixel = [*TINY, "--data-path", data, "--vae", "none", "--image-size", "16",
             "--num-classes", "2", "--global-batch-size", "4", "--ckpt-every", "2"]
    tiny_vae(save_to=root / "vae", block_out_channels=(8, 8), norm_num_groups=4)
    latent = [*TINY, "--data-path", data, "--vae", str(root / "vae"), "--image-size", "16",
              "--num-classes", "2", "--global-batch-size", "2", "--model-kwargs", TINY_LATENT]
    a = run_torchrun([TRAIN, *pixel, "--results-dir", "a", "--max-steps", "5"], cwd=root)
    r = run_torchrun_many([[*pixel, "--results-dir", "b", "--max-steps", "2"],
                           [*pixel, "--resume", "b/000-DiT-S-8", "--max-steps", "5"],
                           [*latent, "--results-dir", "c", "--latent-cache", "cache",
                            "--max-steps", "2"]], cwd=root)
    return root, a.stdout + r.stdout


def test_train_center_crop_matches_adm():
    """Box-halving then bicubic to the short side, centre crop: shapes and a pure-resize case."""
    a = np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8)
    out = train.center_crop_arr(Image.fromarray(a), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # 70 >= 64: halved once
    half = Image.fromarray(a).resize((75, 35), resample=Image.BOX)
    ref = np.asarray(half.resize((round(75 * 32 / 35), 32), resample=Image.BICUBIC))
    left = (ref.shape[1] - 32) // 2
    np.testing.assert_array_equal(out, ref[:, left:left + 32])


def test_train_epoch_order_is_torch_ddp_order():
    """Same indices as DistributedSampler(shuffle=True, seed), padded, split over ranks; flips per
    index."""
    from torch.utils.data.distributed import DistributedSampler
    data = list(range(11))
    for rank in range(3):
        ref = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=5)
        ref.set_epoch(2)
        ours = train.epoch_order(11, 2, 5, rank, 3)
        assert [i for i, _ in ours] == list(ref)
        assert all(f in (0, 1) for _, f in ours)
    flips = [f for r in range(3) for _, f in train.epoch_order(11, 2, 5, r, 3)]
    assert 0 < sum(flips) < len(flips)


@pytest.mark.slow
def test_train_ddp_resume_is_bit_identical(ddp_runs):
    """2-process gloo DDP, pixel space: 5 steps straight == 2 steps + resume (mid-epoch) + 3 steps
    (crossing into the next epoch): model, EMA, optimizer and every rank's RNG bit-identical."""
    root, stdout = ddp_runs
    assert "Resuming from" in stdout
    straight = load(root / "a/000-DiT-S-8/checkpoints/0000005.pt")
    resumed = load(root / "b/000-DiT-S-8/checkpoints/0000005.pt")
    assert resumed["step"] == straight["step"] == 5 and resumed["epoch"] == straight["epoch"] == 1
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    for p, s in straight["opt"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, resumed["opt"]["state"][p][k]), (p, k)
    same_rng = [torch.equal(a["cpu"], b["cpu"]) for a, b in zip(straight["rng"], resumed["rng"])]
    assert same_rng == [True, True]
    # one stream per rank
    assert not torch.equal(straight["rng"][0]["cpu"], straight["rng"][1]["cpu"])
    first = load(root / "a/000-DiT-S-8/checkpoints/0000002.pt")
    # the resume point is inside an epoch
    assert (first["epoch"], first["batch"]) == (0, 2)
    key = "final_layer.linear.weight"
    assert not torch.equal(first["ema"][key], straight["ema"][key])
    # the log goes on in the same folder
    assert "(step=0000005)" in open(root / "b/000-DiT-S-8/log.txt").read()


@pytest.mark.slow
def test_train_latent_cache_ddp_and_same_inputs(ddp_runs):
    """Latent path with a tiny VAE: 2 ranks built the cache (mean and std of every image and its
    mirror) and trained from it; a cached draw equals vae.encode(x).sample() under the same random
    state."""
    root, stdout = ddp_runs
    assert "Wrote latent cache" in stdout and not os.path.exists(root / "cache.tmp")
    ckpt = load(root / "c/000-DiT-S-8/checkpoints/0000002.pt")
    # latent channels
    assert ckpt["model"]["x_embedder.proj.weight"].shape[1] == 4
    v = vae.load_vae(str(root / "vae"))
    _, samples = train.find_images(str(root / "data"))
    with open(root / "cache" / "meta.json") as f:
        meta = json.load(f)
    images, cache = train.ImageFolder(samples, 16), train.LatentCache(str(root / "cache"), meta)
    assert list(cache.labels) == [0] * 7 + [1] * 6
    # rows written by both ranks
    for i in range(13):
        for flip in (0, 1):
            x, y = images[(i, flip)]
            cached, label = cache[(i, flip)]
            posterior = v.encode(x[None])
            assert label == y and cached.shape == (2, 4, 8, 8)
            torch.testing.assert_close(cached[0], posterior.mean[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cached[1], posterior.std[0], rtol=1e-5, atol=1e-6)
            torch.manual_seed(i)
            direct = train.to_latent(x[None], v, cached=False)
            torch.manual_seed(i)
            from_cache = train.to_latent(cached[None], v, cached=True)
            torch.testing.assert_close(from_cache, direct, rtol=1e-5, atol=1e-5)
    # the cache is reused, and refused for other settings; the on-the-fly VAE path trains and
    # samples too
    common = [*TINY, "--data-path", str(root / "data"), "--vae", str(root / "vae"),
              "--image-size", "16", "--num-classes", "2", "--global-batch-size", "2",
              "--model-kwargs", TINY_LATENT, "--results-dir", str(root / "d"), "--max-steps", "1"]
    train.main([*common, "--latent-cache", str(root / "cache")])
    with pytest.raises(SystemExit, match="latent-cache .* was built for other image_size"):
        train.main([*common, "--latent-cache", str(root / "cache"), "--image-size", "32"])
    train.main([*common, "--sample-every", "1"])
    assert Image.open(root / "d/001-DiT-S-8/samples/0000001.png").size == (74, 74)


def test_train_checkpoint_layout_logging_grid_and_find_model(tmp_path):
    """Official layout and keys, weights_only loading, dit.find_model, --keep-last (the newest
    stay), log lines, EMA grid."""
    root = pixel_run(tmp_path, "--num-classes", "1", "--max-steps", "3", "--ckpt-every", "1",
                     "--keep-last", "2", "--sample-every", "3")
    exp = root / "000-DiT-S-8"
    assert sorted(os.listdir(exp / "checkpoints")) == ["0000002.pt", "0000003.pt"]
    ckpt = load(exp / "checkpoints/0000003.pt")
    assert {"model", "ema", "opt", "args"} <= set(ckpt) and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["model"] == "DiT-S/8" and ckpt["step"] == 3
    sd = dit.find_model(str(exp / "checkpoints/0000003.pt"))
    assert all(torch.equal(sd[k], v) for k, v in ckpt["ema"].items())
    model = dit.DiT(input_size=16, patch_size=8, in_channels=3, hidden_size=32, depth=2,
                    num_heads=2, num_classes=1)
    model.load_state_dict(sd)
    log = open(exp / "log.txt").read()
    assert "(step=0000003) loss" in log and "steps/s" in log and "img/s" in log
    assert "Saved checkpoint" in log
    grid = Image.open(exp / "samples/0000003.png")
    # 4 x 16 pixels + 2-pixel padding
    assert grid.size == (74, 74) and grid.mode == "RGB"


def test_train_loss_goes_down_on_a_learnable_set(tmp_path):
    """Flat colour per class: the tiny pixel DiT's loss falls several-fold within 60 steps."""
    data = write_images(tmp_path / "data", per_class=(8, 8), flat=True)
    kwargs = '{"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}'
    pixel_run(tmp_path, "--model-kwargs", kwargs, "--image-size", "8", "--global-batch-size", "16",
              "--max-steps", "60", "--lr", "2e-3", "--log-every", "10", "--ckpt-every", "1000",
              data=data)
    lines = [line for line in open(tmp_path / "r/000-DiT-S-8/log.txt") if "(step=" in line]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
    assert len(losses) == 6 and losses[-1] < 0.3 * losses[0], losses


def test_train_bf16_and_fp16_steps_run(tmp_path):
    """Mixed precision paths (bf16 autocast; fp16 with a grad scaler that is saved for resume)."""
    data = write_images(tmp_path / "data")
    pixel_run(tmp_path, "--max-steps", "2", "--precision", "bf16", data=data)
    root = pixel_run(tmp_path, "--max-steps", "2", "--precision", "fp16", "--grad-checkpointing",
                     data=data)
    ckpt = load(root / "001-DiT-S-8/checkpoints/0000002.pt")
    assert ckpt["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run with a message naming the last good checkpoint; none is
    written after it."""
    real = train.create_diffusion

    def nan_at_step_3(*a, **k):
        d, calls = real(*a, **k), [0]
        losses = d.training_losses

        def poisoned(*args, **kwargs):
            out = losses(*args, **kwargs)
            calls[0] += 1
            return {k: v * float("nan") for k, v in out.items()} if calls[0] == 3 else out

        d.training_losses = poisoned
        return d

    monkeypatch.setattr(train, "create_diffusion", nan_at_step_3)
    message = r"NaN/inf at step 4 or before; resume from the last good checkpoint .*0000002.pt"
    with pytest.raises(SystemExit, match=message):
        pixel_run(tmp_path, "--max-steps", "6", "--ckpt-every", "2", "--log-every", "4")
    assert os.listdir(tmp_path / "r/000-DiT-S-8/checkpoints") == ["0000002.pt"]


def test_train_corrupt_image_is_named_and_skipped(tmp_path, capsys):
    """An unreadable file is reported by name on stderr and replaced by the next image; never a
    crash."""
    data = write_images(tmp_path / "data", per_class=(2, 2))
    with open(tmp_path / "data/class_0/0.png", "wb") as f:
        f.write(b"not a png")
    _, samples = train.find_images(data)
    x, y = train.ImageFolder(samples, 16)[(0, 1)]
    err = capsys.readouterr().err
    assert f"skipping unreadable image {samples[0][0]}" in err
    assert samples[0][0].endswith("class_0/0.png")
    ref, _ = train.ImageFolder(samples, 16)[(1, 1)]
    assert torch.equal(x, ref) and y == 0 and x.shape == (3, 16, 16)


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--global-batch-size", "0"],
                 "argument --global-batch-size: 0 is not a whole number >= 1", id="batch-0"),
    pytest.param(["--global-batch-size", "-4"],
                 "argument --global-batch-size: -4 is not a whole number >= 1", id="batch-minus-4"),
    pytest.param(["--ckpt-every", "0"], "argument --ckpt-every: 0 is not a whole number >= 1",
                 id="ckpt-every-0"),
    pytest.param(["--log-every", "0"], "argument --log-every: 0 is not a whole number >= 1",
                 id="log-every-0"),
    pytest.param(["--max-steps", "0"], "argument --max-steps: 0 is not a whole number >= 1",
                 id="max-steps-0"),
    pytest.param(["--max-steps", "-3"], "argument --max-steps: -3 is not a whole number >= 1",
                 id="max-steps-minus-3"),
    pytest.param(["--epochs", "0"], "argument --epochs: 0 is not a whole number >= 1",
                 id="epochs-0"),
    pytest.param(["--keep-last", "-1"], "argument --keep-last: -1 is not a whole number >= 0",
                 id="keep-last-minus-1"),
    pytest.param(["--lr", "nan"], "argument --lr: nan is not a number in [0, inf)", id="lr-nan"),
    pytest.param(["--ema-decay", "1"], "argument --ema-decay: 1 is not a number in [0, 1)",
                 id="ema-decay-1"),
    pytest.param(["--fid-num-samples", "1"],
                 "argument --fid-num-samples: 1 is not a whole number >= 2", id="eval-images-1"),
])
def test_train_bad_flags_are_refused_by_argparse(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main([*PIXEL, "--data-path", str(tmp_path), "--results-dir", str(tmp_path / "r"),
                    *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"train.py: error: {message}"
    assert not os.path.exists(tmp_path / "r")


def bad_data_folders(root):
    """Data folders train.py refuses, in root: flat/ (an image outside any class folder), empty/
    (a class folder without images), bad/ (4 unreadable files), three/ (3 class folders)."""
    (root / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(root / "flat" / "a.png")
    (root / "empty" / "cls").mkdir(parents=True)
    for i in range(4):
        (root / "bad" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "bad" / f"c{i % 2}" / f"{i}.png").write_bytes(b"not a png")
    write_images(root / "three", (2, 2, 2))


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--data-path", "{tmp}/nope"], "--data-path {tmp}/nope is not a folder",
                 id="no-folder"),
    pytest.param(["--data-path", "{tmp}/flat"], "--data-path {tmp}/flat has no images",
                 id="no-classes"),
    pytest.param(["--data-path", "{tmp}/empty"], "--data-path {tmp}/empty has no images",
                 id="empty-class"),
    pytest.param(["--data-path", "{tmp}/three"],
                 "--data-path has 3 class folders but --num-classes is 2", id="too-many-classes"),
    pytest.param(["--global-batch-size", "16"],
                 "10 images do not fill a batch of 16; lower --global-batch-size",
                 id="batch-too-big"),
    pytest.param(["--data-path", "{tmp}/bad"], "none of the 4 images in --data-path can be read",
                 id="all-unreadable"),
    pytest.param(["--model-kwargs", '{{"dept": 2}}'], "--model-kwargs {{\"dept\": 2}} is not a "
                 "JSON object of DiT arguments (DiT has no argument dept", id="unknown-kwarg"),
    pytest.param(["--model-kwargs", '{{"depth": 1, "hidden_size": 32, "num_heads": 5}}'],
                 "hidden_size 32 is not divisible by num_heads 5", id="heads"),
    pytest.param(["--model-kwargs", "depth=2"],
                 "--model-kwargs depth=2 is not a JSON object of DiT arguments", id="not-json"),
    pytest.param(["--image-size", "20"], "input_size 20 is not divisible by patch_size 8",
                 id="patch"),
    pytest.param(["--latent-cache", "{tmp}/cache"], "--latent-cache needs a VAE",
                 id="cache-without-autoencoder"),
    pytest.param(["--resume", "{tmp}/nope"], "--resume {tmp}/nope does not exist",
                 id="resume-missing"),
    pytest.param(["--fid-every", "2"], "--fid-ref None does not exist; --fid-every needs",
                 id="eval-no-ref"),
    pytest.param(["--fid-steps", "999"], "--fid-steps 999: cannot take exactly 999 DDIM steps",
                 id="eval-steps"),
])
def test_train_bad_inputs_fail_before_anything_is_made(tmp_path, flags, message):
    bad_data_folders(tmp_path)
    with pytest.raises(SystemExit) as e:
        pixel_run(tmp_path, *[f.format(tmp=tmp_path) for f in flags])
    assert str(e.value).startswith("train.py: error: ")
    assert message.format(tmp=tmp_path) in str(e.value)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "r")


def test_train_batch_must_divide_over_the_processes(tmp_path):
    args = train.parse_args([*PIXEL, "--data-path", write_images(tmp_path / "data"),
                             "--global-batch-size", "3", "--results-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as e:
        train.train(args, rank=0, world_size=2, device=torch.device("cpu"))
    assert str(e.value) == ("train.py: error: --global-batch-size 3 is not divisible by the 2 "
                            "processes; use a multiple of 2")
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--resume", "{exp}", "--model-kwargs",
                  '{{"depth": 3, "hidden_size": 32, "num_heads": 2}}'],
                 "was trained with --model-kwargs", id="other-model-kwargs"),
    pytest.param(["--resume", "{exp}", "--image-size", "32"],
                 "was trained with --image-size 16, not 32;", id="other-image-size"),
    pytest.param(["--resume", "{tmp}/official.pt"], "not a checkpoint written by this train.py",
                 id="foreign-checkpoint"),
])
def test_train_resume_refuses_another_run(tmp_path, flags, message):
    exp = pixel_run(tmp_path, "--max-steps", "1") / "000-DiT-S-8"
    torch.save({"model": {}, "ema": {}}, tmp_path / "official.pt")
    flags = [f.format(exp=exp, tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit, match=message):
        pixel_run(tmp_path, "--max-steps", "1", *flags, data=str(tmp_path / "data"))


def test_train_resume_from_a_checkpoint_outside_an_experiment_starts_a_new_one(tmp_path):
    root = pixel_run(tmp_path, "--max-steps", "2")
    shutil.copy(root / "000-DiT-S-8" / "checkpoints" / "0000002.pt", tmp_path / "kept.pt")
    pixel_run(tmp_path, "--max-steps", "3", "--resume", str(tmp_path / "kept.pt"),
              data=str(tmp_path / "data"))
    assert os.listdir(root / "001-DiT-S-8" / "checkpoints") == ["0000003.pt"]
    assert "Resuming from" in open(root / "001-DiT-S-8" / "log.txt").read()


def test_train_resume_compares_model_kwargs_not_their_spelling(tmp_path):
    root = pixel_run(tmp_path, "--max-steps", "1")
    respelled = '{"num_heads": 2, "hidden_size": 32,  "depth": 2}'
    pixel_run(tmp_path, "--max-steps", "2", "--resume", str(root / "000-DiT-S-8"),
              "--model-kwargs", respelled, data=str(tmp_path / "data"))
    assert sorted(os.listdir(root / "000-DiT-S-8" / "checkpoints")) == ["0000001.pt", "0000002.pt"]


def test_train_failed_save_removes_its_file_and_says_how_much_space(tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full(obj, f, **kwargs):
        # train.py saves into an open temp file; its partial content must not stay behind
        name = getattr(f, "name", str(f))
        if name.endswith(".tmp") and "0000002" in name:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        pixel_run(tmp_path, "--max-steps", "3", "--ckpt-every", "1")
    assert "could not save" in str(e.value) and "No space left on device" in str(e.value)
    assert "it needs about 1 MiB: free some space, then --resume" in str(e.value)
    assert os.listdir(tmp_path / "r" / "000-DiT-S-8" / "checkpoints") == ["0000001.pt"]


def test_train_symlink_loop_lists_each_image_once(tmp_path):
    data = write_images(tmp_path / "data", per_class=(2, 2))
    os.symlink("..", os.path.join(data, "class_0", "up"))
    os.symlink(os.path.join(data, "class_0"), os.path.join(data, "class_1", "again"))
    classes, samples = train.find_images(data)
    assert classes == ["class_0", "class_1"] and len(samples) == 4
    assert [label for _, label in samples] == [0, 0, 1, 1]


def test_train_sixteen_bit_images_are_not_white(tmp_path):
    os.makedirs(tmp_path / "c")
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "c" / "a.png")
    assert Image.open(tmp_path / "c" / "a.png").mode.startswith("I")
    arr = train.read_image(str(tmp_path / "c" / "a.png"), 16)
    assert arr.shape == (16, 16, 3) and arr.min() == 0 and arr.max() == 255
    # scaled to 8 bits (not clipped: convert("RGB") alone makes it all white)
    assert np.abs(arr[..., 0] - ramp / 257).max() <= 0.5 + 1e-9
    assert (arr[..., 0] == arr[..., 2]).all()


def test_train_ema_decay_zero_is_the_live_model_and_metrics_jsonl(tmp_path):
    root = pixel_run(tmp_path, "--max-steps", "3", "--ema-decay", "0", "--log-every", "2")
    ckpt = load(root / "000-DiT-S-8" / "checkpoints" / "0000003.pt")
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())
    assert ckpt["config"] == dit.DiT(**ckpt["config"]).config
    lines = [json.loads(line) for line in open(root / "000-DiT-S-8" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [2, 3]
    assert set(lines[0]) == {"step", "loss", "mse", "vb", "steps_per_sec", "img_per_sec"}
    log = [line for line in open(root / "000-DiT-S-8" / "log.txt") if "(step=" in line]
    assert len(log) == len(lines)
    assert f"loss {lines[0]['loss']:.4f}" in log[0]


@pytest.mark.slow
def test_train_inception_metrics_while_training_torchrun(tmp_path, fid_weights_file):
    """2 processes: FID at steps 2 and 3 (the end) equals fid.py on the same images, and the
    weights equal those of the same run without --fid-every."""
    data = write_images(tmp_path / "data", per_class=(4, 4))
    ref = tmp_path / "ref"
    os.makedirs(ref)
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    common = [*PIXEL, "--data-path", data, "--max-steps", "3", "--ckpt-every", "1"]
    fid_flags = ["--fid-every", "2", "--fid-ref", str(ref), "--fid-num-samples", "3",
                 "--fid-steps", "2", "--fid-inception", str(fid_weights_file)]
    run_torchrun_many([[*common, "--results-dir", "a", *fid_flags],
                       [*common, "--results-dir", "b"]], cwd=tmp_path)
    exp = tmp_path / "a" / "000-DiT-S-8"
    metrics = [json.loads(line) for line in open(exp / "metrics.jsonl")]
    scores = [m for m in metrics if "fid" in m]
    assert [m["step"] for m in scores] == [2, 3]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    with_fid = load(exp / "checkpoints" / "0000003.pt")
    without = load(tmp_path / "b" / "000-DiT-S-8" / "checkpoints" / "0000003.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(v, without[part][k]) for k, v in with_fid[part].items())
    # the same images again, through fid.py
    args = train.parse_args([*common, *fid_flags])
    ema = dit.DiT(**with_fid["config"]).eval()
    ema.load_state_dict(with_fid["ema"])
    images = torch.cat([x for rank in range(2)
                        for x in train.fid_images(ema, None, args, rank, 2)])
    inception = fid.load_inception(str(fid_weights_file))
    pool3, _, logits = fid.compute_features(images[:3], inception)
    (mu, sigma), _, _ = fid.reference(str(ref), inception, 50)
    expected = fid.frechet_distance(*fid.statistics(pool3), mu, sigma)
    assert scores[-1]["fid"] == pytest.approx(expected, rel=1e-6)
    assert scores[-1]["is"] == pytest.approx(fid.inception_score(logits), rel=1e-6)

#################################################################################
#                                     fid.py                                    #
#################################################################################

# sha256 of "key<TAB>shape" lines of pt_inception-2015-12-05 (shared/golden/inception_keys.txt),
# 566 entries
INCEPTION_KEYS_SHA256 = "e22ace644c9f030d9793411454945147d47bff1a80d8339955d5867176d77687"


@pytest.fixture(scope="module")
def fid_inception():
    """The FID Inception with the golden fill (seed 0), unfolded, in eval mode."""
    m = fid.InceptionV3()
    fill_(m.state_dict())
    return m.eval()


@pytest.fixture(scope="module")
def fid_weights_file(fid_inception, tmp_path_factory):
    """fid_inception's state dict saved like the official .pth file."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_inception.state_dict(), path)
    return path


def fid_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def fid_write_folder(path, x):
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(os.path.join(path, f"{i:03d}.png"))
    return path


def fid_batches(source, batch_size=2):
    n, it = fid.image_batches(source, batch_size)
    out = torch.cat(list(it))
    assert len(out) == n
    return out


def write_npz(path, n):
    """An ADM .npz of n 8x8 images at path; returns path."""
    np.savez(path, fid_images(n, 8, n).permute(0, 2, 3, 1).numpy())
    return path


def write_stats(path, **change):
    """A statistics .npz (3 features, 2 spatial) at path, keys changed (None: left out) by change;
    returns path."""
    stats = {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": np.eye(2),
             **change}
    np.savez(path, **{k: v for k, v in stats.items() if v is not None})
    return path


def test_fid_inception_keys_match_official_file():
    sd = fid.InceptionV3().state_dict()
    lines = "\n".join(f"{k}\t{tuple(v.shape)}" for k, v in sd.items())
    assert len(sd) == 566
    assert hashlib.sha256(lines.encode()).hexdigest() == INCEPTION_KEYS_SHA256


@pytest.mark.parametrize("size", ["64", "256", "299"])
def test_fid_golden_features(fid_inception, size):
    golden = GOLDEN["inception"]
    assert golden["weights_seed"] == 0
    case = golden["cases"][size]
    with torch.no_grad():
        pool3, spatial, logits = fid_inception(fid_images(2, int(size), int(size)))
    assert pool3.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert pool3.dtype == spatial.dtype == logits.dtype == torch.float32
    assert_summary(pool3, case["pool3"])
    assert_summary(spatial, case["spatial_mixed6_conv_first7_nhwc"])
    assert_summary(logits, case["logits_unbiased_1008"])


def test_fid_load_inception_from_file_folds_batchnorm(fid_inception, fid_weights_file):
    model = fid.load_inception(fid_weights_file)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = fid_images(1, 128, 7)
    with torch.no_grad():
        for a, b in zip(model(x), fid_inception(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("x, message", [
    pytest.param(torch.rand(1, 3, 64, 64), "uint8", id="float"),
    pytest.param(torch.zeros(1, 1, 64, 64, dtype=torch.uint8), r"\(N, 3, H, W\) in tensors",
                 id="one-channel"),
])
def test_fid_inception_rejects_bad_tensors(fid_inception, x, message):
    with pytest.raises(ValueError, match=message):
        fid_inception(x)


def test_fid_tf1_resize_hand_computed():
    # 299x299 in, 299x299 out: the identity
    x = fid_images(1, 299, 3).float()
    assert torch.equal(fid.tf1_resize(x), x)
    x = torch.tensor([[0.0, 30.0], [60.0, 90.0]]).view(1, 1, 2, 2)
    # sources 0, 2/3, 4/3; the last clamps to pixel 1 (no half-pixel offset, unlike
    # align_corners=False)
    expected = torch.tensor([[0.0, 20.0, 30.0], [40.0, 60.0, 70.0], [60.0, 80.0, 90.0]])
    torch.testing.assert_close(fid.tf1_resize(x, size=3)[0, 0], expected)
    # downscaling by 2 picks every other pixel: TF-1 does not average (aliasing)
    y = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[0.0, 2.0], [8.0, 10.0]])
    torch.testing.assert_close(fid.tf1_resize(y, size=2)[0, 0], expected)


def test_fid_of_a_set_with_itself_is_zero():
    # the 256 corners of a cube of side 6 in 8 dimensions, centred on 0..7: that mean, and the
    # covariance 9 * 256 / 255 (unbiased) times the identity
    corners = np.array(list(itertools.product([-3.0, 3.0], repeat=8)))
    mu, sigma = fid.statistics((corners + np.arange(8)).astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, np.arange(8), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, 9 * 256 / 255 * np.eye(8), rtol=1e-12, atol=1e-12)
    # a full covariance: its square root is computed, and the distance is still 0
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    mu, sigma = fid.statistics(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def fid_psd(rng, d):
    """A random d x d covariance (symmetric positive definite)."""
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_matches_closed_form_on_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), fid_psd(rng, 8), fid_psd(rng, 8)
    # independent form: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric eigenproblem
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    one_d = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                                 np.array([[9.0]]))
    assert one_d == pytest.approx(5.0)


def test_fid_singular_fallback_adds_eps(monkeypatch):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(4), fid_psd(rng, 4), fid_psd(rng, 4)
    real_sqrtm, calls = fid.linalg.sqrtm, []

    def flaky_sqrtm(a):
        # the first call fails as for a singular product
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    got = fid.frechet_distance(mu, s1, mu, s2, eps=1e-3)
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(4)) @ (s2 + 1e-3 * np.eye(4)))
    monkeypatch.undo()
    w = np.trace(fid.linalg.sqrtm(calls[1]).real)
    assert got == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * w, rel=1e-9)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="different"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("which, value", [("mu1", np.nan), ("sigma1", np.inf),
                                          ("mu2", np.nan), ("sigma2", np.inf)],
                         ids=["mu1", "sigma1", "mu2", "sigma2"])
def test_fid_frechet_distance_refuses_nan_and_inf(which, value):
    stats = {"mu1": np.zeros(4), "sigma1": np.eye(4), "mu2": np.ones(4), "sigma2": np.eye(4)}
    stats[which].flat[1] = value
    with pytest.raises(ValueError) as e:
        fid.frechet_distance(**stats)
    assert str(e.value) == (f"{which} holds NaN or inf; FID needs the statistics of 2 or more "
                            "finite feature vectors per set")


def test_fid_one_image_fails_at_once():
    with pytest.raises(ValueError) as e:
        fid.statistics(np.ones((1, 2048), np.float32))
    assert str(e.value) == "FID needs at least 2 images per set, got 1"
    mu, sigma = fid.statistics(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(mu, [1.5, 2.5, 3.5]) and np.array_equal(sigma, np.full((3, 3), 4.5))


def test_fid_inception_score_definition():
    assert fid.inception_score(np.zeros((20, 1008), np.float32)) == pytest.approx(1.0, abs=1e-12)
    # confident predictions spread evenly over 5 classes -> IS 5; all one class -> IS 1
    five = 1000 * np.eye(1008, dtype=np.float32)[np.arange(10) % 5]
    one = 1000 * np.eye(1008, dtype=np.float32)[np.zeros(10, int)]
    assert fid.inception_score(five) == pytest.approx(5.0, rel=1e-9)
    # ordered splits of split_size: mean over splits of per-split scores
    both = np.concatenate([five, one])
    assert fid.inception_score(both, split_size=10) == pytest.approx(3.0, rel=1e-9)
    # against the formula on random logits
    logits = np.random.default_rng(3).normal(size=(30, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1)))
    assert fid.inception_score(logits) == pytest.approx(expected, rel=1e-9)


def test_fid_distances_are_float16_like_the_evaluator():
    # 100 vs 101 in float16, op by op: 10000 - 2 * 10096 + 10200 = 8 (float32 would give 1)
    assert fid._sq_distances(torch.tensor([[100.0]]), torch.tensor([[101.0]])).item() == 8.0
    # 300^2 overflows float16 (max 65504): the evaluator falls back to float32
    assert fid._sq_distances(torch.tensor([[300.0]]), torch.tensor([[301.0]])).item() == 1.0


def test_fid_radii_are_kth_neighbour_squared_distances():
    # points 0..9 on a line
    x = torch.arange(10.0).view(-1, 1)
    radii = fid._radii(x, k=3, rows=4)
    # 3rd neighbour (self excluded), squared: 0 -> 3, 1 -> 3 (0, 2, 3), 4 -> 2 (3, 5, 2), 9 -> 6
    torch.testing.assert_close(radii[[0, 1, 4, 9]], torch.tensor([9.0, 4.0, 4.0, 9.0]))
    assert torch.equal(radii, fid._radii(x, k=3, rows=1000))


def test_fid_precision_recall_on_clusters():
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(size=(100, 8)) + off for off in (0.0, 50.0, -50.0))
    # reference = clusters A and B; the generated set = A exactly and a far cluster C
    precision, recall = fid.precision_recall(np.concatenate([a, b]), np.concatenate([a, c]),
                                             rows=64)
    assert (precision, recall) == (0.5, 0.5)
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least 4"):
        fid.precision_recall(a[:3], a)


def test_fid_precision_recall_matches_brute_force():
    # small integers: squared distances are exact in float16
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 6, size=(60, 4)).astype(np.float32)
    gen = rng.integers(1, 7, size=(50, 4)).astype(np.float32)

    def d(u, v):
        return ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)

    r_ref, r_gen = np.sort(d(ref, ref), 1)[:, 3], np.sort(d(gen, gen), 1)[:, 3]
    precision = np.mean((d(gen, ref) <= r_ref[None]).any(1))
    recall = np.mean((d(ref, gen) <= r_gen[None]).any(1))
    assert 0 < precision < 1 and 0 < recall < 1
    expected = (pytest.approx(precision), pytest.approx(recall))
    assert fid.precision_recall(ref, gen, rows=7) == expected


def test_fid_npz_folder_array_tensor_give_the_same_images(tmp_path):
    x = fid_images(5, 24, 9)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "a.npz", nhwc)
    np.savez_compressed(tmp_path / "c.npz", nhwc)
    folder = fid_write_folder(str(tmp_path / "imgs"), x)
    for source in (str(tmp_path / "a.npz"), tmp_path / "c.npz", folder, nhwc, x):
        assert torch.equal(fid_batches(source), x)


def test_fid_folder_of_tif_files_is_read(tmp_path):
    x = fid_images(3, 8, 11)
    for i, name in enumerate(["a.tif", "b.TIF", "c.tiff"]):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(tmp_path / name)
    assert torch.equal(fid_batches(str(tmp_path)), x)


@pytest.mark.parametrize("ext", fid.IMAGE_EXTENSIONS)
def test_fid_folder_reads_every_image_extension(tmp_path, ext):
    # one list for fid.py and train.py's datasets: each ending, lossy ones and gray .pgm too
    x = fid_images(1, 8, 12)
    im = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    (im.convert("L") if ext == ".pgm" else im).save(tmp_path / f"0{ext}")
    y = fid_batches(str(tmp_path))
    assert y.shape == x.shape
    if ext not in (".jpg", ".jpeg", ".webp", ".pgm"):
        assert torch.equal(y, x)


def test_fid_npz_and_tensor_give_the_same_features(fid_inception, tmp_path):
    x = fid_images(2, 32, 10)
    np.savez(tmp_path / "s.npz", x.permute(0, 2, 3, 1).numpy())
    features = fid.compute_features(str(tmp_path / "s.npz"), fid_inception, batch_size=1)
    with torch.no_grad():
        expected = fid_inception(x)
    for a, b in zip(features, expected):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4 * b.abs().max().item())


# two gray images, (2, 1, 16, 16)
GRAY = fid_images(2, 16, 11)[:, :1]


def test_fid_grayscale_files_become_rgb(tmp_path):
    for i, im in enumerate(GRAY[:, 0].numpy()):
        Image.fromarray(im, mode="L").save(tmp_path / f"{i}.png")
    assert torch.equal(fid_batches(str(tmp_path)), GRAY.expand(-1, 3, -1, -1))


@pytest.mark.parametrize("x", [GRAY, GRAY.permute(0, 2, 3, 1).numpy(), GRAY[:, 0].numpy()],
                         ids=["tensor-n1hw", "array-nhw1", "array-nhw"])
def test_fid_gray_arrays_must_be_rgb(x):
    with pytest.raises(ValueError, match="repeat to 3 channels"):
        fid.image_batches(x)


def npz(path, *arrays, **named):
    """np.savez(path, *arrays, **named); returns str(path)."""
    np.savez(path, *arrays, **named)
    return str(path)


def folder_with(path, x, name, data):
    """fid_write_folder(path, x), plus the file name holding data (bytes or an HWC array)."""
    fid_write_folder(str(path), x)
    if isinstance(data, bytes):
        (path / name).write_bytes(data)
    else:
        Image.fromarray(data).save(path / name)
    return str(path)


@pytest.mark.parametrize("source, message", [
    pytest.param(lambda tmp: empty_folder(tmp / "empty"), "no images", id="empty-folder"),
    pytest.param(lambda tmp: np.zeros((2, 8, 8, 3), np.float32), "uint8", id="float-array"),
    pytest.param(lambda tmp: np.zeros((2, 8, 8, 5), np.uint8), r"\(N, H, W, 3\)",
                 id="five-channels"),
    pytest.param(lambda tmp: npz(tmp / "f.npz", np.zeros((2, 8, 8, 3), np.float32)), "uint8",
                 id="float-npz"),
    pytest.param(lambda tmp: npz(tmp / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8)), "arr_0",
                 id="npz-without-arr_0"),
    pytest.param(lambda tmp: str(tmp / "missing.npz"), "expected an existing .npz",
                 id="missing-npz"),
    pytest.param(lambda tmp: folder_with(tmp / "mixed", fid_images(2, 8, 0), "002.png",
                                         np.zeros((9, 8, 3), np.uint8)),
                 "same size", id="mixed-sizes"),
    pytest.param(lambda tmp: folder_with(tmp / "broken", fid_images(1, 8, 0), "001.png",
                                         b"not a png"),
                 "001.png is not a readable image", id="broken-png"),
])
def test_fid_bad_inputs_fail_clearly(tmp_path, source, message):
    with pytest.raises(ValueError, match=message):
        fid_batches(source(tmp_path))


def test_fid_batch_size_must_be_positive():
    with pytest.raises(ValueError) as e:
        fid.image_batches(fid_images(2, 8, 0), 0)
    assert str(e.value) == "batch size must be a positive integer, got 0"


def test_fid_compute_features_prints_progress(capfd):
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return tuple(torch.zeros(len(x), d) for d in (2048, 2023, 1008))

    pool, spatial, logits = fid.compute_features(fid_images(5, 8, 0), Fake(), batch_size=2)
    assert pool.shape == (5, 2048) and spatial.shape == (5, 2023) and logits.shape == (5, 1008)
    err = capfd.readouterr().err
    lines = [line.split(",")[0] for line in err.split("\r")[1:]]
    assert lines == [f"inception features {i}/5" for i in (2, 4, 5)]
    assert err.endswith(" \n")


def test_fid_progress_line(monkeypatch, capsys):
    monkeypatch.setattr(fid.time, "time", lambda: 100.0)
    fid.print_progress("sampling step", 12, 50, 100.0 - 12 / 3.1)
    fid.print_progress("downloading x", 335.0, 335.0, 90.0, " MB")
    assert capsys.readouterr().err == ("\rsampling step 12/50, 3.10/s, ETA 0:00:12 "
                                       "\rdownloading x 335/335 MB, 33.50 MB/s, ETA 0:00:00 \n")


def viewer_rgb(gray=None, rgb=None, alpha=None):
    """The expected 8-bit RGB, computed here: gray or rgb in [0, 255] floats, alpha in [0, 1],
    over white."""
    x = np.repeat(gray[..., None], 3, -1) if gray is not None else rgb.astype(np.float64)
    a = np.ones(x.shape[:2] + (1,)) if alpha is None else alpha[..., None]
    return x * a + 255 * (1 - a)


U16 = np.array([[0, 1, 128, 257, 32767], [32768, 40000, 65279, 65534, 65535]], np.uint16)
U8 = np.random.default_rng(7).integers(0, 256, (2, 5, 3), dtype=np.uint8)
ALPHA = np.array([[0, 255, 128, 1, 254], [255, 0, 64, 200, 255]], np.uint8)
U16_AS_RGB = np.round(viewer_rgb(gray=U16 / 257)).astype(np.uint8)


def with_transparency(im, index):
    """im (a palette image) with palette entry index transparent."""
    im.info["transparency"] = index
    return im


# 5x2 images of the modes a folder of images may hold
MODE_IMAGES = {
    "I;16": lambda: Image.frombytes("I;16", (5, 2), U16.astype("<u2").tobytes()),
    "I;16B": lambda: Image.frombytes("I;16B", (5, 2), U16.astype(">u2").tobytes()),
    "I": lambda: Image.fromarray(U16.astype(np.int32)),
    "RGBA": lambda: Image.fromarray(np.dstack([U8, ALPHA])),
    "LA": lambda: Image.fromarray(np.dstack([U8[..., 0], ALPHA]), "LA"),
    "P": lambda: Image.fromarray(U8).quantize(4),
    "P_transparency": lambda: with_transparency(Image.fromarray(U8).quantize(4), 1),
    "CMYK": lambda: Image.fromarray(np.dstack([U8, U8[..., :1]])[..., :4], "CMYK"),
    "L": lambda: Image.fromarray(U8[..., 0]).convert("L"),
    "RGB": lambda: Image.fromarray(U8).convert("RGB"),
    "1": lambda: Image.fromarray(U8[..., 0]).convert("1"),
}


def to_rgb_array(im):
    """fid.to_rgb(im) as an (H, W, 3) array, checked to be a 5x2 RGB image."""
    out = fid.to_rgb(im)
    assert out.mode == "RGB" and out.size == (5, 2)
    return np.asarray(out)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_fid_to_rgb_scales_16_bit_gray_to_8_bits(mode):
    assert np.array_equal(to_rgb_array(MODE_IMAGES[mode]()), U16_AS_RGB)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparency"])
def test_fid_to_rgb_shows_transparency_over_white(mode):
    im = MODE_IMAGES[mode]()
    got = to_rgb_array(im)
    rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
    want = viewer_rgb(rgb=rgba[..., :3], alpha=rgba[..., 3] / 255)
    # Pillow's alpha_composite rounds in integers: within 1 of the exact blend
    assert np.abs(got - want).max() <= 1
    opaque, clear = rgba[..., 3] == 255, rgba[..., 3] == 0
    assert np.array_equal(got[opaque], rgba[..., :3][opaque].astype(np.uint8))
    assert (got[clear] == 255).all()


@pytest.mark.parametrize("mode", ["P", "CMYK", "L", "RGB", "1"])
def test_fid_to_rgb_of_plain_8_bit_images_is_convert_rgb(mode):
    im = MODE_IMAGES[mode]()
    # exactly what the official loaders' convert("RGB") gives
    assert np.array_equal(to_rgb_array(im), np.asarray(im.convert("RGB")))


def test_fid_folder_reads_16_bit_palette_and_alpha_pngs(tmp_path):
    ims = [MODE_IMAGES[m]() for m in ("I;16", "RGBA", "P_transparency", "LA", "L")]
    for i, im in enumerate(ims):
        im.save(tmp_path / f"{i}.png", **({"transparency": 1} if im.mode == "P" else {}))
    x = torch.cat(list(fid.image_batches(str(tmp_path), 2)[1]))
    assert x.shape == (5, 3, 2, 5) and x.dtype == torch.uint8
    # 16-bit gray scaled, not white; a transparent pixel white; the files round-trip through
    # to_rgb
    assert x[0, 0].tolist() == np.round(U16 / 257).astype(int).tolist()
    assert x[1, :, 0, 0].tolist() == [255, 255, 255]
    for i in range(5):
        expected = np.asarray(fid.to_rgb(Image.open(tmp_path / f"{i}.png")))
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), expected)


def not_finite(key, dtype="float64", path="{p}"):
    """fid.reference's message for a statistic of path that is not finite floats."""
    return (f"{path}: {key} is not finite floats (NaN, inf or {dtype}); compute the statistics "
            "again: fid.py REF --save-stats NPZ")


def missing_statistics(keys):
    """fid.reference's message for statistics without keys, for str.format(p=)."""
    return (f"{{p}} has statistics without {keys}; write all four with fid.py REF --save-stats "
            "NPZ")


@pytest.mark.parametrize("change, message", [
    pytest.param({"mu": np.array([0.0, np.nan, 0.0])}, not_finite("mu"), id="mu_nan"),
    pytest.param({"sigma": np.full((3, 3), np.inf)}, not_finite("sigma"), id="sigma_inf"),
    pytest.param({"mu_s": np.array([np.nan, 0.0])}, not_finite("mu_s"), id="mu_s_nan"),
    pytest.param({"sigma_s": -np.full((2, 2), np.inf)}, not_finite("sigma_s"),
                 id="sigma_s_minus_inf"),
    pytest.param({"mu": np.array(["a", "b", "c"])}, not_finite("mu", "<U1"), id="mu_text"),
    pytest.param({"mu_s": None}, missing_statistics("mu_s"), id="no_mu_s"),
    pytest.param({"sigma": None}, missing_statistics("sigma"), id="no_sigma"),
    pytest.param({"sigma": None, "mu_s": None, "sigma_s": None},
                 missing_statistics("sigma, mu_s, sigma_s"), id="mu_only"),
])
def test_fid_reference_refuses_bad_statistics(tmp_path, change, message):
    p = write_stats(tmp_path / "ref.npz", **change)
    with pytest.raises(ValueError) as e:
        fid.reference(str(p), None, 2)
    assert str(e.value) == message.format(p=p)


def flip_a_byte_of_arr_0(blob):
    """blob (an .npz file) with one image byte flipped: the zip's CRC check fails at the end of
    arr_0, which only reading the images reaches."""
    i = blob.index(b"arr_0.npy") + 200
    return blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]


def read_npz_as_reference(p):
    fid.reference(str(p), None, 2)


def read_npz_images(p):
    list(fid.image_batches(str(p), 2)[1])


@pytest.mark.parametrize("corrupt, readers", [
    pytest.param(lambda blob: blob[:len(blob) // 2], [read_npz_as_reference, read_npz_images],
                 id="truncated"),
    pytest.param(lambda blob: np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes(),
                 [read_npz_as_reference, read_npz_images], id="random_bytes"),
    pytest.param(lambda blob: b"", [read_npz_as_reference, read_npz_images], id="empty"),
    pytest.param(flip_a_byte_of_arr_0, [read_npz_images], id="bad_crc"),
])
def test_fid_corrupt_npz_is_named(tmp_path, corrupt, readers):
    p = tmp_path / "ref.npz"
    np.savez(p, fid_images(3, 8, 0).permute(0, 2, 3, 1).numpy())
    p.write_bytes(corrupt(p.read_bytes()))
    start = f"{p} is not a readable .npz file (truncated or corrupt: "
    end = "); write or download it again"
    for read in readers:
        with pytest.raises(ValueError) as e:
            read(p)
        assert str(e.value).startswith(start) and str(e.value).endswith(end)


@pytest.mark.parametrize("write", [
    pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    pytest.param(lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)
                                         .tobytes()), id="random_bytes"),
    pytest.param(lambda p: save({"fc.weight": torch.zeros(1008, 2048)}, p, keep=100_000),
                 id="truncated"),
    pytest.param(lambda p: save({"fc.weight": RunsCode(str(p.parent / "code_ran"))}, p),
                 id="runs_code"),
    pytest.param(lambda p: save(tiny_vae().state_dict(), p), id="another_model"),
    pytest.param(lambda p: save(torch.zeros(3), p), id="a_tensor"),
    pytest.param(lambda p: save({k: torch.zeros(1) for k in fid.InceptionV3().state_dict()}, p),
                 id="wrong_shapes"),
])
def test_fid_inception_bad_weights_file_is_named(tmp_path, write):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    write(path)
    with pytest.raises(ValueError) as e:
        fid.load_inception(str(path))
    assert str(e.value) == (f"{path} is not pt_inception-2015-12-05-6726825d.pth (empty, "
                            "truncated, corrupt, another model's weights or not only tensors); "
                            "delete it or pass that file")
    assert not (tmp_path / "code_ran").exists()


def test_fid_load_inception_uses_the_cache(fid_weights_file, tmp_path, monkeypatch):
    url = f"{closed_port_url()}/pt_inception-2015-12-05-6726825d.pth"
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIT_INCEPTION_URL", url)
    # nothing cached: the download is tried, and fails with what to do
    with pytest.raises(OSError) as e:
        fid.load_inception()
    path = tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth"
    assert str(e.value) == (f"cannot download {url} ({REFUSED}); put the file at {path}, or set "
                            "DIT_INCEPTION_URL to a mirror, or pass its path (fid.py --inception "
                            "PATH)")
    assert os.listdir(tmp_path) == []
    # the file put there is used, nothing downloaded
    path.parent.mkdir()
    os.symlink(fid_weights_file, path)
    assert isinstance(fid.load_inception(), fid.InceptionV3)


@pytest.mark.slow
def test_fid_load_inception_downloads_into_cache_dir(fid_inception, fid_weights_file, http_server,
                                                     tmp_path, monkeypatch):
    data = fid_weights_file.read_bytes()
    (http_server.root / "w.pth").write_bytes(data)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIT_CACHE", "")
    monkeypatch.setenv("DIT_INCEPTION_URL", f"{http_server.url}/w.pth")
    # the file served is not the official one: the sha256 check refuses it
    with pytest.raises(OSError, match=f'invalid hash value \\(expected "{fid.WEIGHTS_SHA256}"'):
        fid.load_inception()
    assert not (tmp_path / "home").exists()
    monkeypatch.setattr(fid, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())
    model = fid.load_inception()
    cached = tmp_path / "home" / ".cache" / "dit" / "pt_inception-2015-12-05-6726825d.pth"
    assert cached.read_bytes() == data and os.listdir(cached.parent) == [cached.name]
    assert torch.equal(model.fc.weight, fid_inception.fc.weight)


@pytest.mark.parametrize("name", ["cache_dir", "download", "download_retry", "print_progress"])
def test_fid_shared_helpers_are_the_same_text_in_every_copy(name):
    # one way for each chore: every standalone file that needs one holds the same text
    copies = {"cache_dir": (vae, dit), "download": (vae, dit), "download_retry": (vae, dit),
              "print_progress": (diffusion, dit, vae)}[name]
    for module in copies:
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(fid, name))


# download() and cache_dir() are the same text in fid.py, vae.py and dit.py (the test above):
# their behaviour is tested here, on fid.py's copy (cache_dir(): by
# test_fid_load_inception_downloads_into_cache_dir, DIT_CACHE empty, and by the tests that set it)

def test_fid_download_renames_its_temp_file(http_server, tmp_path):
    data = b"weights" * 1000
    (http_server.root / "w.pth").write_bytes(data)
    path = tmp_path / "a" / "b" / "w.pth"
    sha = hashlib.sha256(data).hexdigest()
    assert fid.download(f"{http_server.url}/w.pth", str(path), sha, mirror="MIRROR") == str(path)
    # renamed from its temp file, which is gone
    assert path.read_bytes() == data and os.listdir(path.parent) == ["w.pth"]


@pytest.mark.parametrize("url, reason", [
    pytest.param("{http}/w.pth", 'invalid hash value (expected "{zeros}", got "{sha}")',
                 id="sha256"),
    pytest.param("{http}/missing.pth", "HTTP Error 404: Not Found", id="404"),
    pytest.param("{ssh}/w.pth", SSH_BANNER.decode().strip(), id="not_http"),
    pytest.param("{closed}/w.pth", REFUSED, id="no_server"),
])
def test_fid_download_leaves_no_trace_on_failure(http_server, tcp_server, tmp_path, url, reason):
    data = b"weights" * 1000
    (http_server.root / "w.pth").write_bytes(data)
    names = dict(http=http_server.url, ssh=tcp_server(SSH_BANNER), closed=closed_port_url(),
                 zeros="0" * 64, sha=hashlib.sha256(data).hexdigest())
    url, reason = url.format(**names), reason.format(**names)
    path = tmp_path / "a" / "b" / "w.pth"
    with pytest.raises(OSError) as e:
        fid.download(url, str(path), "0" * 64, mirror="MIRROR")
    assert type(e.value) is OSError
    assert str(e.value) == (f"cannot download {url} ({reason}); put the file at {path}, or set "
                            "MIRROR to a mirror")
    # the folders made for it are gone (no temp file in them), the one that was there stays
    assert os.listdir(tmp_path) == ["www"]


def test_fid_download_keeps_folders_it_did_not_make(tmp_path):
    # an empty cache folder that was there, inside an empty one: both stay
    (tmp_path / "home" / "cache").mkdir(parents=True)
    url = f"{closed_port_url()}/w.pth"
    path = tmp_path / "home" / "cache" / "new" / "w.pth"
    with pytest.raises(OSError) as e:
        fid.download(url, str(path))
    assert str(e.value) == f"cannot download {url} ({REFUSED}); put the file at {path}"
    assert os.listdir(tmp_path / "home") == ["cache"]
    assert os.listdir(tmp_path / "home" / "cache") == []


# a server that promises 1000 bytes and sends 10, refused for its length before its sha256; a
# chunked reply cut inside a chunk (http.client's IncompleteRead, whose counts vary with the
# Python version); both are tried DOWNLOAD_TRIES times
@pytest.mark.parametrize("reply, sha256, reason", [
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n",
                 hashlib.sha256(b"x" * 1000).hexdigest(), re.escape("cut short: 10 of 1,000 bytes"),
                 id="content_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n", None,
                 r"IncompleteRead\(.*\)", id="chunked"),
])
def test_fid_download_stopped_transfer(tcp_server, tmp_path, fast_downloads, reply, sha256,
                                       reason):
    url = f"{tcp_server(reply + b'x' * 10)}/w"
    path = tmp_path / "c" / "w"
    with pytest.raises(OSError) as e:
        fid.download(url, str(path), sha256)
    expected = (re.escape(f"cannot download {url} (") + reason
                + re.escape(f"; {fid.DOWNLOAD_TRIES} tries); put the file at {path}"))
    assert re.fullmatch(expected, str(e.value))
    assert os.listdir(tmp_path) == []


def test_fid_save_stats_writes_through_one_temp_name(tmp_path, monkeypatch):
    """save_stats writes through stats.npz.<pid>.tmp and os.replace: a failing rename leaves
    nothing behind, and the temp file is complete when it is renamed."""
    target = tmp_path / "stats.npz"
    stats = (np.zeros(2), np.eye(2)) * 2
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        # the temp file is complete when it is renamed
        assert os.path.getsize(src) > 0
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        fid.save_stats(str(target), *stats)
    assert calls == [(f"{target}.{os.getpid()}.tmp", str(target))]
    # the temp file is removed, the target never written
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    fid.save_stats(str(target), *stats)
    assert os.listdir(tmp_path) == ["stats.npz"]


@pytest.mark.slow
def test_fid_cli_prints_evaluator_lines_and_saves_stats(fid_weights_file, tmp_path, monkeypatch,
                                                        capsys):
    np.savez(tmp_path / "ref.npz", fid_images(4, 16, 1).permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "gen.npz", fid_images(4, 16, 2).permute(0, 2, 3, 1).numpy())
    # sqrtm of 2048 x 2048 matrices takes minutes on 2 cores: record the FID calls instead
    calls = []

    def record(*a):
        calls.append(a)
        return float(len(calls))

    monkeypatch.setattr(fid, "frechet_distance", record)
    code, out, _ = run_cli(fid, monkeypatch, capsys, tmp_path / "ref.npz", tmp_path / "gen.npz",
                           "--inception", fid_weights_file, "--batch-size", 3,
                           "--save-stats", tmp_path / "stats.npz")
    assert code is None
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "sFID",
                                                      "Precision", "Recall"]
    stats = np.load(tmp_path / "stats.npz")
    assert sorted(stats.files) == ["mu", "mu_s", "sigma", "sigma_s"]
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
    (mu, sigma, ref_mu, ref_sigma), (_, _, ref_mu_s, _) = calls
    assert mu.shape == (2048,) and np.array_equal(ref_mu, stats["mu"])
    assert np.array_equal(ref_mu_s, stats["mu_s"])
    # a statistics-only reference: its stored statistics, no images for precision/recall
    (mu2, sigma2), (mu_s2, sigma_s2), pool3 = fid.reference(str(tmp_path / "stats.npz"), None, 2)
    assert pool3 is None and np.array_equal(mu2, stats["mu"])
    assert np.array_equal(sigma_s2, stats["sigma_s"])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no images"):
        fid.reference(str(tmp_path / "other.npz"), None, 2)


def too_few(path, n):
    """fid.py's message for a set of n images, too few."""
    return (f"{path} has {n} image(s); FID needs at least 2 per set, precision and recall 4 (the "
            "paper's numbers: 50,000)")


def fid_cli_check(tmp_path, monkeypatch, capsys, argv, message):
    """fid.py argv fails with "fid.py: error: message" and nothing else, before it loads (here:
    downloads) the weights, which would fail otherwise: nothing cached, no server."""
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIT_INCEPTION_URL", closed_port_url() + "/w.pth")
    code, out, err = run_cli(fid, monkeypatch, capsys, *argv)
    assert code == f"fid.py: error: {message}"
    assert (out, err) == ("", "")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "stats.npz").exists()


# {ref} and {gen} hold 5 images each before the case's files are written; {tmp} is tmp_path
@pytest.mark.parametrize("files, argv, message", [
    pytest.param({}, ["{tmp}/nope.npz", "{gen}"],
                 "{tmp}/nope.npz: expected an existing .npz file or a folder of images",
                 id="ref_missing"),
    pytest.param({}, ["{ref}", "{tmp}/nope"],
                 "{tmp}/nope: expected an existing .npz file or a folder of images",
                 id="generated_missing"),
    pytest.param({"ref.txt": lambda p: p.write_text("x")}, ["{tmp}/ref.txt", "{gen}"],
                 "{tmp}/ref.txt: expected an existing .npz file or a folder of images",
                 id="ref_not_npz"),
    pytest.param({}, ["{ref}", "{gen}", "--batch-size", "0"],
                 "batch size must be a positive integer, got 0", id="batch_size_0"),
    pytest.param({}, ["{ref}", "{gen}", "--batch-size", "-3"],
                 "batch size must be a positive integer, got -3", id="batch_size_negative"),
    pytest.param({}, ["{ref}", "{gen}", "--inception", "{tmp}/w.pth"],
                 "--inception {tmp}/w.pth: no such file; leave it out to download the weights",
                 id="inception_missing"),
    pytest.param({}, ["{ref}", "{gen}", "--save-stats", "{tmp}/no/stats.npz"],
                 "--save-stats {tmp}/no/stats.npz: its folder does not exist",
                 id="save_stats_folder_missing"),
    pytest.param({}, ["{ref}"], "give SAMPLES to evaluate against REF, or --save-stats NPZ",
                 id="nothing_to_do"),
    pytest.param({"samples.npz": lambda p: write_npz(p, 1)}, ["{ref}", "{gen}"],
                 too_few("{gen}", 1), id="one_generated"),
    pytest.param({"samples.npz": lambda p: write_npz(p, 3)}, ["{ref}", "{gen}"],
                 too_few("{gen}", 3), id="three_generated"),
    pytest.param({"ref.npz": lambda p: write_npz(p, 1)}, ["{ref}", "--save-stats",
                                                          "{tmp}/stats.npz"],
                 too_few("{ref}", 1), id="one_ref_image_save_stats"),
    pytest.param({"ref.npz": lambda p: write_stats(p, mu=np.array([np.nan, 0.0, 0.0]))},
                 ["{ref}", "{gen}"], not_finite("mu", path="{ref}"), id="nan_stats"),
    pytest.param({"ref.npz": lambda p: p.write_bytes(p.read_bytes()[:100])}, ["{ref}", "{gen}"],
                 "{ref} is not a readable .npz file (truncated or corrupt: File is not a zip "
                 "file); write or download it again", id="corrupt_ref"),
    pytest.param({"ref.npz": lambda p: np.savez(p, x=np.zeros(3))}, ["{ref}", "{gen}"],
                 "{ref} has no images (arr_0), only ['x']; ADM .npz files hold uint8 images "
                 "(N, H, W, 3) as arr_0: np.savez(path, images)", id="ref_without_images"),
])
def test_fid_cli_bad_input_fails_before_loading_weights(tmp_path, monkeypatch, capsys, files,
                                                        argv, message):
    write_npz(tmp_path / "ref.npz", 5)
    write_npz(tmp_path / "samples.npz", 5)
    for name, write in files.items():
        write(tmp_path / name)
    names = dict(tmp=tmp_path, ref=tmp_path / "ref.npz", gen=tmp_path / "samples.npz")
    argv = [a.format(**names) for a in argv]
    fid_cli_check(tmp_path, monkeypatch, capsys, argv, message.format(**names))


@pytest.mark.parametrize("device", ["bogus", "cuda:0"])
def test_fid_cli_unusable_device_fails_before_loading_weights(tmp_path, monkeypatch, capsys,
                                                              device):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # torch's own reason: the device types it knows, or that it has no CUDA
    with pytest.raises((RuntimeError, AssertionError)) as reason:
        torch.empty(0, device=device)
    argv = [write_npz(tmp_path / "ref.npz", 5), write_npz(tmp_path / "samples.npz", 5),
            "--device", device]
    fid_cli_check(tmp_path, monkeypatch, capsys, argv,
                  f"--device {device} is not usable ({reason.value}); pass --device cpu")


def test_fid_cli_stats_only_reference_needs_two_images_not_four(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    url = closed_port_url() + "/w.pth"
    monkeypatch.setenv("DIT_INCEPTION_URL", url)
    ref = write_stats(tmp_path / "stats.npz")
    gen = write_npz(tmp_path / "samples.npz", 2)
    # the checks pass: the weights are what fails here
    code, out, _ = run_cli(fid, monkeypatch, capsys, ref, gen)
    path = tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth"
    assert code == (f"fid.py: error: cannot download {url} ({REFUSED}); put the file at {path}, "
                    "or set DIT_INCEPTION_URL to a mirror, or pass its path (fid.py --inception "
                    "PATH)")
    assert out == ""


@pytest.mark.slow
def test_fid_cli_error_in_a_real_process_is_one_line(tmp_path):
    r = run_script("fid.py", tmp_path / "ref.npz", tmp_path / "s.npz")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"fid.py: error: {tmp_path / 'ref.npz'}: expected an existing .npz file "
                        "or a folder of images\n")


def test_fid_cli_help_shows_every_default(monkeypatch, capsys):
    code, out, _ = run_cli(fid, monkeypatch, capsys, "--help")
    text = " ".join(out.split())
    assert code == 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for flag, default in (("--batch-size", "50"), ("--device", device), ("--inception", "None"),
                          ("--save-stats", "None")):
        assert flag in text
        assert f"(default: {default})" in text.split(flag)[-1].split(" --")[0]

#################################################################################
#                                    dit.py                                     #
#################################################################################

@functools.lru_cache(maxsize=None)
def golden_dit():
    """golden.json's DiT-S/2 with the golden fill, built once: (model, its golden entry)."""
    g = GOLDEN["dit"]
    model = dit.DiT_models[g["model"]](input_size=g["input_size"], num_classes=g["num_classes"])
    model.eval()
    fill_(model.state_dict(), g["weights_seed"])
    return model, g


def tiny_dit(**kwargs):
    return dit.DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                   num_classes=10, **kwargs)


def test_dit_state_dict_matches_official_names_and_shapes():
    model, g = golden_dit()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == g["state_dict_keys"]
    # same order too
    assert list(model.state_dict()) == list(g["state_dict_keys"])


def test_dit_forward_matches_official():
    model, g = golden_dit()
    x = randn(g["x_shape"], g["x_seed"])
    with torch.no_grad():
        out = model(x, torch.tensor(g["t"]), torch.tensor(g["y"]))
    assert_summary(out, g["forward"])


def test_dit_forward_with_cfg_matches_official():
    model, g = golden_dit()
    c = g["cfg"]
    x = randn(g["x_shape"], g["x_seed"])[:1].repeat(2, 1, 1, 1)
    t, y = torch.tensor(c["t"]), torch.tensor(c["y"])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, c["cfg_scale"])
        plain = model(x, t, y)
        all_channels = model.forward_with_cfg(x, t, y, 4.0, cfg_channels=None)
    assert_summary(out, c["forward_with_cfg"])
    # Guiding all channels: every epsilon channel is guided, the variance channels pass through.
    guided = plain[1] + 4.0 * (plain[0] - plain[1])
    assert torch.allclose(all_channels[0, :4], guided[:4], atol=1e-5)
    assert torch.allclose(all_channels[1, :4], guided[:4], atol=1e-5)
    assert torch.allclose(all_channels[:, 4:], plain[:, 4:])
    # official default: the 4th channel is not guided
    assert torch.allclose(out[:, 3:4], plain[:, 3:4])


OFFICIAL_INIT = {"sum": 3461.3478871532316, "abs_sum": 647357.651059503,
                 "next_randn": [0.2871421277523041, -0.43598416447639465, 0.8889198303222656]}


def test_dit_init_consumes_rng_like_official():
    # Computed with the official models.py (timm 1.0, torch 2.14): torch.manual_seed(0), then
    # DiT_models["DiT-S/2"](input_size=8, num_classes=10), then torch.randn(3).
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-S/2"](input_size=8, num_classes=10)
    sd = model.state_dict()
    total = sum(v.double().sum().item() for v in sd.values())
    abs_total = sum(v.double().abs().sum().item() for v in sd.values())
    assert total == pytest.approx(OFFICIAL_INIT["sum"], rel=1e-12)
    assert abs_total == pytest.approx(OFFICIAL_INIT["abs_sum"], rel=1e-12)
    assert torch.randn(3).tolist() == pytest.approx(OFFICIAL_INIT["next_randn"], abs=1e-7)


def test_dit_bf16_autocast_matches_fp32():
    # Training under CPU autocast runs the attention as plain matmuls (faster backward), sampling
    # through SDPA: both must be the same function as fp32.
    model, g = golden_dit()
    x, t, y = randn(g["x_shape"], g["x_seed"]), torch.tensor(g["t"]), torch.tensor(g["y"])
    with torch.no_grad():
        ref = model(x, t, y)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            out = model(x, t, y).float().detach()
        assert (out - ref).norm() / ref.norm() < 0.02


# Table 4 of the paper, 256x256 images
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56,
    "DiT-B/2": 23.01, "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39,
    "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}


def test_dit_gflops_reproduce_paper_table():
    for name, ref in PAPER_GFLOPS.items():
        with torch.device("meta"):
            model = dit.DiT_models[name]()
        assert model.gflops() == pytest.approx(ref, rel=0.01), name
    for block, ref in [("in-context", 119.4), ("cross-attention", 137.6), ("adaLN", 118.6),
                       ("adaLN-Zero", 118.6)]:
        with torch.device("meta"):
            model = dit.DiT_models["DiT-XL/2"](block=block)
        assert model.gflops() == pytest.approx(ref, rel=0.01), block


def test_dit_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-S/4"](input_size=8, num_classes=10)
    x, c = torch.randn(2, 4, 384), torch.randn(2, 384)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert torch.equal(out, torch.zeros(2, 8, 8, 8))


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_dit_every_block_design_learns(block):
    """25 AdamW steps on one batch (fixed t and noise): the training loss falls by half or more."""
    torch.manual_seed(0)
    model = dit.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10, block=block)
    assert model.gflops() > 0
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    noise = torch.randn_like(x)
    d = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    losses = []
    for _ in range(25):
        loss = d.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    # every parameter got a finite gradient
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert model(x, t, y).shape == (4, 8, 8, 8)


def test_dit_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny_dit(class_dropout_prob=0)
    # leave the zero init so that gradients flow everywhere
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_dit_create_dit_overrides_a_preset():
    with torch.device("meta"):
        model = dit.create_dit("DiT-S/4", depth=3, input_size=8, block="adaLN")
    assert model.config["depth"] == 3 and model.config["hidden_size"] == 384
    assert model.config["patch_size"] == 4 and model.block == "adaLN"


@pytest.mark.parametrize("model, overrides, message", [
    pytest.param("DiT-S/4", {"dept": 3}, "DiT has no argument dept; it takes input_size, ",
                 id="unknown-argument"),
    pytest.param("DiT-Q/2", {}, "unknown model 'DiT-Q/2'; choose one of DiT-XL/2",
                 id="unknown-model"),
    pytest.param("DiT-S/4", {"num_heads": 5}, "hidden_size 384 is not divisible by num_heads 5",
                 id="heads"),
])
def test_dit_create_dit_names_bad_arguments(model, overrides, message):
    with pytest.raises(ValueError, match=message):
        dit.create_dit(model, **overrides)


def test_dit_config_rebuilds_the_model():
    torch.manual_seed(0)
    model = dit.create_dit("DiT-S/8", input_size=16, depth=2, class_dropout_prob=0.0,
                           block="in-context")
    again = dit.DiT(**model.config)
    again.load_state_dict(model.state_dict())
    assert again.config == model.config


def test_dit_cfg_interval_guides_only_inside_lo_hi():
    torch.manual_seed(0)
    model = dit.DiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=4)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model.eval()
    z = torch.randn(4, 4, 8, 8)
    x = torch.cat([z, z])
    y = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4])
    # t = lo is outside, lo + 1 and hi inside, hi + 1 outside
    t = torch.tensor([100, 101, 600, 601] * 2)
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, 4.0, cfg_channels=None)
        limited = model.forward_with_cfg(x, t, y, 4.0, cfg_channels=None, cfg_interval=(100, 600))
        plain = model(x, t, y)
    inside = torch.tensor([False, True, True, False] * 2)
    assert torch.equal(limited[inside], guided[inside])
    # outside the interval both halves get the conditional prediction
    cond = plain[:4][~inside[:4], :4]
    assert torch.equal(limited[~inside][:, :4], torch.cat([cond, cond]))
    assert not torch.allclose(guided[~inside], limited[~inside])


def test_dit_find_model_loads_raw_and_run_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = tiny_dit()
    fill_(model.state_dict(), 1)
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    # the official train.py layout, args as a Namespace
    run_ckpt = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {},
                "args": argparse.Namespace(model="DiT-S/8")}, run_ckpt)
    other = tiny_dit()
    other.load_state_dict(dit.find_model(str(raw)))
    pairs = zip(model.state_dict().values(), other.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    other.load_state_dict(dit.find_model(str(run_ckpt)))
    assert all(torch.equal(a, ema[k]) for k, a in other.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no DiT checkpoint"):
        dit.find_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("write, message", [
    pytest.param(lambda p: p.write_bytes(b""), "empty, truncated or not a PyTorch file",
                 id="empty"),
    pytest.param(lambda p: p.write_bytes(os.urandom(2000)),
                 "empty, truncated or not a PyTorch file", id="random-bytes"),
    pytest.param(lambda p: save({"a": RunsCode(str(p.parent / "code_ran"))}, p),
                 "holds pickled Python objects, which are never loaded", id="pickled-code"),
    pytest.param(lambda p: save(torch.zeros(3), p), "holds no weights (a Tensor)", id="a-tensor"),
])
def test_dit_load_checkpoint_refuses_foreign_files(tmp_path, write, message):
    path = tmp_path / "x.pt"
    write(path)
    with pytest.raises(ValueError) as e:
        dit.find_model(str(path))
    assert message in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "code_ran").exists()


def test_dit_mismatched_checkpoint_error_names_both_models():
    with torch.device("meta"):
        xl, b = dit.DiT_models["DiT-XL/2"](), dit.DiT_models["DiT-B/2"]()
        pixel = dit.create_dit("DiT-S/4", input_size=32, in_channels=3, num_classes=10)
        latent = dit.create_dit("DiT-S/4", input_size=32, num_classes=10)
    with pytest.raises(ValueError) as e:
        b.load_state_dict(xl.state_dict())
    msg = str(e.value)
    assert "depth 28, hidden 1152" in msg and "DiT-XL/2" in msg and "you built DiT-B/2" in msg
    # pixel models say pixels
    with pytest.raises(ValueError) as e:
        latent.load_state_dict(pixel.state_dict())
    msg = str(e.value)
    assert "checkpoint has DiT-S/4 (depth 12, hidden 384, patch 4) on 32x32 pixels" in msg
    assert ("you built DiT-S/4 (depth 12, hidden 384, patch 4) on 32x32 latents (256x256 images"
            in msg)


def test_dit_find_model_downloads_official_names_once(http_server, tmp_path, monkeypatch):
    model = tiny_dit()
    (http_server.root / "DiT").mkdir()
    torch.save(model.state_dict(), http_server.root / "DiT" / "DiT-XL-2-256x256.pt")
    url = http_server.url + "/DiT"
    monkeypatch.setenv("DIT_WEIGHTS_URL", url)
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "new" / "cache"))
    # not on the server: fails with what to do, and makes no cache folder
    with pytest.raises(OSError) as e:
        dit.find_model("DiT-XL-2-512x512.pt")
    assert str(e.value) == (f"cannot download {url}/DiT-XL-2-512x512.pt (HTTP Error 404: Not "
                            f"Found); put the file at {tmp_path}/new/cache/DiT-XL-2-512x512.pt, "
                            "or set DIT_WEIGHTS_URL to a mirror")
    assert not (tmp_path / "new").exists()
    for _ in range(2):
        sd = dit.find_model("DiT-XL-2-256x256.pt")
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    # the second call reads the cache
    assert http_server.log == ["GET /DiT/DiT-XL-2-512x512.pt", "GET /DiT/DiT-XL-2-256x256.pt"]
    # no temp files left behind
    assert os.listdir(tmp_path / "new" / "cache") == ["DiT-XL-2-256x256.pt"]

#################################################################################
#                                 diffusion.py                                  #
#################################################################################

def fixed_output_model(out):
    return lambda x, t, **kwargs: out


def toy_model(x, t):
    tt = (t.double() / 1000).float().view(-1, 1, 1, 1)
    return torch.cat([0.5 * torch.tanh(x) + 0.1 * tt, torch.tanh(0.3 * x - 0.2)], dim=1)


def eps_model(x, t):
    """A 4-channel epsilon model (no learned sigma) whose output changes with x and t."""
    return 0.5 * torch.tanh(x) + 0.3 * torch.cos(x + t.double().view(-1, 1, 1, 1).float() / 100)


def recording(model, calls):
    """The model, also recording each call's (x, t) in calls."""
    def wrapped(x, t, **kwargs):
        calls.append((x.clone(), t.clone()))
        return model(x, t, **kwargs)
    return wrapped


def test_diffusion_hybrid_losses_match_official():
    g = GOLDEN["diffusion"]["training_losses"]
    d = create_diffusion("")
    x_start, noise = randn(g["shape"], g["x_start_seed"]), randn(g["shape"], g["noise_seed"])
    out = randn([g["shape"][0], 2 * g["shape"][1]] + g["shape"][2:], g["model_output_seed"])
    terms = d.training_losses(fixed_output_model(out), x_start, torch.tensor(g["t"]), noise=noise)
    for key in ("mse", "vb", "loss"):
        assert terms[key].tolist() == pytest.approx(g[key], rel=1e-5), key


def test_diffusion_noising_and_p_mean_variance_match_official():
    g = GOLDEN["diffusion"]
    gl = g["training_losses"]
    d = create_diffusion("")
    x_start, noise = randn(gl["shape"], gl["x_start_seed"]), randn(gl["shape"], gl["noise_seed"])
    out = randn([4, 8, 8, 8], gl["model_output_seed"])
    t = torch.tensor(gl["t"])
    x_t = d.q_sample(x_start, t, noise=noise)
    assert_summary(x_t, g["q_sample"])
    pmv = d.p_mean_variance(fixed_output_model(out), x_t, t, clip_denoised=False)
    for key in ("mean", "log_variance", "pred_xstart"):
        assert_summary(pmv[key], g["p_mean_variance"][key])


@pytest.mark.parametrize("spacing", ["250", "25", "ddim50", "10,10,5"])
def test_diffusion_respacing_matches_official(spacing):
    g = GOLDEN["diffusion"]["respacing"][spacing]
    d = create_diffusion(spacing)
    assert d.timestep_map == g["timestep_map"] and d.num_timesteps == len(g["timestep_map"])
    assert d.betas.sum().item() == pytest.approx(g["betas_sum"], rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(g["betas_last"], rel=1e-12)


@pytest.mark.parametrize("key, loop", [("ddpm:10", "p_sample_loop"),
                                       ("ddim:ddim10", "ddim_sample_loop")],
                         ids=["ddpm:10", "ddim:ddim10"])
def test_diffusion_sampling_loops_match_official(key, loop):
    g = GOLDEN["diffusion"]["sampling"][key]
    d = create_diffusion(key.split(":")[1])
    torch.manual_seed(g["torch_manual_seed"])
    z = torch.randn(*g["shape"])
    x = getattr(d, loop)(toy_model, z.shape, noise=z, clip_denoised=True, device="cpu")
    assert_summary(x, g["final"])


def test_diffusion_cosine_schedule_and_fixed_variances():
    d = create_diffusion("", noise_schedule="cosine", learn_sigma=False, sigma_small=True)
    assert d.betas.max().item() <= 0.999 and d.var_type == "fixed_small"
    assert d.alphas_cumprod[-1].item() < 1e-4 < d.alphas_cumprod[0].item()
    x = torch.randn(2, 4, 4, 4)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 999]))
    assert set(terms) == {"loss", "mse"}
    large = create_diffusion("10", learn_sigma=False)
    out = large.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([9, 9]))
    assert torch.allclose(out["variance"], large.betas[9].float().expand_as(x))
    kl = create_diffusion("", use_kl=True)
    assert kl.training_losses(toy_model, x, torch.tensor([3, 900]))["loss"].shape == (2,)


@pytest.mark.parametrize("spacing, message", [
    ("2000", "cannot take 2000 sampling steps out of 1000 training steps; ask for at most 1000"),
    ("ddim2000", "cannot take exactly 2000 DDIM steps out of 1000"),
    ("0", "keeps no steps; ask for at least 1"),
    ("ddim0", "keeps no steps"),
    ("400,400,400", r"out of 334 training steps \(section 1 of 3\); ask for at most 334"),
    ("abc", "bad timestep respacing 'abc'; use e.g."),
    ("-5", "bad timestep respacing"),
], ids=["2000", "ddim2000", "0", "ddim0", "400,400,400", "abc", "-5"])
def test_diffusion_bad_respacing_raises_clear_error(spacing, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(spacing)


def assert_sum_and_proj8(x, ref):
    """The DPM-Solver++ goldens' own check (see their "about"): the sum and the 8 projections
    within 1e-4 * sqrt(sq_sum) of the golden summary."""
    assert list(x.shape) == ref["shape"]
    x = x.double().flatten()
    tol = 1e-4 * ref["sq_sum"] ** 0.5
    assert abs(x.sum().item() - ref["sum"]) < tol, "sum"
    for k, (proj, p) in enumerate(zip(projections(x), ref["proj8"])):
        assert abs(proj - p) < tol, f"proj8[{k}]"


def toy_sampling(g, z):
    """(model, noise, model_kwargs) of golden.json's toy DPM-Solver++ entries."""
    return toy_model, z, {}


def dit_cfg_sampling(g, z):
    """(model, noise, model_kwargs) of its DiT entries: classifier-free guidance as sample.py, the
    batch [z, z] with labels [y, null]."""
    golden, _ = golden_dit()
    y = torch.tensor(g["labels"])
    y = torch.cat([y, torch.full_like(y, g["num_classes"])])
    return golden.forward_with_cfg, torch.cat([z, z]), dict(y=y, cfg_scale=g["cfg_scale"])


# golden.json's "dpm_solver" entries, with test ids that name no other file
DPM_GOLDEN = [pytest.param("toy_10", toy_sampling, id="toy_10"),
              pytest.param("toy_20", toy_sampling, id="toy_20"),
              pytest.param("dit_s2_cfg_8steps", dit_cfg_sampling, id="S2_cfg_8steps"),
              pytest.param("dit_s2_cfg", dit_cfg_sampling, id="S2_cfg", marks=pytest.mark.slow)]


@pytest.mark.parametrize("key, sampling", DPM_GOLDEN)
def test_diffusion_dpm_solver_matches_diffusers(key, sampling):
    g = GOLDEN["dpm_solver"][key]
    d = create_diffusion("")
    z = randn(g["noise_shape"], g["noise_seed"])
    calls = []
    model, noise, kwargs = sampling(g, z)
    model = recording(model, calls)
    x = d.dpm_solver_sample_loop(model, noise.shape, noise, num_steps=g["num_steps"],
                                 model_kwargs=kwargs, device="cpu")
    assert_sum_and_proj8(x[: len(z)], g["result"])
    # the model is called once per step with the integer timestep, repeated over the batch
    assert [t.tolist() for _, t in calls] == [[s] * len(noise) for s in g["timesteps"]]
    assert all(t.dtype == torch.int64 for _, t in calls)


@pytest.mark.parametrize("key", ["toy_10", "toy_20"])
def test_diffusion_dpm_solver_x0_prediction_matches_diffusers(key):
    # predict_xstart=True: the model's output is x0 itself (diffusers' prediction_type="sample")
    g = GOLDEN["dpm_solver_x0"][key]
    z = randn(g["noise_shape"], g["noise_seed"])
    for learn_sigma in (False, True):
        d = create_diffusion("", predict_xstart=True, learn_sigma=learn_sigma)
        calls = []
        x = d.dpm_solver_sample_loop(recording(toy_model, calls), z.shape, z,
                                     num_steps=g["num_steps"], device="cpu")
        assert_sum_and_proj8(x, g["result"])
        assert [t[0].item() for _, t in calls] == g["timesteps"]


def test_diffusion_unsupported_mean_type_is_refused():
    betas = diffusion.get_named_beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="mean_type 'v' is unsupported; use 'epsilon' or 'x_s"):
        diffusion.GaussianDiffusion(betas, mean_type="v")


def test_diffusion_dpm_solver_timesteps_are_diffusers_linspace():
    d = create_diffusion("")
    for g in [v for k, v in GOLDEN["dpm_solver"].items() if k != "about"]:
        assert d.dpm_solver_timesteps(g["num_steps"]) == g["timesteps"]
    # numpy.linspace(0, 999, n + 1).round() reversed, without 0: 499.5 rounds to even
    assert d.dpm_solver_timesteps(1) == [999]
    assert d.dpm_solver_timesteps(2) == [999, 500]
    assert d.dpm_solver_timesteps(26)[:3] == [999, 961, 922]


def test_diffusion_dpm_solver_steps_by_hand():
    # First step: DPM-Solver-1 = DDIM; middle steps: the paper's 2M update; last step: first
    # order to sigma = 0, i.e. the model's x0 (second order is undefined there: h is infinite).
    d = create_diffusion("")
    abar = d.alphas_cumprod
    z = randn((2, 4, 4, 4), 5)
    calls = []
    model = recording(eps_model, calls)
    out = d.dpm_solver_sample_loop(model, z.shape, z, num_steps=6, device="cpu")
    xs = [x.double() for x, _ in calls] + [out.double()]
    ts = [t[0].item() for _, t in calls]
    eps = [eps_model(x, t).double() for x, t in calls]
    alpha = [abar[t].sqrt().item() for t in ts]
    sigma = [(1 - abar[t]).sqrt().item() for t in ts]
    x0 = [(x - s * e) / a for x, e, a, s in zip(xs, eps, alpha, sigma)]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())

    # first step: DDIM (eta 0) from ts[0] to ts[1]
    assert close(xs[1], alpha[1] * x0[0] + sigma[1] * eps[0])
    # middle steps (Lu et al. 2022, Algorithm 2): D = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1}
    for i in range(1, 5):
        h = lam[i + 1] - lam[i]
        r = (lam[i] - lam[i - 1]) / h
        D = (1 + 1 / (2 * r)) * x0[i] - 1 / (2 * r) * x0[i - 1]
        expected = sigma[i + 1] / sigma[i] * xs[i] - alpha[i + 1] * (math.exp(-h) - 1) * D
        assert close(xs[i + 1], expected), i
    # last step: the predicted x0 itself, nothing of the previous x0 (100x the tolerance away)
    assert close(out.double(), x0[5])
    assert (x0[5] - x0[4]).abs().max() > 100 * 1e-5 * x0[5].abs().max()


def test_diffusion_dpm_solver_one_step_and_clipping():
    d = create_diffusion("")
    z = randn((2, 4, 4, 4), 6)
    t = torch.full((2,), 999)
    x0 = (z - (1 - d.alphas_cumprod[999]).sqrt().item() * toy_model(z, t)[:, :4])
    x0 = x0 / d.alphas_cumprod[999].sqrt().item()
    out = d.dpm_solver_sample_loop(toy_model, z.shape, z, num_steps=1, device="cpu")
    assert torch.allclose(out, x0, rtol=1e-6, atol=1e-6 * x0.abs().max().item())
    assert x0.abs().max() > 1
    clipped = d.dpm_solver_sample_loop(toy_model, z.shape, z, num_steps=1, clip_denoised=True)
    assert torch.equal(clipped, out.clamp(-1, 1))
    assert clipped.abs().max() <= 1
    # noise=None draws torch.randn(*shape): the same seed gives the same draws
    torch.manual_seed(0)
    a = d.dpm_solver_sample_loop(toy_model, (1, 4, 2, 2), num_steps=3)
    torch.manual_seed(0)
    b = d.dpm_solver_sample_loop(toy_model, (1, 4, 2, 2), num_steps=3)
    assert torch.equal(a, b) and a.shape == (1, 4, 2, 2)


def test_diffusion_dpm_solver_1000_steps_stay_finite():
    # linspace(0, 999, 1001).round() repeats 500: h = 0 there, and diffusers' next step divides
    # by 0
    d = create_diffusion("")
    ts = d.dpm_solver_timesteps(1000)
    assert len(ts) == 1000 and len(set(ts)) == 999
    out = d.dpm_solver_sample_loop(eps_model, (1, 4, 2, 2), randn((1, 4, 2, 2), 7), num_steps=1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spacing, loop, kwargs", [
    pytest.param("4", "p_sample_loop", {}, id="ddpm"),
    pytest.param("ddim4", "ddim_sample_loop", {}, id="ddim"),
    pytest.param("", "dpm_solver_sample_loop", {"num_steps": 4}, id="dpm-solver"),
])
def test_diffusion_sampling_loops_print_progress(capsys, spacing, loop, kwargs):
    getattr(create_diffusion(spacing), loop)(toy_model, (1, 4, 2, 2), progress=True, **kwargs)
    err = capsys.readouterr().err
    # the shared progress line (fid.progress's text, tested there): each step, then a newline
    assert re.findall(r"\rsampling step (\d)/4, ", err) == ["1", "2", "3", "4"]
    assert re.search(r"\rsampling step 4/4, [\d,.]+/s, ETA \d+:\d\d:\d\d \n$", err)


@pytest.mark.parametrize("num_steps", [0, -1, 1001, 2.5, "20"],
                         ids=["0", "-1", "1001", "2.5", "string-20"])
def test_diffusion_dpm_solver_rejects_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="takes 1 to 1000"):
        create_diffusion("").dpm_solver_sample_loop(toy_model, (1, 4, 2, 2), num_steps=num_steps)


def test_diffusion_dpm_solver_needs_the_full_1000_step_schedule():
    with pytest.raises(ValueError, match=re.escape('create_diffusion("")')):
        create_diffusion("250").dpm_solver_sample_loop(toy_model, (1, 4, 2, 2), num_steps=10)

#################################################################################
#                                     vae.py                                    #
#################################################################################

def vae_outputs(m, seed=3):
    """Encode mean/logvar and decode of fixed inputs: enough to tell two VAEs apart."""
    f, c = m.downsample_factor, m.config["latent_channels"]
    x, z = randn((2, 3, 4 * f, 4 * f), seed).clamp(-1, 1), randn((2, c, 4, 4), seed + 1)
    with torch.no_grad():
        p = m.encode(x)
        return p.mean, p.logvar, m.decode(z)


def assert_same_vae(a, b):
    for u, v in zip(vae_outputs(a), vae_outputs(b)):
        assert torch.equal(u, v)


def sha_lines(lines):
    return hashlib.sha256(("\n".join(sorted(lines)) + "\n").encode()).hexdigest()


def to_ldm_name(k, levels):
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.",
               k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", k)
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace(".resnets.", ".block.")
    for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                 ("to_out.0", "proj_out"), ("downsamplers.0", "downsample"),
                 ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"),
                 ("conv_norm_out", "norm_out")):
        k = k.replace(f".{a}.", f".{b}.")
    return k


def to_ldm(sd, levels):
    return {to_ldm_name(k, levels): v[:, :, None, None] if ".attentions." in k and v.dim() == 2
            else v for k, v in sd.items()}


def to_legacy(sd):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\."
    return {re.sub(pattern, lambda m: f"attentions.0.{names[m[1]]}.", k): v for k, v in sd.items()}


def full_sd_checkpoint(sd, levels):
    """A full SD checkpoint holding sd: Lightning wrapper, LDM names under first_stage_model.,
    UNet, loss, EMA."""
    full = {"first_stage_model." + k: v for k, v in to_ldm(sd, levels).items()}
    full.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
                 "loss.logvar": torch.zeros(1), "model_ema.decay": torch.tensor(0.999),
                 "cond_stage_model.x": torch.zeros(1)})
    return {"state_dict": full, "global_step": 3}


# the weights files users have: (name in diffusers' folder layout, content from the state dict
# and the number of levels)
VAE_FORMATS = {
    "diffusers": ("diffusion_pytorch_model.safetensors", lambda sd, levels: sd),
    # the released sd-vae-ft-* files
    "legacy": ("diffusion_pytorch_model.safetensors", lambda sd, levels: to_legacy(sd)),
    "ldm": ("diffusion_pytorch_model.safetensors", to_ldm),
    "bin": ("diffusion_pytorch_model.bin", lambda sd, levels: sd),
    "sd_ckpt": ("diffusion_pytorch_model.bin", full_sd_checkpoint),
}


def write_format(m, fmt, directory):
    """Save m's weights in one of VAE_FORMATS, in diffusers' directory layout; returns the
    directory."""
    name, content = VAE_FORMATS[fmt]
    os.makedirs(directory, exist_ok=True)
    # tiny config: groups cannot be inferred
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(m.config, f)
    write = write_safetensors if name.endswith(".safetensors") else torch.save
    write(content(m.state_dict(), len(m.config["block_out_channels"])), directory / name)
    return directory


def vae_folder(folder, config=None, weights=None):
    """tiny_vae() in diffusers' layout in folder (write_format); its config.json updated by the
    dict config or replaced by the bytes config, its weights by weights(its state dict). Returns
    folder."""
    m = tiny_vae()
    write_format(m, "diffusers", folder)
    if isinstance(config, bytes):
        (folder / "config.json").write_bytes(config)
    elif config:
        (folder / "config.json").write_text(json.dumps({**m.config, **config}))
    if weights:
        write_safetensors(weights(m.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    return folder


def st_bytes(entries, data, header_extra=None):
    """safetensors bytes from a header dict and raw data, written by hand (no writer involved)."""
    head = json.dumps({**entries, **(header_extra or {})}).encode()
    return struct.pack("<Q", len(head)) + head + data


def publish(routes, repo, m, tmp_path, sha=None, weights="safetensors", redirect=True, etag=None,
            weak=False, sent=None):
    """Serve m as the Hub does: config.json directly (its ETag a git sha1), the weights through a
    302 to a CDN that carries X-Linked-Etag (the sha256: sha, by default the file's, none if "";
    weak: in the Hub's weak form W/"SHA256"), or with redirect=False directly. With sent, only
    the first sent bytes of the weights come (Content-Length promises them all). Returns the
    weights file's bytes."""
    d = tmp_path / "published"
    write_vae_folder(m, d)
    if weights == "bin":
        torch.save(m.state_dict(), d / "w.bin")
    weights_file = "w.bin" if weights == "bin" else "diffusion_pytorch_model.safetensors"
    body = (d / weights_file).read_bytes()
    config = (d / "config.json").read_bytes()
    routes[f"/{repo}/resolve/main/config.json"] = (200, {"ETag": '"%s"' % ("a" * 40)}, config)
    linked = {}
    if sha != "":
        sha = sha or hashlib.sha256(body).hexdigest()
        linked = {"X-Linked-Etag": 'W/"%s"' % sha.upper() if weak else '"%s"' % sha}
    path = f"/{repo}/resolve/main/diffusion_pytorch_model.{weights}"
    length = {"Content-Length": str(len(body))}
    if redirect:
        routes[path] = (302, {"Location": f"/cdn/{repo}/blob", **linked}, b"")
        routes[f"/cdn/{repo}/blob"] = (200, {"ETag": '"not-a-sha256"', **length}, body[:sent])
    else:
        routes[path] = (200, {**linked, **({"ETag": etag} if etag else {}), **length}, body[:sent])
    return body


def advice(repo):
    """vae.py's advice when repo cannot be fetched; {tmp} stands for tmp_path."""
    folder = os.path.join("{tmp}", "dit_cache", repo.replace("/", "--"), "main")
    return (f"put its config.json and diffusion_pytorch_model.safetensors in {folder}{os.sep}, or "
            "set HF_ENDPOINT to a mirror, or pass a local folder or file")


@pytest.fixture(scope="module")
def golden_vae():
    """golden.json's SD VAE (full size) with the golden fill: (model, its golden entry)."""
    gold = GOLDEN["vae"]
    skip = ("down_block_types", "up_block_types", "act_fn")
    cfg = {k: v for k, v in gold["config"].items() if k not in skip}
    m = vae.AutoencoderKL(**cfg).eval()
    fill_(m.state_dict(), gold["weights_seed"])
    return m, gold


def test_vae_golden_encode_decode(golden_vae):
    m, gold = golden_vae
    assert m.scaling_factor == 0.18215 and m.shift_factor == 0.0 and m.downsample_factor == 8
    with torch.no_grad():
        post = m.encode(randn((2, 3, 32, 32), gold["x_seed"]).clamp(-1, 1))
        assert_summary(post.mean, gold["encode_mean"])
        assert_summary(post.logvar, gold["encode_logvar"])
        assert_summary(m.decode(randn(gold["z_shape"], gold["z_seed"])), gold["decode"])


def test_vae_key_names_and_formats_match_released_files(golden_vae):
    m, _ = golden_vae
    sd = m.state_dict()
    # sha256 of the sorted lines of the golden set's
    # sd_vae_{diffusers_keys,ldm_keys,diffusers_to_ldm_map}.txt
    assert sha_lines(f"{k}\t{list(v.shape)}\t{v.dtype}" for k, v in sd.items()) == \
        "ae6ea27db2d87a856118dc4d08b545375b859599611c3a3095bae004af8fd560" and len(sd) == 248
    ldm = to_ldm(sd, 4)
    assert sha_lines(f"{k}\t{list(v.shape)}" for k, v in ldm.items()) == \
        "843ce3c02f1944699ad11911fbac752ef467efa18053d3a51dbe761d78a37fd3"
    assert sha_lines(f"{k}\t{to_ldm_name(k, 4)}" for k in sd) == \
        "48473b6e680dfdaa5857fe3c4cd30567cdb86dfea5df6509809c07318f3e7459"
    for other in (ldm, to_legacy(sd), {"first_stage_model." + k: v for k, v in ldm.items()}):
        back = vae.convert_state_dict(other)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("fmt", VAE_FORMATS)
def test_vae_loads_every_key_format_identically(tmp_path, fmt):
    m = tiny_vae()
    loaded = vae.load_vae(write_format(m, fmt, tmp_path / fmt))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_vae(m, loaded)


def test_vae_single_file_infers_config_flux_style(tmp_path):
    # FLUX.1/SD3-style: 16 latent channels, no quant convs; a lone weights file (no config.json)
    m = tiny_vae(block_out_channels=(32, 64, 64), norm_num_groups=32, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False)
    assert not any("quant_conv" in k for k in m.state_dict())
    path = str(tmp_path / "ae.safetensors")
    write_safetensors(to_ldm(m.state_dict(), 3), path)
    loaded = vae.load_vae(path)
    assert loaded.config["block_out_channels"] == [32, 64, 64]
    assert loaded.config["latent_channels"] == 16
    # no config: SD default
    assert loaded.downsample_factor == 4 and loaded.scaling_factor == 0.18215
    assert_same_vae(m, loaded)
    # a lone full SD checkpoint (.ckpt)
    m = tiny_vae(norm_num_groups=32, layers_per_block=2)
    torch.save(full_sd_checkpoint(m.state_dict(), 2), tmp_path / "sd.ckpt")
    loaded = vae.load_vae(str(tmp_path / "sd.ckpt"))
    assert loaded.config["layers_per_block"] == 2 and loaded.config["use_quant_conv"]
    assert_same_vae(m, loaded)


def test_vae_config_scaling_shift_roundtrip(tmp_path):
    m = tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159)
    write_vae_folder(m, tmp_path / "flux")
    loaded = vae.load_vae(str(tmp_path / "flux"))
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.3611, 0.1159)
    assert_same_vae(m, loaded)
    cfg = json.load(open(tmp_path / "flux" / "config.json"))
    # diffusers' layout
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 2
    assert cfg["_class_name"] == "AutoencoderKL"
    for k in ("scaling_factor", "shift_factor"):
        del cfg[k]
    cfg.update(_diffusers_version="0.30.0", latents_mean=None,
               down_block_types=["DownEncoderBlock2D"] * 2)
    json.dump(cfg, open(tmp_path / "flux" / "config.json", "w"))
    loaded = vae.load_vae(str(tmp_path / "flux"))
    # SD defaults when absent
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.18215, 0.0)
    # numbers that are fine: an integer, and null for no shift
    loaded = vae.load_vae(str(vae_folder(tmp_path / "v", {"scaling_factor": 1,
                                                          "shift_factor": None})))
    assert (loaded.scaling_factor, loaded.shift_factor) == (1.0, 0.0)
    assert_same_vae(tiny_vae(), loaded)


def decoder_only(sd):
    return {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}


def missing_and_unexpected(sd):
    return {**{k: v for k, v in sd.items() if k != "decoder.conv_out.bias"},
            "decoder.extra.weight": torch.zeros(1)}


# messages are regular expressions; {tmp} is tmp_path
@pytest.mark.parametrize("make, message", [
    pytest.param(lambda tmp: vae_folder(tmp / "a", {"block_out_channels": [64, 64]}),
                 r"does not fit the VAE of .*config.json: size mismatch for encoder.conv_in"
                 r".weight: copying a param with shape torch.Size\(\[32, 3, 3, 3\]\)",
                 id="other-widths"),
    pytest.param(lambda tmp: vae_folder(tmp / "a", {"block_out_channels": [64, 64],
                                                    "_class_name": "AutoencoderTiny"}),
                 "AutoencoderTiny", id="autoencoder-tiny"),
    pytest.param(lambda tmp: vae_folder(tmp / "a", weights=missing_and_unexpected),
                 r'config.json: Missing key\(s\) in state_dict: "decoder.conv_out.bias"\.; '
                 r'Unexpected key\(s\) in state_dict: "decoder.extra.weight"\.$',
                 id="missing-and-unexpected-keys"),
    pytest.param(lambda tmp: vae_folder(tmp / "v", weights=decoder_only),
                 r"^{tmp}/v/diffusion_pytorch_model.safetensors does not fit the VAE of "
                 r'{tmp}/v/config.json: Missing key\(s\) in state_dict: "encoder.conv_in.weight"',
                 id="decoder-only-folder"),
    pytest.param(lambda tmp: save({"x_embedder.proj.weight": torch.zeros(1),
                                   "y_embedder.embedding_table.weight": torch.zeros(1)},
                                  tmp / "dit.pt"),
                 "holds no VAE weights.*x_embedder", id="a-transformer-checkpoint"),
])
def test_vae_wrong_model_errors_name_the_problem(tmp_path, make, message):
    target = make(tmp_path)
    with pytest.raises(ValueError, match=message.format(tmp=re.escape(str(tmp_path)))):
        vae.load_vae(str(target))


@pytest.mark.parametrize("name", ["no such file.safetensors", "weights/vae.safetensors",
                                  "models/sd.ckpt"])
def test_vae_weights_path_that_does_not_exist_is_not_sent_to_the_hub(http_server, name):
    with pytest.raises(FileNotFoundError) as e:
        vae.load_vae(name)
    assert str(e.value) == (f"{name!r} is not a file, a directory, or a Hugging Face repo id "
                            "(like 'stabilityai/sd-vae-ft-ema'; or ema, mse)")
    assert http_server.log == []


@pytest.mark.parametrize("h, w", [(5, 6), (0, 4)], ids=["odd", "empty"])
def test_vae_encode_refuses_odd_and_empty_sizes(h, w):
    with pytest.raises(ValueError) as e:
        tiny_vae().encode(torch.zeros(1, 3, h, w))
    assert str(e.value) == f"image size {h}x{w} is not a positive multiple of 2; crop it"


def test_vae_safetensors_roundtrip_dtypes(tmp_path):
    ts = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
          "bf16": torch.randn(2, 3).bfloat16(), "f64": torch.randn(2).double(),
          "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 3), "strided": torch.randn(4, 6)[:, ::2]}
    path = str(tmp_path / "t.safetensors")
    write_safetensors(ts, path)
    back = vae.load_safetensors(path)
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k


def test_vae_safetensors_reads_hand_built_bytes(tmp_path):
    # the bf16 bytes are 1.0, -2.0, 0.5 (little endian)
    data = (struct.pack("<4f", 1.0, -2.0, 0.5, 3.25) + struct.pack("<3e", 1.5, -0.25, 8.0)
            + bytes.fromhex("803f00c0003f") + struct.pack("<2q", -5, 1 << 40))
    entries = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
               "h": {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]},
               "b": {"dtype": "BF16", "shape": [3], "data_offsets": [22, 28]},
               "i": {"dtype": "I64", "shape": [2], "data_offsets": [28, 44]}}
    path = tmp_path / "hand.safetensors"
    path.write_bytes(st_bytes(entries, data, {"__metadata__": {"format": "pt"}}))
    sd = vae.load_safetensors(str(path))
    assert torch.equal(sd["w"], torch.tensor([[1.0, -2.0], [0.5, 3.25]]))
    assert torch.equal(sd["h"], torch.tensor([1.5, -0.25, 8.0], dtype=torch.float16))
    assert torch.equal(sd["b"], torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16))
    assert sd["i"].tolist() == [-5, 1 << 40]


def test_vae_safetensors_reads_unsorted_adjacent_and_empty_tensors(tmp_path):
    data = struct.pack("<2f", 1.0, 2.0) + struct.pack("<2f", 3.0, 4.0)
    entries = {"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
               "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]},
               "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
               "z": {"dtype": "I8", "shape": [0], "data_offsets": [0, 0]}}
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes(entries, data, {"__metadata__": {"format": "pt"}}))
    sd = vae.load_safetensors(str(path))
    assert torch.equal(sd["a"], torch.tensor([[1.0, 2.0]]))
    assert torch.equal(sd["b"], torch.tensor([3.0, 4.0]))
    assert sd["e"].shape == (0, 3) and sd["z"].dtype == torch.int8 and sd["z"].shape == (0,)


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
GOOD_ST = st_bytes({"w": F32_4}, bytes(16))


@pytest.mark.parametrize("blob, match", [
    pytest.param(GOOD_ST[:-3], r"tensor w \[4\] torch.float32 does not fit bytes 0..16 of the 13 "
                 "data bytes: truncated", id="truncated"),
    pytest.param(b"\x01\x02", "truncated or not a safetensors file", id="tiny"),
    pytest.param(struct.pack("<Q", 1 << 40) + b"{}", "truncated or not a safetensors file",
                 id="huge_header"),
    pytest.param(struct.pack("<Q", 4) + b"{no}", "corrupt safetensors header", id="bad_json"),
    pytest.param(st_bytes({"w": {**F32_4, "data_offsets": [0, 12]}}, bytes(16)),
                 "tensor w .* does not fit bytes 0..12 of the 16 data bytes", id="bad_offsets"),
])
def test_vae_safetensors_corrupt_files_give_clear_errors(tmp_path, blob, match):
    with pytest.raises(ValueError, match=match):
        vae.load_safetensors(str(put(tmp_path / "x.safetensors", blob)))


def test_vae_truncated_download_says_download_again(tmp_path):
    vae_folder(tmp_path / "cut")
    w = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.*download again"):
        vae.load_vae(str(tmp_path / "cut"))


def bad_entry(entry, case):
    """A header whose tensor w is entry, and the message for it."""
    message = (f"{{path}}: corrupt safetensors header: tensor w is {json.dumps(entry)}, not a "
               "known dtype, a shape and two offsets; delete it and download again")
    return pytest.param({"w": entry}, message, id=case)


def bad_tiling(entries, tensor, case):
    """A header whose tensors do not tile the 16 data bytes, and the message naming tensor."""
    begin, end = entries[tensor.split()[0]]["data_offsets"]
    message = (f"{{path}}: tensor {tensor} does not fit bytes {begin}..{end} of the 16 data bytes: "
               "truncated or corrupt; delete it and download again")
    return pytest.param(entries, message, id=case)


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# the tensors' bytes must tile the data: sorted by offsets, each begins where the previous one ended
@pytest.mark.parametrize("entries, message", [
    bad_entry(f32([1], 1.5, 5.5), "fractional_offsets"),
    bad_entry(f32([4.0], 0, 16), "float_shape"),
    bad_entry(f32([-2, -2], 0, 16), "negative_shape"),
    bad_entry(f32([4], -4, 12), "negative_offset"),
    bad_entry({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}, "three_offsets"),
    bad_entry(f32([True], 0, 4), "bool_shape"),
    bad_entry({**F32_4, "dtype": "Q7"}, "unknown_dtype"),
    bad_entry([0, 16], "entry_not_an_object"),
    pytest.param([["w", F32_4]], "{path}: truncated or not a safetensors file; delete it and "
                 "download again", id="header_not_an_object"),
    bad_tiling({"a": F32_4, "b": f32([2], 8, 16)}, "b [2] torch.float32", "overlap"),
    bad_tiling({"a": F32_4, "b": f32([0], 8, 8)}, "b [0] torch.float32",
               "zero_size_inside_another"),
    bad_tiling({"w": f32([5], 0, 20)}, "w [5] torch.float32", "past_the_data"),
    bad_tiling({"a": f32([2], 0, 8), "b": f32([1], 12, 16)}, "b [1] torch.float32", "gap"),
    bad_tiling({"w": f32([2], 0, 16)}, "w [2] torch.float32", "wrong_length"),
    pytest.param({"w": f32([2], 0, 8)}, "{path}: 8 data bytes after the last tensor: corrupt; "
                 "delete it and download again", id="bytes_after_the_last"),
])
def test_vae_safetensors_refuses_bad_entries(tmp_path, entries, message):
    head = json.dumps(entries).encode()
    path = put(tmp_path / "x.safetensors", struct.pack("<Q", len(head)) + head + bytes(16))
    with pytest.raises(ValueError) as e:
        vae.load_safetensors(str(path))
    assert str(e.value) == message.replace("{path}", str(path))


NOT_A_FOLDER = ("{d} lacks config.json or diffusion_pytorch_model.safetensors (or .bin); pass a "
                "diffusers VAE folder")


def not_a_number(change, what, case):
    """A config.json changed by change, and the message naming what is not a number."""
    return pytest.param(lambda tmp: vae_folder(tmp / "v", change), ValueError,
                        f"{{tmp}}/v/config.json: {what}, not a number; write the VAE's value there",
                        id=case)


def not_a_state_dict(write, name, case):
    """A weights file name written by write(path), and the message saying it is no state dict."""
    return pytest.param(lambda tmp: write(tmp / name), ValueError,
                        f"{{tmp}}/{name} is not a PyTorch state dict (empty, truncated, corrupt or "
                        "not only tensors); download it again, or pass a .safetensors file",
                        id=case)


@pytest.mark.parametrize("make, kind, message", [
    pytest.param(lambda tmp: empty_folder(tmp / "v"), FileNotFoundError,
                 NOT_A_FOLDER.format(d="{tmp}/v"), id="empty_folder"),
    pytest.param(lambda tmp: write_safetensors(tiny_vae().state_dict(), empty_folder(tmp / "v")
                                               / "diffusion_pytorch_model.safetensors").parent,
                 FileNotFoundError, NOT_A_FOLDER.format(d="{tmp}/v"), id="no_config"),
    pytest.param(lambda tmp: vae_folder(tmp / "v", b"{not json"), ValueError,
                 "{tmp}/v/config.json is not valid JSON (Expecting property name enclosed in "
                 "double quotes: line 1 column 2 (char 1)); restore the VAE's config.json",
                 id="invalid_json"),
    pytest.param(lambda tmp: vae_folder(tmp / "v", b"[1, 2]"), ValueError,
                 "{tmp}/v/config.json is not a JSON object; restore the VAE's config.json",
                 id="config_a_list"),
    not_a_number({"scaling_factor": "0.18215"}, 'scaling_factor is "0.18215"', "scaling_a_string"),
    not_a_number({"scaling_factor": None}, "scaling_factor is null", "scaling_null"),
    not_a_number({"scaling_factor": math.nan}, "scaling_factor is NaN", "scaling_nan"),
    not_a_number({"scaling_factor": True}, "scaling_factor is true", "scaling_true"),
    not_a_number({"shift_factor": "abc"}, 'shift_factor is "abc"', "shift_a_string"),
    not_a_number({"shift_factor": -math.inf}, "shift_factor is -Infinity", "shift_infinite"),
    pytest.param(lambda tmp: write_safetensors(decoder_only(tiny_vae().state_dict()),
                                               tmp / "decoder.safetensors"),
                 ValueError, "{tmp}/decoder.safetensors has decoder but no encoder weights; pass a "
                 "whole VAE", id="decoder_only_file"),
    not_a_state_dict(lambda p: put(p, b""), "v.bin", "bin_empty"),
    not_a_state_dict(lambda p: put(p, np.random.default_rng(0).integers(0, 256, 4096, np.uint8)
                                   .tobytes()), "v.bin", "bin_random"),
    not_a_state_dict(lambda p: save(tiny_vae().state_dict(), p, keep=5000), "v.bin",
                     "bin_truncated"),
    not_a_state_dict(lambda p: save(torch.zeros(3), p), "v.ckpt", "ckpt_holds_a_tensor"),
])
def test_vae_bad_folders_configs_and_files(tmp_path, make, kind, message):
    target = make(tmp_path)
    with pytest.raises(kind) as e:
        vae.load_vae(str(target))
    assert type(e.value) is kind and str(e.value) == message.format(tmp=tmp_path)


def test_vae_weights_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    target = save({"decoder.conv_in.weight": torch.zeros(1), "x": RunsCode(str(marker))},
                  tmp_path / "v.pt")
    with pytest.raises(ValueError) as e:
        vae.load_vae(str(target))
    assert str(e.value) == (f"{target} is not a PyTorch state dict (empty, truncated, corrupt or "
                            "not only tensors); download it again, or pass a .safetensors file")
    assert not marker.exists()
    # the file does hold code: unpickled without weights_only, it runs
    torch.load(target, weights_only=False)
    assert marker.exists()


def test_vae_bf16_and_fp16_upcast(tmp_path):
    m = tiny_vae()
    d = write_format(m, "diffusers", tmp_path / "v")
    ref = vae_outputs(m)
    b = vae.load_vae(d, dtype=torch.bfloat16)
    assert b.decoder.conv_in.weight.dtype == torch.bfloat16
    for r, o in zip(ref, vae_outputs(b)):
        # outputs in the caller's dtype
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o - r).norm() / r.norm() < 3e-2
    h = vae.load_vae(d, dtype=torch.float16)
    assert h.decoder.mid_block.resnets[0].conv1.weight.dtype == torch.float16
    # the full-res layers stay fp32
    assert h.decoder.up_blocks[0].resnets[0].conv1.weight.dtype == torch.float32
    z = randn((1, 4, 4, 4), 0).half()
    with torch.no_grad():
        # activations past fp16's 65504
        h.decoder.up_blocks[-1].resnets[0].conv1.bias.fill_(1e5)
        out = h.decode(z)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        # what the upcast prevents
        assert not torch.isfinite(h.half().decode(z)).all()


def test_vae_slicing_matches_separate_calls():
    m = tiny_vae()
    x, z = randn((5, 3, 8, 8), 0).clamp(-1, 1), randn((5, 4, 4, 4), 1)
    # conv kernels may differ with batch size, so compare with the same chunks by hand
    with torch.no_grad():
        means = torch.cat([m.encode(c).mean for c in x.split(2)])
        images = torch.cat([m.decode(c) for c in z.split(2)])
        # two 8x8 images per pass
        m.slice_pixels = 2 * 8 * 8
        assert torch.equal(m.encode(x).mean, means) and torch.equal(m.decode(z), images)


def test_vae_posterior_draw_and_mode():
    m = tiny_vae()
    with torch.no_grad():
        p = m.encode(randn((2, 3, 8, 8), 0))
    eps = torch.randn(p.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p.sample(torch.Generator().manual_seed(7)), p.mean + p.std * eps)
    assert torch.equal(p.mode(), p.mean) and torch.allclose(p.var, p.std ** 2)
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1)
    big = vae.DiagonalGaussian(moments)
    # clamped
    assert big.logvar.max() == 20.0


@pytest.mark.slow
def test_vae_cli_roundtrip_in_a_real_process(tmp_path):
    vae_folder(tmp_path / "v")
    Image.new("RGB", (21, 18), (200, 30, 90)).save(tmp_path / "img.png")
    r = run_script("vae.py", tmp_path / "img.png", "--vae", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and Image.open(tmp_path / "img_vae.png").size == (20, 18)


def test_vae_cli_writes_the_adm_uint8_conversion(tmp_path, monkeypatch, capsys):
    m = tiny_vae()
    folder = write_format(m, "diffusers", tmp_path / "v")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    code, out, _ = run_cli(vae, monkeypatch, capsys, tmp_path / "img.png", "--vae", folder)
    assert code is None
    expected_start = f"wrote {tmp_path / 'img_vae.png'}: 6x4 -> 2x smaller latent -> back, PSNR"
    assert out.startswith(expected_start)
    x = torch.from_numpy(pixels[:4, :6]).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    with torch.no_grad():
        y = m.decode(m.encode(x).mode()).clamp(-1, 1)
    expected = torch.clamp(127.5 * y[0] + 128, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "img_vae.png")), expected)


def not_an_image(path, reason):
    return f"{path} is not a readable image ({reason}); pass a PNG or JPEG file"


# in tmp_path: v (a tiny VAE), img.png (4x4), tiny.png (1x1), notes.png (text), empty (a folder);
# HF_HUB_OFFLINE is set
@pytest.mark.parametrize("image, vae_arg, message", [
    pytest.param("tiny.png", "{tmp}/v", "{tmp}/tiny.png is 1x1, smaller than the VAE's 2x2 pixels "
                 "per latent; pass an image of at least 2x2", id="image_1x1"),
    pytest.param("missing.png", "{tmp}/v", not_an_image(
        "{tmp}/missing.png", "[Errno 2] No such file or directory: '{tmp}/missing.png'"),
                 id="no_image"),
    pytest.param("notes.png", "{tmp}/v", not_an_image(
        "{tmp}/notes.png", "cannot identify image file '{tmp}/notes.png'"), id="not_an_image"),
    pytest.param("img.png", "nosuch.safetensors", "'nosuch.safetensors' is not a file, a "
                 "directory, or a Hugging Face repo id (like 'stabilityai/sd-vae-ft-ema'; or ema, "
                 "mse)", id="no_such_vae"),
    pytest.param("img.png", "{tmp}/empty", NOT_A_FOLDER.format(d="{tmp}/empty"),
                 id="empty_vae_folder"),
    pytest.param("img.png", "ema", "stabilityai/sd-vae-ft-ema is not cached and HF_HUB_OFFLINE is "
                 "set; unset it to download, or " + advice("stabilityai/sd-vae-ft-ema"),
                 id="offline_hub"),
])
def test_vae_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, image, vae_arg, message):
    vae_folder(tmp_path / "v")
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "dit_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    code, out, err = run_cli(vae, monkeypatch, capsys, tmp_path / image, "--vae",
                             vae_arg.format(tmp=tmp_path))
    assert code == f"vae.py: error: {message.format(tmp=tmp_path)}" and "\n" not in code
    assert (out, err) == ("", "")
    assert not list(tmp_path.glob("*_vae.png"))


@pytest.mark.slow
def test_vae_cli_error_in_a_real_process_is_one_line(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    vae_folder(tmp_path / "v")
    r = run_script("vae.py", tmp_path / "tiny.png", "--vae", tmp_path / "v")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"vae.py: error: {tmp_path / 'tiny.png'} is 1x1, smaller than the VAE's "
                        "2x2 pixels per latent; pass an image of at least 2x2\n")


def test_vae_cli_help_shows_every_default(monkeypatch, capsys):
    code, out, _ = run_cli(vae, monkeypatch, capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "(default: ema)" in text and "cropped to a multiple of 8" in text


def test_vae_hub_download_checks_the_announced_sha256_and_caches(http_server, tmp_path,
                                                                  monkeypatch, capfd):
    log = http_server.log
    m = tiny_vae()
    body = publish(http_server.routes, "stabilityai/sd-vae-ft-ema", m, tmp_path)
    assert_same_vae(m, vae.load_vae("ema"))
    base = "/stabilityai/sd-vae-ft-ema/resolve/main"
    # a HEAD (not followed) for the sha256, then the GET (redirects followed)
    assert log == [f"HEAD {base}/config.json", f"GET {base}/config.json",
                   f"HEAD {base}/diffusion_pytorch_model.safetensors",
                   f"GET {base}/diffusion_pytorch_model.safetensors",
                   "GET /cdn/stabilityai/sd-vae-ft-ema/blob"]
    # a progress line, finished, for config.json and the weights
    err = capfd.readouterr().err
    assert "\rdownloading config.json " in err and err.count(" \n") == 2
    assert "\rdownloading diffusion_pytorch_model.safetensors " in err
    cached = tmp_path / "dit_cache" / "stabilityai--sd-vae-ft-ema" / "main"
    assert sorted(os.listdir(cached)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (cached / "diffusion_pytorch_model.safetensors").read_bytes() == body
    assert_same_vae(m, vae.load_vae("stabilityai/sd-vae-ft-ema"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_vae(m, vae.load_vae("ema"))
    assert len(log) == 5


# sha256 of a file that is not the one served
OTHER_SHA256 = hashlib.sha256(b"another file").hexdigest()


@pytest.mark.parametrize("publish_kwargs", [
    # the redirect announces another file's sha256
    pytest.param(dict(sha=OTHER_SHA256), id="sha256-mismatch"),
    # a 200 without redirect announces its sha256 too: checked
    pytest.param(dict(sha=OTHER_SHA256, redirect=False), id="x-linked-etag-on-a-200"),
])
def test_vae_hub_sha256_mismatch_keeps_nothing(http_server, tmp_path, publish_kwargs):
    body = publish(http_server.routes, "org/vae", tiny_vae(), tmp_path, **publish_kwargs)
    url = f"{http_server.url}/org/vae/resolve/main/diffusion_pytorch_model.safetensors"
    path = tmp_path / "dit_cache" / "org--vae" / "main" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    expected = publish_kwargs.get("sha") or hashlib.sha256(body).hexdigest()
    got = hashlib.sha256(body).hexdigest()
    assert type(e.value) is OSError and str(e.value) == (
        f'cannot download {url} (invalid hash value (expected "{expected}", got "{got}")); put '
        f"the file at {path}, or set HF_ENDPOINT to a mirror")
    # the config.json that did come is kept, no part of the weights
    assert os.listdir(path.parent) == ["config.json"]


@pytest.mark.parametrize("publish_kwargs", [
    # a 64-hex ETag that is no sha256 of the file: ignored
    pytest.param(dict(sha="", redirect=False, etag=f'"{OTHER_SHA256}"'),
                 id="etag-is-not-a-sha256"),
    # W/"..." and upper case: the Hub's weak form of the same sha256
    pytest.param(dict(weak=True), id="weak-etag"),
    pytest.param(dict(sha=""), id="no-sha256"),
])
def test_vae_hub_sha256_only_from_x_linked_etag(http_server, tmp_path, publish_kwargs):
    m = tiny_vae()
    publish(http_server.routes, "org/vae", m, tmp_path, **publish_kwargs)
    assert_same_vae(m, vae.load_vae("org/vae"))


def test_vae_hub_falls_back_to_bin_on_a_404(http_server, tmp_path):
    log = http_server.log
    m = tiny_vae()
    publish(http_server.routes, "org/vae", m, tmp_path, weights="bin")
    assert_same_vae(m, vae.load_vae("org/vae"))
    base = "/org/vae/resolve/main"
    assert f"HEAD {base}/diffusion_pytorch_model.safetensors" in log
    assert f"GET {base}/diffusion_pytorch_model.safetensors" not in log
    cached = sorted(os.listdir(tmp_path / "dit_cache" / "org--vae" / "main"))
    assert cached == ["config.json", "diffusion_pytorch_model.bin"]


def without_weights(hub):
    """org/vae published without its weights file."""
    publish(hub.routes, "org/vae", tiny_vae(), hub.tmp)
    del hub.routes["/org/vae/resolve/main/diffusion_pytorch_model.safetensors"]


def gated(hub):
    """org/vae's config.json answers 401, as a gated repo's."""
    body = b"Access to model org/vae is restricted"
    hub.routes["/org/vae/resolve/main/config.json"] = (401, {}, body)


def files_under(root):
    """The paths of the files under root, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


WHY = "no such repo or file, or a gated or private repo"
CONFIG_URL = "{endpoint}/org/vae/resolve/main/config.json"


# {endpoint} is HF_ENDPOINT, {tmp} tmp_path; kept: the files left in the cache
@pytest.mark.parametrize("setup, kind, message, kept", [
    pytest.param(lambda hub: None, OSError, f"cannot download {CONFIG_URL} (HTTP Error 404: Not "
                 f"Found; {WHY}); check the repo id, or {advice('org/vae')}", [], id="no_repo"),
    pytest.param(without_weights, FileNotFoundError, "org/vae has no diffusion_pytorch_model."
                 "safetensors or .bin; check the repo id, or pass a local folder or file",
                 ["org--vae/main/config.json"], id="no_weights"),
    pytest.param(gated, OSError, f"cannot download {CONFIG_URL} (HTTP Error 401: Unauthorized; "
                 f"{WHY}); check the repo id, or {advice('org/vae')}", [], id="gated"),
    pytest.param(lambda hub: hub.env.setenv("HF_ENDPOINT", closed_port_url()), OSError,
                 f"cannot reach {CONFIG_URL} ({REFUSED}); {advice('org/vae')}", [],
                 id="unreachable"),
    pytest.param(lambda hub: hub.env.setenv("HF_ENDPOINT", hub.tcp_server(SSH_BANNER)), OSError,
                 f"cannot reach {CONFIG_URL} (SSH-2.0-OpenSSH_9.6); {advice('org/vae')}", [],
                 id="not_http"),
    pytest.param(lambda hub: hub.env.setenv("HF_HUB_OFFLINE", "1"), FileNotFoundError,
                 "org/vae is not cached and HF_HUB_OFFLINE is set; unset it to download, or "
                 + advice("org/vae"), [], id="offline"),
])
def test_vae_hub_errors_say_what_to_do(http_server, tcp_server, tmp_path, monkeypatch, setup,
                                       kind, message, kept):
    setup(types.SimpleNamespace(routes=http_server.routes, tmp=tmp_path, env=monkeypatch,
                                tcp_server=tcp_server))
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    assert type(e.value) is kind
    assert str(e.value) == message.format(endpoint=os.environ["HF_ENDPOINT"], tmp=tmp_path)
    # no empty cache folders left behind; a config.json that did come is kept
    assert files_under(tmp_path / "dit_cache") == kept
    assert (tmp_path / "dit_cache").exists() == bool(kept)
    # offline, or another endpoint: nothing asked of the local Hub
    assert bool(http_server.log) == (os.environ["HF_ENDPOINT"] == http_server.url
                                     and "HF_HUB_OFFLINE" not in os.environ)


def test_vae_hub_interrupted_download_keeps_nothing(http_server, tmp_path, fast_downloads):
    routes = http_server.routes
    body = publish(routes, "org/vae", tiny_vae(), tmp_path)
    # the CDN promises the whole file and sends 10 bytes: refused, tried DOWNLOAD_TRIES times
    routes["/cdn/org/vae/blob"] = (200, {"Content-Length": str(len(body))}, body[:10])
    url = f"{http_server.url}/org/vae/resolve/main/diffusion_pytorch_model.safetensors"
    path = tmp_path / "dit_cache" / "org--vae" / "main" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    assert str(e.value) == (f"cannot download {url} (cut short: 10 of {len(body):,} bytes; "
                            f"{vae.DOWNLOAD_TRIES} tries); put the file at {path}, or set "
                            "HF_ENDPOINT to a mirror")
    assert http_server.log.count("GET /cdn/org/vae/blob") == vae.DOWNLOAD_TRIES
    # the config.json that did come is kept, no part of the weights
    assert os.listdir(path.parent) == ["config.json"]


def test_vae_reuses_huggingface_cache_offline(http_server, tmp_path, monkeypatch):
    m = tiny_vae()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for env, hub_dir in (("HF_HUB_CACHE", "hf_hub"), ("HF_HOME", "hf_home/hub")):
        if env == "HF_HOME":
            # HF_HUB_CACHE unset: the cache is $HF_HOME/hub
            monkeypatch.delenv("HF_HUB_CACHE")
            monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        repo = tmp_path / hub_dir / "models--stabilityai--sd-vae-ft-mse"
        # the layout huggingface_hub writes
        write_vae_folder(m, repo / "snapshots" / "0123abc")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        assert_same_vae(m, vae.load_vae("mse"))
        (repo / "refs" / "main").unlink()
    assert http_server.log == [] and not (tmp_path / "dit_cache").exists()


def test_vae_cache_paths_use_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIT_CACHE", "")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert vae.cache_paths("org/name", "config.json") == [
        str(tmp_path / ".cache" / "dit" / "org--name" / "main" / "config.json"),
        str(tmp_path / "hf" / "models--org--name" / "snapshots" / "main" / "config.json")]

#################################################################################
#                            benchmarks/gpu_check.py                            #
#################################################################################

@pytest.mark.slow
def test_gpu_check_smoke_runs_every_path(tmp_path):
    """--smoke: exit 0, a JSON report, every line passed or is a GPU-only line skipped."""
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--workdir",
           str(tmp_path / "work")]
    run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "CPU"
    checks = {c["name"]: c for c in report["checks"]}
    assert len(checks) == len(report["checks"]) >= 25
    for c in checks.values():
        if c["gpu_only"]:
            assert (c["status"], c["note"], c["value"]) == ("skipped", "skipped: no GPU", None), c
        else:
            assert c["status"] == "pass" and c["value"] is not None, c
    # the lines whose figures need a GPU are the skipped ones
    skipped = {name for name, c in checks.items() if c["status"] == "skipped"}
    for name in ("train.py --tf32", "train.py --compile", "sample.py cuda vs cpu, same seed",
                 "SDPA flash attention bf16 vs fp32", "VAE encode + decode cuda vs cpu",
                 "Inception features cuda vs cpu", "train bf16: MFU", "train bf16: TFLOP/s",
                 "train bf16 --compile: img/s", "MFU goal: 40% in bf16"):
        assert name in skipped
    for name in ("train.py fp32", "train.py --precision bf16", "train.py --latent-cache",
                 "train.py stop + --resume", "train bf16: img/s", "sampling DDPM-250 cfg bf16",
                 "VAE decode fp32", "Inception features"):
        assert checks[name]["status"] == "pass"
    assert checks["torchrun train.py, 2 process(es)"]["status"] == "pass"
    assert checks["train.py stop + --resume"]["value"] == 0
    assert "| check | status | value | note |" in run.stdout


#################################################################################
#                 Faults: train.py and sample.py (crashes, odd files)            #
#################################################################################

def ckpt_names(root, run="000-DiT-S-8"):
    return sorted(os.listdir(root / run / "checkpoints"))


def test_train_keep_last_prunes_only_this_runs_older_step_files(tmp_path):
    """--keep-last touches only step-numbered files up to the step just written: a best.pt stays,
    and after resuming from an older step the abandoned later checkpoints stay too."""
    data = write_images(tmp_path / "data")
    root = pixel_run(tmp_path, "--max-steps", "6", "--ckpt-every", "2", data=data)
    folder = root / "000-DiT-S-8" / "checkpoints"
    shutil.copy(folder / "0000002.pt", folder / "best.pt")
    os.remove(folder / "0000006.pt")
    shutil.copy(folder / "0000004.pt", folder / "0000006.pt")
    train.main([*PIXEL, "--data-path", data, "--resume", str(folder / "0000002.pt"),
                "--max-steps", "4", "--ckpt-every", "2", "--keep-last", "1"])
    # the new 0000004.pt is kept; 0000006.pt (later than the resumed step) and best.pt untouched
    assert ckpt_names(root) == ["0000004.pt", "0000006.pt", "best.pt"]


def test_train_resume_folder_takes_the_highest_step_and_cleans_up_after_crashes(tmp_path):
    """A folder resumes from its highest step (not the newest name: best.pt); the temp files of
    a writer killed mid-save are removed; a metrics.jsonl line cut by a crash is dropped."""
    data = write_images(tmp_path / "data")
    root = pixel_run(tmp_path, "--max-steps", "4", "--ckpt-every", "2", data=data)
    run = root / "000-DiT-S-8"
    shutil.copy(run / "checkpoints" / "0000002.pt", run / "checkpoints" / "best.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / "checkpoints" / f"0000006.pt.{dead}.tmp").write_bytes(b"half a checkpoint")
    (run / "checkpoints" / f"0000006.pt.{os.getppid()}.tmp").write_bytes(b"a live writer's")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    train.main([*PIXEL, "--data-path", data, "--resume", str(run), "--max-steps", "6",
                "--ckpt-every", "2"])
    resumed = "Resuming from " + str(run / "checkpoints" / "0000004.pt")
    assert resumed in (run / "log.txt").read_text()
    assert ckpt_names(root) == ["0000002.pt", "0000004.pt", "0000006.pt",
                                f"0000006.pt.{os.getppid()}.tmp", "best.pt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_train_resume_applies_a_new_lr_and_says_so(tmp_path):
    """Without --lr a resumed run keeps its lr; a new --lr replaces it in the optimizer, the log
    and the checkpoint."""
    data = write_images(tmp_path / "data")
    root = pixel_run(tmp_path, "--max-steps", "2", "--ckpt-every", "2", "--lr", "3e-4", data=data)
    run = root / "000-DiT-S-8"
    train.main([*PIXEL, "--data-path", data, "--resume", str(run), "--max-steps", "4",
                "--ckpt-every", "2"])
    kept = load(run / "checkpoints" / "0000004.pt")
    assert kept["args"]["lr"] == 3e-4 and kept["opt"]["param_groups"][0]["lr"] == 3e-4
    train.main([*PIXEL, "--data-path", data, "--resume", str(run), "--max-steps", "6",
                "--ckpt-every", "2", "--lr", "0"])
    changed = load(run / "checkpoints" / "0000006.pt")
    assert changed["args"]["lr"] == 0 and changed["opt"]["param_groups"][0]["lr"] == 0
    assert "--lr 0.0 replaces the checkpoint's 0.0003" in (run / "log.txt").read_text()
    # lr 0: the weights no longer move
    a, b = load(run / "checkpoints" / "0000004.pt"), changed
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_train_numbered_class_folders_sort_as_numbers_and_are_stored(tmp_path):
    """Folders 0..10 get labels 0..10; the mapping is logged and stored in the checkpoint, and a
    resume on other classes is refused."""
    data = tmp_path / "data"
    os.makedirs(data)
    for k in range(11):
        write_images(tmp_path / "src", per_class=(2,), seed=k)
        os.rename(tmp_path / "src" / "class_0", data / str(k))
    classes, samples = train.find_images(str(data))
    assert classes == [str(k) for k in range(11)]
    assert [label for _, label in samples] == [k for k in range(11) for _ in range(2)]
    # ImageNet-style names keep torchvision's order
    assert train.class_order(["n02", "n01", "n10"]) == ["n01", "n02", "n10"]
    root = pixel_run(tmp_path, "--num-classes", "11", "--max-steps", "1", data=str(data))
    run = root / "000-DiT-S-8"
    assert "Class labels: 0=0, 1=1, 2=2" in (run / "log.txt").read_text()
    assert load(run / "checkpoints" / "0000001.pt")["classes"] == classes
    os.rename(data / "10", data / "x")
    with pytest.raises(SystemExit, match="was trained on the classes"):
        train.main([*PIXEL, "--num-classes", "11", "--data-path", str(data), "--resume",
                    str(run), "--max-steps", "2"])


def test_train_exif_rotation_and_large_images_are_read_as_a_viewer_shows_them(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    """An EXIF-rotated JPEG is read upright; an image over PIL's pixel limit (under twice it)
    is read without a warning; an unreadable file is reported once, not once per epoch."""
    upright = np.zeros((32, 16, 3), np.uint8)
    upright[:8] = 255
    exif = Image.Exif()
    # orientation 6: the stored pixels are rotated; a viewer turns them 90 degrees clockwise
    exif[0x0112] = 6
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    got = train.read_image(str(tmp_path / "rotated.jpg"), 16)
    want = train.center_crop_arr(Image.fromarray(upright), 16)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 8
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "large.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.read_image(str(tmp_path / "large.png"), 16).shape == (16, 16, 3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert train.read_image(str(tmp_path / "bad.png"), 16) is None
    assert train.read_image(str(tmp_path / "bad.png"), 16) is None
    assert capsys.readouterr().err.count("skipping unreadable image") == 1


def test_train_named_pipe_is_not_an_image(tmp_path):
    """A named pipe called 00.png is not listed (reading it would wait forever)."""
    data = write_images(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "class_0" / "00.png")
    _, samples = train.find_images(data)
    assert len(samples) == 10 and not any(p.endswith("00.png") for p, _ in samples)


def test_train_experiment_numbers_never_collide(tmp_path):
    """The next free number after the highest, even when an older folder was removed."""
    results = tmp_path / "results"
    os.makedirs(results / "001-DiT-S-8")
    assert train.new_experiment_folder(str(results), "DiT-S-8").endswith("002-DiT-S-8")
    assert train.new_experiment_folder(str(results), "DiT-B-2").endswith("003-DiT-B-2")
    assert os.path.isdir(results / "003-DiT-B-2" / "checkpoints")


@pytest.mark.parametrize("change, message", [
    ("images", "files_sha256"),
    ("vae", "latent_shape, vae, vae_config"),
    ("latents", "files (")], ids=["same-names-new-images", "8-channel-vae", "cut-latents"])
def test_train_latent_cache_checks_its_images_and_vae(tmp_path, change, message):
    """A latent cache is refused, naming what differs and the fix, when its images were replaced
    under the same names, when another VAE is asked for, or when its files are damaged."""
    data = write_images(tmp_path / "data")
    tiny_vae(save_to=tmp_path / "vae", block_out_channels=(8, 8), norm_num_groups=4)
    tiny_vae(save_to=tmp_path / "vae8", block_out_channels=(8, 8), norm_num_groups=4,
             latent_channels=8)
    flags = [*TINY, "--image-size", "16", "--num-classes", "2", "--global-batch-size", "2",
             "--model-kwargs", TINY_LATENT, "--data-path", data, "--latent-cache",
             str(tmp_path / "cache"), "--max-steps", "1", "--results-dir", str(tmp_path / "r")]
    train.main([*flags, "--vae", str(tmp_path / "vae")])
    vae_folder = tmp_path / "vae"
    if change == "images":
        write_images(tmp_path / "data", seed=1)
    if change == "vae":
        vae_folder = tmp_path / "vae8"
    if change == "latents":
        latents = tmp_path / "cache" / "latents.npy"
        latents.write_bytes(latents.read_bytes()[:200])
    with pytest.raises(SystemExit, match="latent-cache") as e:
        train.main([*flags, "--vae", str(vae_folder)])
    assert message in str(e.value) and "delete it" in str(e.value)


def wait_for_log_lines(proc, metrics, n):
    """Wait until a running train.py has written n lines to metrics.jsonl."""
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= n):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)


@pytest.mark.slow
def test_train_sigterm_saves_and_exits_cleanly_torchrun(tmp_path):
    """SIGTERM to torchrun (what a scheduler sends) reaches both ranks: they save a checkpoint
    at the same step, log how to continue and exit 0; the run then resumes from it."""
    data = write_images(tmp_path / "data", per_class=(7, 6))
    argv = [*PIXEL, "--data-path", data, "--results-dir", "r", "--max-steps", "100000",
            "--ckpt-every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", TRAIN, *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "r" / "000-DiT-S-8" / "metrics.jsonl"
    wait_for_log_lines(proc, metrics, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    run = tmp_path / "r" / "000-DiT-S-8"
    saved = [name for name in os.listdir(run / "checkpoints") if name.endswith(".pt")]
    assert len(saved) == 1, out
    step = int(saved[0][:-3])
    assert f"Stopped by SIGTERM at step {step}; continue with --resume" in out
    # torchrun itself ends with a traceback (SignalException); the workers print none
    assert 'train.py", line' not in out and "train.py: error" not in out
    ckpt = load(run / "checkpoints" / saved[0])
    # both ranks took part in the save: each one's random state is stored
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == step
    run_torchrun([TRAIN, *PIXEL, "--data-path", data, "--resume", str(run), "--max-steps",
                  str(step + 1)], cwd=tmp_path)
    assert load(run / "checkpoints" / f"{step + 1:07d}.pt")["step"] == step + 1


@pytest.mark.parametrize("args, message", [
    ("a string", "in a form train.py never writes"),
    ({"image_size": "16"}, "in a form train.py never writes")], ids=["args-string", "size-text"])
def test_sample_checkpoint_with_odd_settings_is_one_line(tmp_path, args, message):
    root = pixel_run(tmp_path, "--max-steps", "1")
    ckpt = load(root / "000-DiT-S-8" / "checkpoints" / "0000001.pt")
    ckpt["args"] = args if isinstance(args, str) else {**ckpt["args"], **args}
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", str(tmp_path / "odd.pt"), "--out", str(tmp_path / "a.png")])


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_sample_npz_set_resamples_a_damaged_batch(sample_files, tmp_path, capsys, damage):
    """A cut or empty batch file in _parts is named, sampled again with the batches after it, and
    the set equals an uninterrupted one."""
    ckpt = ["--ckpt", sample_files["pixel"]]
    sample.main(sample_pixel_set_args(tmp_path / "fresh.npz", 6, *ckpt))
    sample.main(sample_pixel_set_args(tmp_path / "set.npz", 6, *ckpt))
    shard = tmp_path / "set_parts" / "rank000-batch000001.npz"
    shard.write_bytes(shard.read_bytes()[:100] if damage == "truncated" else b"")
    os.remove(tmp_path / "set.npz")
    sample.main(sample_pixel_set_args(tmp_path / "set.npz", 6, *ckpt))
    assert f"{shard} is damaged" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "fresh.npz")["arr_0"],
                          np.load(tmp_path / "set.npz")["arr_0"])


#################################################################################
#                      Faults: downloads and hostile files                      #
#################################################################################

def http_reply(body=b"", status="200 OK", **headers):
    """The raw bytes of an HTTP/1.0 reply; Content-Length is the body's unless given."""
    headers = {"Content-Length": str(len(body)),
               **{k.replace("_", "-"): v for k, v in headers.items()}}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.0 {status}\r\n{head}\r\n".encode() + body


@pytest.fixture
def fast_downloads(monkeypatch):
    """The download timeout and retry waits of dit.py, vae.py and fid.py made short: 2 tries."""
    for module in (dit, vae, fid):
        monkeypatch.setattr(module, "DOWNLOAD_TIMEOUT", 0.5)
        monkeypatch.setattr(module, "DOWNLOAD_TRIES", 2)
        monkeypatch.setattr(module, "DOWNLOAD_BACKOFF", 0.01)


@pytest.fixture
def fault_server(tmp_path, monkeypatch, fast_downloads):
    """A misbehaving HTTP server on 127.0.0.1: replies maps "METHOD /path" to the raw bytes sent
    back (then it closes the connection), to None (it reads the request and never answers), to
    (bytes, None) (it sends them, then nothing more), or to a list of these, one per request in
    turn (the last one repeats); anything else is a 404. log
    records "METHOD /path"; url is the base URL. DIT_CACHE and HF_HUB_CACHE point into tmp_path,
    HF_ENDPOINT at the server; the download timeouts are short (fast_downloads)."""
    server = types.SimpleNamespace(replies={}, log=[])
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server.url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def answer(conn):
        with conn:
            key = " ".join(conn.recv(65536).decode("latin-1").split(" ")[:2])
            server.log.append(key)
            reply = server.replies.get(key, http_reply(b"Entry not found", "404 Not Found"))
            if isinstance(reply, list):
                reply = reply.pop(0) if len(reply) > 1 else reply[0]
            if isinstance(reply, tuple):
                conn.sendall(reply[0])
            if not isinstance(reply, bytes):
                stop.wait()
            else:
                conn.sendall(reply)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    for k in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    yield server
    stop.set()
    listener.close()


HTML_PAGE = b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n"


def dit_official(server, monkeypatch, tmp_path):
    """DIT_WEIGHTS_URL at server/DiT: (the URL of DiT-XL-2-256x256.pt, its path in the cache)."""
    monkeypatch.setenv("DIT_WEIGHTS_URL", server.url + "/DiT")
    return f"{server.url}/DiT/DiT-XL-2-256x256.pt", tmp_path / "cache" / "DiT-XL-2-256x256.pt"


def test_dit_download_stalled_server_times_out(fault_server, tmp_path, monkeypatch):
    # accepts the connection, reads the request, never answers
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = None
    start = time.time()
    with pytest.raises(OSError) as e:
        dit.find_model("DiT-XL-2-256x256.pt")
    assert time.time() - start < 2
    assert str(e.value) == (f"cannot download {url} (no answer for 0.5 s; 2 tries); put the file "
                            f"at {path}, or set DIT_WEIGHTS_URL to a mirror")
    assert fault_server.log == ["GET /DiT/DiT-XL-2-256x256.pt"] * 2
    # no cache folder, no .partial file
    assert not (tmp_path / "cache").exists()


def test_dit_download_stalled_mid_transfer_times_out(fault_server, tmp_path, monkeypatch):
    # the headers and 100 of the 1000 bytes come, then nothing: the read times out as well
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    stalls = (http_reply(b"PK" + bytes(98), Content_Length="1000"), None)
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = stalls
    with pytest.raises(OSError) as e:
        dit.find_model("DiT-XL-2-256x256.pt")
    assert str(e.value) == (f"cannot download {url} (no answer for 0.5 s; 2 tries); put the file "
                            f"at {path}, or set DIT_WEIGHTS_URL to a mirror")
    # the cache folder was there: it stays, empty
    assert os.listdir(tmp_path / "cache") == []


def test_fid_download_stalled_server_times_out(fault_server, tmp_path, monkeypatch):
    url = f"{fault_server.url}/pt_inception-2015-12-05-6726825d.pth"
    monkeypatch.setenv("DIT_INCEPTION_URL", url)
    fault_server.replies["GET /pt_inception-2015-12-05-6726825d.pth"] = None
    start = time.time()
    with pytest.raises(OSError) as e:
        fid.load_inception()
    assert time.time() - start < 2
    path = tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth"
    assert str(e.value) == (f"cannot download {url} (no answer for 0.5 s; 2 tries); put the file "
                            f"at {path}, or set DIT_INCEPTION_URL to a mirror, or pass its path "
                            "(fid.py --inception PATH)")
    assert not (tmp_path / "cache").exists()


VAE_CONFIG = "/org/vae/resolve/main/config.json"


def test_vae_download_stalled_head_times_out(fault_server, tmp_path):
    fault_server.replies[f"HEAD {VAE_CONFIG}"] = None
    start = time.time()
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    assert time.time() - start < 2
    fix = advice("org/vae").format(tmp=tmp_path).replace("dit_cache", "cache")
    assert str(e.value) == (f"cannot reach {fault_server.url}{VAE_CONFIG} (no answer for 0.5 s; 2 "
                            f"tries); {fix}")
    assert fault_server.log == [f"HEAD {VAE_CONFIG}"] * 2


def test_vae_download_stalled_get_times_out(fault_server, tmp_path):
    # the HEAD answers (the one request that had a timeout before), the GET never does
    fault_server.replies[f"HEAD {VAE_CONFIG}"] = http_reply(Content_Length="500")
    fault_server.replies[f"GET {VAE_CONFIG}"] = None
    start = time.time()
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    assert time.time() - start < 2
    path = tmp_path / "cache" / "org--vae" / "main" / "config.json"
    assert str(e.value) == (f"cannot download {fault_server.url}{VAE_CONFIG} (no answer for 0.5 s; "
                            f"2 tries); put the file at {path}, or set HF_ENDPOINT to a mirror")
    assert fault_server.log == [f"HEAD {VAE_CONFIG}", f"GET {VAE_CONFIG}", f"GET {VAE_CONFIG}"]
    # no config.json.<pid>.partial, no empty cache folders
    assert not (tmp_path / "cache").exists()


def test_vae_cli_stalled_hub_is_one_line(fault_server, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    fault_server.replies[f"HEAD {VAE_CONFIG}"] = None
    code, out, err = run_cli(vae, monkeypatch, capsys, tmp_path / "img.png", "--vae", "org/vae")
    assert code.startswith(f"vae.py: error: cannot reach {fault_server.url}{VAE_CONFIG} (no "
                           "answer for 0.5 s; 2 tries); put its config.json")
    assert "\n" not in code and out == ""
    # what the user saw while waiting: one line per try that is tried again
    assert err == f"{fault_server.url}{VAE_CONFIG}: no answer for 0.5 s; trying again in 0.01 s\n"


def dit_checkpoint_bytes():
    """A tiny DiT's state dict as torch.save writes it: the bytes and the state dict."""
    sd = tiny_dit().state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    return buffer.getvalue(), sd


def test_dit_download_cut_short_is_not_cached(fault_server, tmp_path, monkeypatch):
    # Content-Length promises the whole checkpoint, the server closes after 100 bytes
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    body, sd = dit_checkpoint_bytes()
    cut = http_reply(body[:100], Content_Length=str(len(body)))
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = [cut, cut, http_reply(body)]
    with pytest.raises(OSError) as e:
        dit.find_model("DiT-XL-2-256x256.pt")
    assert str(e.value) == (f"cannot download {url} (cut short: 100 of {len(body):,} bytes; 2 "
                            f"tries); put the file at {path}, or set DIT_WEIGHTS_URL to a mirror")
    assert not (tmp_path / "cache").exists()
    # the mirror mended: the next run downloads the whole file (nothing wrong was cached)
    got = dit.find_model("DiT-XL-2-256x256.pt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert path.read_bytes() == body and os.listdir(path.parent) == [path.name]
    assert len(fault_server.log) == 3


def test_dit_download_cut_once_is_tried_again(fault_server, tmp_path, monkeypatch, capsys):
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    body, sd = dit_checkpoint_bytes()
    cut = http_reply(body[:100], Content_Length=str(len(body)))
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = [cut, http_reply(body)]
    got = dit.find_model("DiT-XL-2-256x256.pt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert len(fault_server.log) == 2
    err = capsys.readouterr().err
    assert f"{url}: cut short: 100 of {len(body):,} bytes; trying again in 0.01 s\n" in err


@pytest.mark.parametrize("case", ["content_type", "body", "upper_case_body", "empty"])
def test_dit_download_html_page_is_not_cached(fault_server, tmp_path, monkeypatch, case):
    # a mirror's login or error page, sent with a 200: never cached, never tried again
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    page = {"content_type": http_reply(b"PK page", Content_Type="text/html; charset=utf-8"),
            "body": http_reply(b"\n  " + HTML_PAGE, Content_Type="application/octet-stream"),
            "upper_case_body": http_reply(b"<HTML><BODY>503</BODY></HTML>"),
            "empty": http_reply(b"")}[case]
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = page
    with pytest.raises(OSError) as e:
        dit.find_model("DiT-XL-2-256x256.pt")
    why = "an empty file" if case == "empty" else "an HTML page, not the file"
    assert str(e.value) == (f"cannot download {url} ({why}); put the file at {path}, or set "
                            "DIT_WEIGHTS_URL to a mirror")
    assert len(fault_server.log) == 1
    assert not (tmp_path / "cache").exists()


def test_vae_download_html_page_is_not_cached(http_server, tmp_path):
    m = tiny_vae()
    publish(http_server.routes, "org/vae", m, tmp_path)
    good = http_server.routes[VAE_CONFIG]
    http_server.routes[VAE_CONFIG] = (200, {"Content-Type": "text/html"}, HTML_PAGE)
    path = tmp_path / "dit_cache" / "org--vae" / "main" / "config.json"
    with pytest.raises(OSError) as e:
        vae.load_vae("org/vae")
    assert str(e.value) == (f"cannot download {http_server.url}{VAE_CONFIG} (an HTML page, not the "
                            f"file); put the file at {path}, or set HF_ENDPOINT to a mirror")
    assert not (tmp_path / "dit_cache").exists()
    # the mirror mended: the next run works
    http_server.routes[VAE_CONFIG] = good
    assert_same_vae(m, vae.load_vae("org/vae"))


def test_fid_download_wrong_sha256_is_not_retried(fault_server, tmp_path, monkeypatch):
    # the right length, another file: refused by its sha256, at once (another try gets the same)
    url = f"{fault_server.url}/w.pth"
    monkeypatch.setenv("DIT_INCEPTION_URL", url)
    fault_server.replies["GET /w.pth"] = http_reply(b"x" * 1000)
    with pytest.raises(OSError) as e:
        fid.load_inception()
    got = hashlib.sha256(b"x" * 1000).hexdigest()
    assert str(e.value).startswith(f'cannot download {url} (invalid hash value (expected '
                                   f'"{fid.WEIGHTS_SHA256}", got "{got}")); put the file at ')
    assert fault_server.log == ["GET /w.pth"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("status, tries", [("503 Service Unavailable", 2), ("500 Oops", 2),
                                           ("429 Too Many Requests", 2), ("404 Not Found", 1),
                                           ("403 Forbidden", 1)])
def test_dit_download_retries_only_what_may_pass(fault_server, tmp_path, monkeypatch, status,
                                                 tries):
    # a busy or failing server may answer the next try; a missing or forbidden file will not
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    body, sd = dit_checkpoint_bytes()
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = [http_reply(b"no", status),
                                                          http_reply(body)]
    if tries == 2:
        got = dit.find_model("DiT-XL-2-256x256.pt")
        assert all(torch.equal(got[k], v) for k, v in sd.items())
    else:
        with pytest.raises(OSError) as e:
            dit.find_model("DiT-XL-2-256x256.pt")
        assert str(e.value) == (f"cannot download {url} (HTTP Error {status.replace(' ', ': ', 1)})"
                                f"; put the file at {path}, or set DIT_WEIGHTS_URL to a mirror")
    assert len(fault_server.log) == tries


def test_vae_download_busy_hub_is_tried_again(fault_server, tmp_path):
    # a 503 on the HEAD, then the answer
    fault_server.replies[f"HEAD {VAE_CONFIG}"] = [http_reply(b"", "503 Busy"), http_reply()]
    fault_server.replies[f"GET {VAE_CONFIG}"] = http_reply(b'{"_class_name": "AutoencoderKL"}')
    # config.json comes; there are no weights
    with pytest.raises(FileNotFoundError, match="org/vae has no diffusion_pytorch_model"):
        vae.load_vae("org/vae")
    assert fault_server.log[:3] == [f"HEAD {VAE_CONFIG}"] * 2 + [f"GET {VAE_CONFIG}"]


def test_dit_download_leaves_no_partial_file_on_interrupt(fault_server, tmp_path, monkeypatch):
    # Ctrl-C in the middle of a transfer: the temp file goes too
    url, path = dit_official(fault_server, monkeypatch, tmp_path)
    body, _ = dit_checkpoint_bytes()
    fault_server.replies["GET /DiT/DiT-XL-2-256x256.pt"] = http_reply(body)
    writes = []

    def interrupt(*args):
        writes.append(os.listdir(path.parent))
        raise KeyboardInterrupt

    monkeypatch.setattr(dit, "print_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dit.find_model("DiT-XL-2-256x256.pt")
    assert writes == [[f"{path.name}.{os.getpid()}.partial"]]
    assert os.listdir(path.parent) == []


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
HOSTILE_SAFETENSORS = {
    # zero elements, yet a shape torch cannot hold
    "zero_size_overflowing_shape": st_bytes({"w": {**F32_1, "shape": [2 ** 64, 0],
                                                   "data_offsets": [0, 0]}}, b""),
    "zero_size_overflowing_strides": st_bytes({"w": {**F32_1, "shape": [2 ** 62, 4, 0],
                                                     "data_offsets": [0, 0]}}, b""),
    "nested_arrays": struct.pack("<Q", 100_000) + b"[" * 100_000,
    "nested_objects": struct.pack("<Q", 500_000) + b'{"a":' * 100_000,
    "negative_offset": st_bytes({"w": {**F32_1, "data_offsets": [-4, 0]}}, bytes(4)),
    "overflowing_offsets": st_bytes({"w": {**F32_1, "data_offsets": [2 ** 64, 2 ** 64 + 4]}},
                                    bytes(4)),
    "list_header": struct.pack("<Q", 2) + b"[]",
    "huge_header_length": struct.pack("<Q", 2 ** 64 - 1) + b"{}",
    "unhashable_dtype": st_bytes({"w": {**F32_1, "dtype": ["F32"]}}, bytes(4)),
    "huge_number": struct.pack("<Q", 5011) + b'{"w": ' + b"9" * 5000 + b"}",
    "not_utf8": struct.pack("<Q", 4) + b'{"\xff"',
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_vae_hostile_safetensors_is_one_line(tmp_path, monkeypatch, capsys, case):
    path = tmp_path / "x.safetensors"
    path.write_bytes(HOSTILE_SAFETENSORS[case])
    with pytest.raises(ValueError) as e:
        vae.load_safetensors(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and message.endswith("; delete it and download again")
    assert "\n" not in message and len(message) < 500
    # the CLI: that line, no traceback
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    code, out, err = run_cli(vae, monkeypatch, capsys, tmp_path / "img.png", "--vae", path)
    assert (code, out, err) == (f"vae.py: error: {message}", "", "")


@pytest.mark.parametrize("case", ["nested", "millions_of_layers", "thousands_of_levels",
                                  "no_levels", "zero_groups"])
def test_vae_hostile_config_is_one_line(tmp_path, case):
    folder = tmp_path / "v"
    tiny_vae(save_to=folder)
    config = json.loads((folder / "config.json").read_text())
    if case == "nested":
        (folder / "config.json").write_text("[" * 100_000)
    else:
        config.update({"millions_of_layers": {"layers_per_block": 3_000_000},
                       "thousands_of_levels": {"block_out_channels": [8] * 100_000},
                       "no_levels": {"block_out_channels": []},
                       "zero_groups": {"norm_num_groups": 0}}[case])
        (folder / "config.json").write_text(json.dumps(config))
    start = time.time()
    with pytest.raises(ValueError) as e:
        vae.load_vae(str(folder))
    # at once: not after building millions of layers
    assert time.time() - start < 2
    weights = folder / "diffusion_pytorch_model.safetensors"
    head = f"{weights} does not fit the VAE of {folder / 'config.json'}: "
    why = {"nested": f"{folder / 'config.json'} is not valid JSON (maximum recursion depth "
                     "exceeded while decoding a JSON array from a unicode string); restore the "
                     "VAE's config.json",
           "millions_of_layers": head + "its 6000000 layers are more than the 120 tensors",
           "thousands_of_levels": head + "its 100000 layers are more than the 120 tensors",
           "no_levels": head + "list index out of range",
           "zero_groups": head + "integer modulo by zero"}[case]
    assert str(e.value) == why


def test_dit_corrupt_cached_checkpoint_says_delete_it(tmp_path, monkeypatch):
    # an HTML page cached as the official checkpoint (by an older version): the way out is named
    monkeypatch.setenv("DIT_CACHE", str(tmp_path))
    (tmp_path / "DiT-XL-2-256x256.pt").write_bytes(HTML_PAGE)
    with pytest.raises(ValueError) as e:
        dit.find_model("DiT-XL-2-256x256.pt")
    head = (f"{tmp_path / 'DiT-XL-2-256x256.pt'} is not a readable checkpoint: empty, truncated "
            "or not a PyTorch file (")
    assert str(e.value).startswith(head)
    assert str(e.value).endswith("); delete it to download it again")


def npz_claiming(path, shape, data=b""):
    """An .npz whose arr_0 header claims shape (uint8) over the bytes data, written by hand."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", header.getvalue() + data)
    return path


@pytest.mark.parametrize("case", ["huge_count", "negative_count", "no_pixels"])
def test_fid_hostile_npz_is_one_line(tmp_path, monkeypatch, capsys, case):
    shape = {"huge_count": (2 ** 62, 2, 2, 3), "negative_count": (-5, 2, 2, 3),
             "no_pixels": (5, 0, 0, 3)}[case]
    path = npz_claiming(tmp_path / "ref.npz", shape, bytes(24 if case != "no_pixels" else 0))
    np.savez(tmp_path / "samples.npz", np.zeros((5, 8, 8, 3), np.uint8))
    code, out, err = run_cli(fid, monkeypatch, capsys, path, tmp_path / "samples.npz")
    why = (f"arr_0 claims {shape} but holds 24 bytes: corrupt; write or download it again"
           if case != "no_pixels" else
           "arr_0 is uint8 (5, 0, 0, 3); expected C-ordered uint8 (N, H, W, 3)")
    assert (code, out, err) == (f"fid.py: error: {path}: {why}", "", "")


@pytest.mark.slow
def test_train_sigterm_to_the_whole_job_with_loader_processes(tmp_path):
    """Slurm signals every process of a job: the loader processes ignore it, and the run saves a
    checkpoint and exits 0 (large images: the run mostly waits for its loader process)."""
    rng = np.random.default_rng(0)
    for i in range(10):
        os.makedirs(tmp_path / "data" / f"c{i % 2}", exist_ok=True)
        pixels = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.bmp")
    data = str(tmp_path / "data")
    argv = [*PIXEL, "--num-workers", "1", "--data-path", data, "--results-dir", "r",
            "--max-steps", "100000", "--ckpt-every", "100000"]
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=tmp_path, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "r" / "000-DiT-S-8" / "metrics.jsonl"
    wait_for_log_lines(proc, metrics, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    saved = os.listdir(tmp_path / "r" / "000-DiT-S-8" / "checkpoints")
    assert len(saved) == 1 and f"Stopped by SIGTERM at step {int(saved[0][:-3])}" in out


#################################################################################
#                          Fine-tuning (--init-from)                            #
#################################################################################

def ft_source(seed=0, **kwargs):
    """A tiny latent DiT (8x8 latents, 10 classes) with every tensor random, and its state dict."""
    torch.manual_seed(seed)
    model = tiny_dit(**kwargs)
    fill_(model.state_dict(), seed + 1)
    return model, model.state_dict()


def ft_target(seed=1, **kwargs):
    """A fresh tiny DiT (the width, depth, heads and patch of ft_source), and a copy of its init."""
    torch.manual_seed(seed)
    model = dit.DiT(**{**dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                              num_classes=10), **kwargs})
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_dit_load_pretrained_other_classes_size_and_channels():
    """Every tensor that fits is the source's; the rest keeps DiT's init; chosen rows, null row."""
    source, sd = ft_source()
    model, init = ft_target(input_size=16, in_channels=3, num_classes=3)
    report = dit.load_pretrained(model, sd, init_classes=[7, 1, 2], config=source.config)
    rebuilt = ("pos_embed", "x_embedder.proj.", "final_layer.linear.",
               "y_embedder.embedding_table.weight")
    for k, v in model.state_dict().items():
        if not k.startswith(rebuilt):
            assert torch.equal(v, sd[k]), k
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (4, 64)
    assert torch.equal(table[:3], sd["y_embedder.embedding_table.weight"][[7, 1, 2]])
    # the null row: the source's last row
    assert torch.equal(table[3], sd["y_embedder.embedding_table.weight"][10])
    # the new grid's sin-cos embedding, the new channels' layers as DiT initializes them
    assert torch.equal(model.pos_embed[0], dit.get_2d_sincos_pos_embed(64, 8).float())
    for k in ("pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
              "final_layer.linear.weight", "final_layer.linear.bias"):
        assert torch.equal(model.state_dict()[k], init[k]), k
    assert model.x_embedder.proj.weight.shape == (64, 3, 2, 2)
    assert model.final_layer.linear.weight.shape == (2 * 2 * 6, 64)
    assert not model.final_layer.linear.weight.any()
    assert report == ("loaded 26 of 32 tensors; rebuilt label table for 3 classes (the checkpoint "
                      "has 10; classes from its rows 7 1 2, null row copied), pos_embed of the 8x8 "
                      "patch grid (sin-cos; was 4x4), x_embedder.proj for in_channels 3 (was 4), "
                      "final_layer.linear for out_channels 6 (was 8)")


def test_dit_load_pretrained_new_classes_start_as_dit_does():
    """Another class count without init_classes: N(0, 0.02) rows as DiT's init, the old null row."""
    _, sd = ft_source()
    model, init = ft_target(num_classes=300)
    report = dit.load_pretrained(model, sd)
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(table[:300], init["y_embedder.embedding_table.weight"][:300])
    assert abs(table[:300].std().item() - 0.02) < 0.001
    assert torch.equal(table[300], sd["y_embedder.embedding_table.weight"][10])
    assert "label table for 300 classes (the checkpoint has 10; classes newly initialized, null " \
           "row copied)" in report and report.startswith("loaded 31 of 32 tensors")


def test_dit_load_pretrained_same_model_or_larger_image_loads_every_weight():
    """Same config: everything; 2x the image size: every weight, pos_embed for the new grid."""
    _, sd = ft_source()
    model, _ = ft_target()
    assert dit.load_pretrained(model, sd) == "loaded 32 of 32 tensors: all"
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    model, init = ft_target(input_size=16)
    report = dit.load_pretrained(model, sd)
    assert report == ("loaded 31 of 32 tensors; rebuilt pos_embed of the 8x8 patch grid (sin-cos; "
                      "was 4x4)")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k != "pos_embed")
    assert torch.equal(model.pos_embed, init["pos_embed"])


def test_dit_load_pretrained_init_classes_may_reorder_the_same_count():
    _, sd = ft_source()
    model, _ = ft_target()
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    report = dit.load_pretrained(model, sd, init_classes=order)
    table = sd["y_embedder.embedding_table.weight"]
    assert torch.equal(model.y_embedder.embedding_table.weight, table[order + [10]])
    assert "classes from its rows 9 8 7 6 5 4 3 2 ..." in report


@pytest.mark.parametrize("change, message", [
    (dict(depth=3), "depth 2 in the checkpoint, 3 in the model"),
    (dict(hidden_size=32, num_heads=2), "hidden_size 64 in the checkpoint, 32 in the model"),
    (dict(num_heads=2), "num_heads 4 in the checkpoint, 2 in the model"),
    (dict(patch_size=4), "patch_size 2 in the checkpoint, 4 in the model"),
    (dict(mlp_ratio=2.0), "mlp_ratio 4.0 in the checkpoint, 2.0 in the model"),
    (dict(block="cross-attention"), "block adaLN-Zero in the checkpoint, cross-attention in the"),
], ids=["depth", "width", "heads", "patch", "mlp", "block"])
def test_dit_load_pretrained_refuses_another_transformer(change, message):
    source, sd = ft_source()
    model, init = ft_target(**change)
    with pytest.raises(ValueError) as e:
        dit.load_pretrained(model, sd, config=source.config)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "fine-tuning may change only the classes, the image size and the channels" in \
        str(e.value)
    # nothing was copied
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())


def test_dit_load_pretrained_head_count_of_a_bare_state_dict_is_the_preset():
    """An official-style state dict stores no head count: a preset's (DiT-S: 6) is checked."""
    with torch.device("meta"):
        sd = dit.create_dit("DiT-S/8", input_size=8).state_dict()
        model = dit.create_dit("DiT-S/8", input_size=8, num_heads=4)
    with pytest.raises(ValueError, match="num_heads 6 in the checkpoint, 4 in the model"):
        dit.load_pretrained(model, sd)


@pytest.mark.parametrize("sd, classes, message", [
    ({"model": {}}, None, "the checkpoint holds no DiT weights (missing or odd "
                          "'x_embedder.proj.weight')"),
    (None, [1, 2], "init_classes has 2 labels for 10 classes; give one old class per new class"),
    (None, [10] * 10, "init_classes [10, 10, 10, 10, 10, 10, 10, 10, 10, 10] are not classes of "
                      "the checkpoint, which has 10 (0 to 9)"),
], ids=["not-a-dit", "init-classes-count", "init-classes-range"])
def test_dit_load_pretrained_bad_input_is_one_line(sd, classes, message):
    model, _ = ft_target()
    with pytest.raises(ValueError) as e:
        dit.load_pretrained(model, sd or ft_source()[1], init_classes=classes)
    assert str(e.value) == message


@pytest.fixture(scope="module")
def ft_source_run(tmp_path_factory):
    """A 1-step tiny pixel run (16x16 images, 2 classes) to fine-tune from: its checkpoint."""
    tmp = tmp_path_factory.mktemp("ft_source")
    return str(pixel_run(tmp, "--max-steps", "1") / "000-DiT-S-8" / "checkpoints" / "0000001.pt")


def ft_run(tmp_path, source, *extra, classes=3):
    """Fine-tune the tiny pixel model from source on `classes` classes; returns its results root."""
    data = tmp_path / f"data{classes}"
    if not data.exists():
        write_images(data, per_class=(2,) * classes)
    train.main([*PIXEL, "--data-path", str(data), "--results-dir", str(tmp_path / "r"),
                "--num-classes", str(classes), "--init-from", source, *extra])
    return tmp_path / "r"


def test_train_init_from_loads_what_fits_then_sample_needs_no_flag(tmp_path, ft_source_run):
    """Another class count and 2x the image size: the source's EMA in every tensor that fits, the
    chosen label rows and the null row, the new grid's pos_embed; a new run at step 0; sample.py
    --ckpt then samples it."""
    source = load(ft_source_run)
    # no learning and an EMA equal to the model: the checkpoint holds what was loaded
    root = ft_run(tmp_path, ft_source_run, "--image-size", "32", "--init-classes", "1", "0", "1",
                  "--lr", "0", "--ema-decay", "0", "--max-steps", "1")
    ckpt = load(root / "000-DiT-S-8" / "checkpoints" / "0000001.pt")
    assert ckpt["step"] == 1 and ckpt["config"]["num_classes"] == 3
    # a fresh optimizer (parameter 0 is the frozen pos_embed)
    assert all(s["step"] == 1 for s in ckpt["opt"]["state"].values())
    old = source["ema"]
    for part in ("model", "ema"):
        sd = ckpt[part]
        for k, v in sd.items():
            if k not in ("pos_embed", "y_embedder.embedding_table.weight"):
                assert torch.equal(v, old[k]), (part, k)
        assert torch.equal(sd["y_embedder.embedding_table.weight"],
                           old["y_embedder.embedding_table.weight"][[1, 0, 1, 2]])
        assert torch.equal(sd["pos_embed"][0], dit.get_2d_sincos_pos_embed(32, 4).float())
    # the EMA, not the live weights
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(old[key], source["model"][key])
    log = open(root / "000-DiT-S-8" / "log.txt").read()
    assert (f"Initialized from {ft_source_run}: loaded 30 of 32 tensors; rebuilt label table for 3 "
            "classes (the checkpoint has 2; classes from its rows 1 0 1, null row copied), "
            "pos_embed of the 4x4 patch grid (sin-cos; was 2x2)\n") in log
    out = tmp_path / "a.png"
    sample.main(["--ckpt", str(root / "000-DiT-S-8" / "checkpoints" / "0000001.pt"),
                 "--num-sampling-steps", "2", "--out", str(out)])
    # 8 images of 32x32 (labels 0, 1, 2, 0, ...) in 2 rows of 4
    assert np.asarray(Image.open(out)).shape == (2 * 34 + 2, 4 * 34 + 2, 3)


def test_train_init_from_run_trains_and_resumes_exactly(tmp_path, ft_source_run):
    """A fine-tuning run learns (its weights move), and stopped at step 1 and resumed to step 3 it
    ends bit for bit where the straight run ends."""
    common = ["--lr", "1e-3", "--ema-decay", "0.5"]
    ft_run(tmp_path / "a", ft_source_run, *common, "--max-steps", "3")
    ft_run(tmp_path / "b", ft_source_run, *common, "--max-steps", "1")
    exp = tmp_path / "b" / "r" / "000-DiT-S-8"
    train.main([*PIXEL, "--data-path", str(tmp_path / "b" / "data3"), "--num-classes", "3",
                "--results-dir", str(tmp_path / "b" / "r"), *common, "--max-steps", "3",
                "--resume", str(exp)])
    straight = load(tmp_path / "a" / "r" / "000-DiT-S-8" / "checkpoints" / "0000003.pt")
    resumed = load(exp / "checkpoints" / "0000003.pt")
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    for p, s in straight["opt"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, resumed["opt"]["state"][p][k]), (p, k)
    assert torch.equal(straight["rng"][0]["cpu"], resumed["rng"][0]["cpu"])
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(straight["model"][key], load(ft_source_run)["ema"][key])
    assert "Resuming from" in open(exp / "log.txt").read()


def test_train_init_from_official_name_is_downloaded_once(tmp_path, ft_source_run, http_server,
                                                        monkeypatch):
    """--init-from DiT-XL-2-256x256.pt is found as sample.py --ckpt finds it (here: a state dict
    served locally in its place), downloaded into the cache once."""
    (http_server.root / "DiT").mkdir()
    torch.save(load(ft_source_run)["ema"], http_server.root / "DiT" / "DiT-XL-2-256x256.pt")
    monkeypatch.setenv("DIT_WEIGHTS_URL", http_server.url + "/DiT")
    for _ in range(2):
        root = ft_run(tmp_path, "DiT-XL-2-256x256.pt", "--max-steps", "1", classes=2)
    assert http_server.log == ["GET /DiT/DiT-XL-2-256x256.pt"]
    log = open(root / "001-DiT-S-8" / "log.txt").read()
    assert "Initialized from DiT-XL-2-256x256.pt: loaded 32 of 32 tensors: all" in log


@pytest.mark.parametrize("case, message", [
    ("with-resume", "--init-from starts a new run and --resume continues one; give only one of "
                    "them"),
    ("classes-count", "--init-classes gives 2 old classes for --num-classes 3; give one per new "
                      "class (or leave it out: new label rows)"),
    ("classes-alone", "--init-classes picks rows of --init-from's label table; give --init-from "
                      "too"),
    ("missing", "--init-from {tmp}/nope.pt is not a file; give a checkpoint, a state dict or one "
                "of DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt"),
    ("not-a-checkpoint", "--init-from {tmp}/junk.pt: {tmp}/junk.pt is not a readable checkpoint: "
                         "empty, truncated or not a PyTorch file"),
    ("not-a-dit", "--init-from {tmp}/other.pt: the checkpoint holds no DiT weights (missing or odd "
                  "'x_embedder.proj.weight')"),
    ("depth", "--init-from {src}: depth 2 in the checkpoint, 3 in the model: fine-tuning may "
              "change only the classes, the image size and the channels"),
    ("width", "--init-from {src}: hidden_size 32 in the checkpoint, 64 in the model: fine-tuning"),
    ("classes-range", "--init-from {src}: init_classes [2] are not classes of the checkpoint, "
                      "which has 2 (0 to 1)"),
], ids=["with-resume", "classes-count", "classes-alone", "missing", "not-a-checkpoint",
        "not-a-dit", "depth", "width", "classes-range"])
def test_train_init_from_bad_input_is_one_line(tmp_path, ft_source_run, case, message):
    (tmp_path / "junk.pt").write_bytes(os.urandom(100))
    torch.save({"net": torch.zeros(2)}, tmp_path / "other.pt")
    flags = {"with-resume": ["--resume", ft_source_run],
             "classes-count": ["--init-classes", "0", "1"],
             "classes-alone": ["--init-from", "", "--init-classes", "0", "1", "1"],
             "missing": ["--init-from", str(tmp_path / "nope.pt")],
             "not-a-checkpoint": ["--init-from", str(tmp_path / "junk.pt")],
             "not-a-dit": ["--init-from", str(tmp_path / "other.pt")],
             "depth": ["--model-kwargs", '{"depth": 3, "hidden_size": 32, "num_heads": 2}'],
             "width": ["--model-kwargs", '{"depth": 2, "hidden_size": 64, "num_heads": 2}'],
             "classes-range": ["--init-classes", "0", "1", "2"]}[case]
    with pytest.raises(SystemExit) as e:
        ft_run(tmp_path, ft_source_run, *flags)
    expected = "train.py: error: " + message.format(tmp=tmp_path, src=ft_source_run)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)
    # nothing was made
    assert not os.path.exists(tmp_path / "r")
