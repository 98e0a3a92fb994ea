"""Tests of sample.py on CPU: tiny filled DiT/VAE weights in local sample_files, a local HTTP server for downloads."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
import dit
import sample
import vae

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=8)  # fast on 2 cores
SAMPLE_TINY_ARGS = ["--model", "DiT-S/8", "--model-kwargs", '{"depth": 2, "hidden_size": 64, "num_heads": 2}']
SAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def sample_fill_(module, seed, scale=1.0):
    """Deterministic weights (the golden README fill, 2-D weights scaled): every output depends on every layer."""
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if t.dim() >= 2:
            r = r * (2 / (t.numel() // t.shape[0])) ** 0.5 * scale
        else:
            r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
        t.copy_(r)
    return {k: v.clone() for k, v in sd.items()}


def sample_grid_reference(x, nrow=4, pad=2):
    """torchvision save_image(x, nrow=4, normalize=True, value_range=(-1, 1)) pixels, written in numpy float32."""
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


@pytest.fixture
def sample_one_thread():
    """Tiny models on one thread: two threads on a loaded 2-core machine are up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """Local checkpoints: raw and train.py-style latent DiT (32x32 images), pixel-space DiT, tiny VAE dir."""
    root = tmp_path_factory.mktemp("sample_files")
    out = {}
    sd = sample_fill_(dit.DiT(input_size=16, num_classes=1000, **SAMPLE_TINY), seed=1, scale=0.5)
    out["raw"] = str(root / "raw.pt")
    torch.save(sd, out["raw"])
    out["train"] = str(root / "train.pt")  # train.py layout: sampling must use "ema", not "model"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "opt": {}}, out["train"])
    out["pixel"] = str(root / "pixel.pt")
    pixel = dit.DiT(input_size=16, in_channels=3, num_classes=10, **SAMPLE_TINY)
    torch.save(sample_fill_(pixel, seed=2, scale=0.5), out["pixel"])
    v = vae.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)  # downsamples 2x
    sample_fill_(v, seed=3)
    out["vae"] = str(root / "vae")
    vae.save_vae(v, out["vae"])
    return out


def sample_latent_args(files, out, *extra):
    return [*SAMPLE_TINY_ARGS, "--ckpt", files["train"], "--vae", files["vae"], "--image-size", "32",
            "--num-sampling-steps", "4", "--out", str(out), *extra]

#################################################################################
#                                  Grid images                                  #
#################################################################################

# sha256 of the pixels torchvision 0.29's save_image(x, nrow=4, normalize=True, value_range=(-1, 1)) writes for
# x = randn((n, 3, 6, 7), seed n) * 1.5 (computed once with torchvision; it is not a dependency).
TORCHVISION_GRID_SHA256 = {5: "227e872104a061968cb0c271f0dc6fb5da3996b90e403a1a2b5d3b91240be46d",
                           8: "f8ca214d4be3d88a91e877ae163caf8f351f7be78752338fe677012621686ee3"}


@pytest.mark.parametrize("n", [5, 8])
@pytest.mark.usefixtures("sample_one_thread")
def test_sample_grid_matches_torchvision_save_image(n):
    x = torch.randn((n, 3, 6, 7), generator=torch.Generator().manual_seed(n), dtype=torch.float64).float() * 1.5
    grid = sample.make_grid(x)
    assert grid.shape == (2 * (6 + 2) + 2, 4 * (7 + 2) + 2, 3) and grid.dtype == np.uint8
    assert hashlib.sha256(grid.tobytes()).hexdigest() == TORCHVISION_GRID_SHA256[n]
    assert np.array_equal(grid, sample_grid_reference(x.numpy()))  # the test's own reference agrees too


SAMPLE_DDIM = ["--sampler", "ddim", "--cfg-all-channels", "--labels", "3", "999", "0", "5", "7"]


@pytest.mark.parametrize("extra", [[], SAMPLE_DDIM], ids=["ddpm", "ddim-all-channels-5-labels"])
@pytest.mark.usefixtures("sample_one_thread")
def test_sample_matches_reference_from_dit_diffusion_vae(sample_files, tmp_path, extra):
    out = tmp_path / "grid.png"
    sample.main(sample_latent_args(sample_files, out, "--seed", "3", *extra))
    ddim = bool(extra)
    labels = [3, 999, 0, 5, 7] if ddim else SAMPLE_LABELS
    # The official sample.py, written with dit.py, diffusion.py and vae.py. Its VAE loader (diffusers'
    # from_pretrained) draws no random numbers, so loading ours before seeding is the same program.
    v = vae.load_vae(sample_files["vae"])
    torch.manual_seed(3)
    model = dit.DiT(input_size=16, num_classes=1000, **SAMPLE_TINY)  # init draws from the CPU generator, as official
    model.load_state_dict(torch.load(sample_files["raw"], weights_only=True))
    model.eval()
    d = diffusion.create_diffusion("ddim4" if ddim else "4")
    z = torch.randn(len(labels), 4, 16, 16)
    y = torch.tensor(labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([1000] * len(labels))], 0)
    kwargs = dict(y=y, cfg_scale=4.0, cfg_channels=None if ddim else 3)
    loop = d.ddim_sample_loop if ddim else d.p_sample_loop
    with torch.no_grad():
        x = loop(model.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device="cpu")
        x, _ = x.chunk(2, dim=0)
        images = v.decode(x / 0.18215).numpy()
    expected = sample_grid_reference(images)
    got = sample_png(out)
    assert got.shape == (2 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)
    assert 0.05 < (images.clip(-1, 1) == images).mean() and images.std() > 0.1  # not saturated, not flat
    assert np.array_equal(got, expected)


@pytest.mark.usefixtures("sample_one_thread")
def test_sample_same_seed_same_image(sample_files, tmp_path):
    def run(name, *extra):
        sample.main(sample_latent_args(sample_files, tmp_path / name, "--labels", "1", "2", *extra))
        return (tmp_path / name).read_bytes()

    assert run("a.png") == run("b.png")
    assert run("c.png", "--seed", "1") != run("a.png")
    bf16 = run("d.png", "--precision", "bf16")
    assert bf16 == run("e.png", "--precision", "bf16")
    diff = np.abs(sample_png(tmp_path / "d.png").astype(int) - sample_png(tmp_path / "a.png").astype(int))
    assert 0 < diff.mean() < 8  # bf16 rounding changes pixels a little, not the picture

#################################################################################
#                                   Bad input                                   #
#################################################################################

@pytest.mark.parametrize("change, message", [
    (["--model", "DiT-Q/2"], "unknown --model"),
    (["--model-kwargs", "{}"], "does not fit"),                 # checkpoint for another model (DiT-S/8)
    (["--model-kwargs", '{"dept": 2}'], "unexpected keyword"),
    (["--model-kwargs", "[2]"], "not a JSON object"),
    (["--image-size", "64"], "does not fit"),                   # checkpoint for another image size
    (["--vae", "none", "--image-size", "16"], "does not fit"),  # latent checkpoint, pixel space asked
    (["--image-size", "36"], "not a multiple of 8"),
    (["--labels", "5", "1000"], "out of range"),
    (["--num-classes", "100"], "out of range"),                 # official labels need 1000 classes
    (["--ckpt", "missing.pt"], "is not a file"),
])
@pytest.mark.usefixtures("sample_one_thread")
def test_sample_bad_input_fails_before_sampling(sample_files, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as e:
        sample.main(sample_latent_args(sample_files, tmp_path / "x.png", *change))  # the last of a repeated flag wins
    assert message in str(e.value)
    assert not (tmp_path / "x.png").exists() and "sampling step" not in capsys.readouterr().err


@pytest.mark.usefixtures("sample_one_thread")
def test_sample_download_requires_official_model():
    with pytest.raises(SystemExit, match="only DiT-XL/2"):
        sample.main([*SAMPLE_TINY_ARGS, "--image-size", "32"])

#################################################################################
#                                 FID sample sets                               #
#################################################################################

def sample_pixel_fid_args(out, n, *extra):
    return [*SAMPLE_TINY_ARGS, "--vae", "none", "--image-size", "16", "--num-classes", "10",
            "--num-sampling-steps", "3", "--per-proc-batch-size", "2", "--num-fid-samples", str(n),
            "--out", str(out), *extra]


@pytest.mark.usefixtures("sample_one_thread")
def test_sample_fid_resume_equals_uninterrupted_run(sample_files, tmp_path):
    fresh, resumed = tmp_path / "fresh.npz", tmp_path / "resumed.npz"
    sample.main(sample_pixel_fid_args(fresh, 5, "--ckpt", sample_files["pixel"]))
    sample.main(sample_pixel_fid_args(resumed, 2, "--ckpt", sample_files["pixel"]))  # "interrupted" after one batch
    first = os.stat(tmp_path / "resumed_parts" / "rank000-batch000000.npz").st_mtime_ns
    sample.main(sample_pixel_fid_args(resumed, 5, "--ckpt", sample_files["pixel"]))
    assert os.stat(tmp_path / "resumed_parts" / "rank000-batch000000.npz").st_mtime_ns == first  # not redone
    a, b = np.load(fresh)["arr_0"], np.load(resumed)["arr_0"]
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 5 and a.std() > 10
    with pytest.raises(SystemExit, match="cfg_scale"):  # finished batches of other options are never mixed in
        sample.main(sample_pixel_fid_args(resumed, 5, "--ckpt", sample_files["pixel"], "--cfg-scale", "2"))


@pytest.mark.usefixtures("sample_one_thread")
def test_sample_fid_two_processes_torchrun_and_resume(sample_files, tmp_path):
    out = tmp_path / "fid.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(n):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "sample.py"),
               *sample_latent_args(sample_files, out, "--num-fid-samples", str(n), "--per-proc-batch-size", "2",
                                   "--cfg-scale", "1.5")]
        r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return np.load(out)["arr_0"]

    first = torchrun(3)  # 2 ranks x 1 batch of 2, the last image dropped
    parts = tmp_path / "fid_parts"
    shards = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    assert sorted(shards) == ["rank000-batch000000.npz", "rank001-batch000000.npz"]
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    full = torchrun(7)  # continues: one more batch per rank
    assert all(os.stat(parts / name).st_mtime_ns == t for name, t in shards.items())  # finished batches kept
    assert len(list(parts.glob("*.npz"))) == 4
    assert full.shape == (7, 32, 32, 3) and np.array_equal(full[:3], first)
    assert len({x.tobytes() for x in full}) == 7  # ranks drew different noise
    # image b * 4 + i * 2 + r comes from rank r's batch b, row i (the official sample_ddp.py numbering)
    assert np.array_equal(full[5], np.load(parts / "rank001-batch000001.npz")["images"][0])
    labels = np.concatenate([np.load(p)["labels"] for p in sorted(parts.glob("*.npz"))])
    assert labels.min() >= 0 and labels.max() < 1000

#################################################################################
#                           Default download (offline)                          #
#################################################################################

class _SampleQuiet(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        _SampleQuiet.requests.append(self.path)


@pytest.mark.usefixtures("sample_one_thread")
def test_sample_default_download_from_local_servers(sample_files, tmp_path, monkeypatch):
    # Stand-ins: the official DiT-XL/2 is the tiny model (so its checkpoint is small), the SD VAE a tiny one
    # that downsamples 8x, both served over HTTP from 127.0.0.1 as the two real hosts would.
    monkeypatch.setitem(dit.DiT_models, "DiT-XL/2", lambda **kw: dit.DiT(**SAMPLE_TINY, **kw))
    root = tmp_path / "www"
    (root / "dit").mkdir(parents=True)
    torch.save(sample_fill_(dit.DiT(input_size=32, num_classes=1000, **SAMPLE_TINY), seed=4, scale=0.5),
               root / "dit" / "DiT-XL-2-256x256.pt")
    v = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    sample_fill_(v, seed=5)
    vae.save_vae(v, root / "stabilityai" / "sd-vae-ft-mse" / "resolve" / "main")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _SampleQuiet(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("DIT_WEIGHTS_URL", url + "/dit")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _SampleQuiet.requests.clear()
    args = ["--num-sampling-steps", "2", "--labels", "1", "2"]
    try:
        sample.main(args + ["--out", str(tmp_path / "a.png")])  # everything else default: DiT-XL/2, 256, mse
    finally:
        server.shutdown()
        server.server_close()
    assert "/dit/DiT-XL-2-256x256.pt" in _SampleQuiet.requests
    assert "/stabilityai/sd-vae-ft-mse/resolve/main/config.json" in _SampleQuiet.requests
    assert sample_png(tmp_path / "a.png").shape == (256 + 4, 2 * 256 + 6, 3)
    sample.main(args + ["--out", str(tmp_path / "b.png")])  # server gone: the caches are used
    sample.main(args + ["--out", str(tmp_path / "c.png"), "--ckpt", str(root / "dit" / "DiT-XL-2-256x256.pt"),
                        "--vae", str(root / "stabilityai" / "sd-vae-ft-mse" / "resolve" / "main")])
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "b.png"))
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "c.png"))
