"""
Tests for the whole project: python -m pytest test_dit.py -q
Golden numbers (golden.json, next to this file) were computed by the reference implementations
(official DiT, diffusers' AutoencoderKL, torch-fidelity's TF Inception) on deterministically filled weights.
"""
import argparse
import functools
import http.server
import json
import math
import os
import threading

import pytest
import torch

import diffusion
import dit
from diffusion import create_diffusion
from dit import DiT, DiT_models, find_model

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = json.load(open(os.path.join(HERE, "golden.json")))

#################################################################################
#                                 Shared helpers                                #
#################################################################################

def fill_(state_dict, seed=0):
    """The golden weight fill (see golden.json's provenance): deterministic values on sorted key names."""
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
            v = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(2 / (t.numel() // shape[0]))
        elif t.dim() == 1 and name.endswith("weight"):
            v = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            v = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            t.copy_(v.to(t.dtype))


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def assert_summary(x, ref, rtol=1e-4, atol=1e-4):
    """Compare a tensor with a golden summary: shape, sums, strided values and 8 random projections."""
    assert list(x.shape) == list(ref["shape"])
    x = x.detach().double().flatten()
    scale = x.abs().max().item() + 1e-12
    for key, val in [("sum", x.sum()), ("abs_sum", x.abs().sum()), ("sq_sum", x.square().sum())]:
        assert val.item() == pytest.approx(ref[key], rel=rtol, abs=atol * scale * x.numel() ** 0.5), key
    vals = x[:: ref["stride"]][: len(ref["values"])]
    assert torch.allclose(vals, torch.tensor(ref["values"], dtype=torch.float64), rtol=rtol, atol=atol * scale)
    for k, p in enumerate(ref["proj8"]):
        proj = torch.dot(x, torch.randn(x.numel(), generator=torch.Generator().manual_seed(12345 + k), dtype=torch.float64))
        assert proj.item() == pytest.approx(p, rel=rtol, abs=atol * scale * x.numel() ** 0.5), f"proj8[{k}]"


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run tiny models: one thread is faster, and torchrun children start 2 processes of their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over a folder the test fills; yields (root folder, base URL, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            log.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()

#################################################################################
#                                    dit.py                                     #
#################################################################################

def tiny_dit(**kwargs):
    return DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, **kwargs)


@functools.lru_cache(maxsize=None)
def golden_dit():
    g = GOLDEN["dit"]
    model = DiT_models[g["model"]](input_size=g["input_size"], num_classes=g["num_classes"]).eval()
    fill_(model.state_dict(), g["weights_seed"])
    return model, g


def test_dit_state_dict_matches_official_names_and_shapes():
    model, g = golden_dit()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == g["state_dict_keys"]
    assert list(model.state_dict()) == list(g["state_dict_keys"])  # same order too


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
    with torch.no_grad():
        out = model.forward_with_cfg(x, torch.tensor(c["t"]), torch.tensor(c["y"]), c["cfg_scale"])
        plain = model(x, torch.tensor(c["t"]), torch.tensor(c["y"]))
        all_channels = model.forward_with_cfg(x, torch.tensor(c["t"]), torch.tensor(c["y"]), 4.0, cfg_channels=None)
    assert_summary(out, c["forward_with_cfg"])
    # Guiding all channels: every epsilon channel is guided, the variance channels pass through.
    guided = plain[1] + 4.0 * (plain[0] - plain[1])
    assert torch.allclose(all_channels[0, :4], guided[:4], atol=1e-5)
    assert torch.allclose(all_channels[1, :4], guided[:4], atol=1e-5)
    assert torch.allclose(all_channels[:, 4:], plain[:, 4:])
    assert torch.allclose(out[:, 3:4], plain[:, 3:4])  # official default: the 4th channel is not guided


OFFICIAL_INIT = {"sum": 3461.3478871532316, "abs_sum": 647357.651059503,
                 "next_randn": [0.2871421277523041, -0.43598416447639465, 0.8889198303222656]}


def test_dit_init_consumes_rng_like_official():
    # Computed with the official models.py (timm 1.0, torch 2.14): torch.manual_seed(0), then
    # DiT_models["DiT-S/2"](input_size=8, num_classes=10), then torch.randn(3).
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=8, num_classes=10)
    sd = model.state_dict()
    assert sum(v.double().sum().item() for v in sd.values()) == pytest.approx(OFFICIAL_INIT["sum"], rel=1e-12)
    assert sum(v.double().abs().sum().item() for v in sd.values()) == pytest.approx(OFFICIAL_INIT["abs_sum"], rel=1e-12)
    assert torch.randn(3).tolist() == pytest.approx(OFFICIAL_INIT["next_randn"], abs=1e-7)


def test_bf16_autocast_matches_fp32():
    # Under CPU autocast the attention runs as plain matmuls (faster backward); it must be the same function.
    model, g = golden_dit()
    x, t, y = randn(g["x_shape"], g["x_seed"]), torch.tensor(g["t"]), torch.tensor(g["y"])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x, t, y).float()
    assert (out - ref).norm() / ref.norm() < 0.02


PAPER_GFLOPS = {  # Table 4 of the paper, 256x256 images
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}


def test_gflops_reproduce_paper_table():
    for name, ref in PAPER_GFLOPS.items():
        with torch.device("meta"):
            model = DiT_models[name]()
        assert model.gflops() == pytest.approx(ref, rel=0.01), name
    for block, ref in [("in-context", 119.4), ("cross-attention", 137.6), ("adaLN", 118.6), ("adaLN-Zero", 118.6)]:
        with torch.device("meta"):
            model = DiT_models["DiT-XL/2"](block=block)
        assert model.gflops() == pytest.approx(ref, rel=0.01), block


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=8, num_classes=10)
    x, c = torch.randn(2, 4, 384), torch.randn(2, 384)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])), torch.zeros(2, 8, 8, 8))


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_every_block_design_trains(block):
    torch.manual_seed(0)
    model = tiny_dit(block=block)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    model.eval()
    before = model(x, t, y).detach()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = create_diffusion("").training_losses(model, x, t, dict(y=y))["loss"].mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    opt.step()
    model.eval()
    after = model(x, t, y).detach()
    assert after.shape == (4, 8, 8, 8) and not torch.allclose(before, after)
    assert model.gflops() > 0


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny_dit(class_dropout_prob=0)
    for p in model.parameters():  # leave the zero init so that gradients flow everywhere
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


def test_find_model_loads_raw_and_training_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = tiny_dit()
    fill_(model.state_dict(), 1)
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    train_ckpt = tmp_path / "0000100.pt"  # the official train.py layout, args as a Namespace
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-S/8")}, train_ckpt)
    other = tiny_dit()
    other.load_state_dict(find_model(str(raw)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    other.load_state_dict(find_model(str(train_ckpt)))
    assert all(torch.equal(a, ema[k]) for k, a in other.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no DiT checkpoint"):
        find_model(str(tmp_path / "missing.pt"))


def test_mismatched_checkpoint_error_names_both_models():
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"]()
        b = DiT_models["DiT-B/2"]()
    with pytest.raises(ValueError) as e:
        b.load_state_dict(xl.state_dict())
    msg = str(e.value)
    assert "depth 28, hidden 1152" in msg and "DiT-XL/2" in msg and "you built DiT-B/2" in msg


def test_find_model_downloads_official_names_once(http_server, tmp_path, monkeypatch):
    root, url, log = http_server
    model = tiny_dit()
    (root / "DiT").mkdir()
    torch.save(model.state_dict(), root / "DiT" / "DiT-XL-2-256x256.pt")
    monkeypatch.setenv("DIT_WEIGHTS_URL", url + "/DiT")
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    for _ in range(2):
        sd = find_model("DiT-XL-2-256x256.pt")
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert log == ["/DiT/DiT-XL-2-256x256.pt"]  # the second call reads the cache
    assert os.listdir(tmp_path / "cache") == ["DiT-XL-2-256x256.pt"]  # no temp files left behind
    with pytest.raises(Exception):
        find_model("DiT-XL-2-512x512.pt")  # not on the server: fails, and leaves nothing in the cache
    assert os.listdir(tmp_path / "cache") == ["DiT-XL-2-256x256.pt"]

#################################################################################
#                                 diffusion.py                                  #
#################################################################################

def fixed_output_model(out):
    return lambda x, t, **kwargs: out


def test_training_losses_match_official():
    g = GOLDEN["diffusion"]["training_losses"]
    d = create_diffusion("")
    x_start, noise = randn(g["shape"], g["x_start_seed"]), randn(g["shape"], g["noise_seed"])
    out = randn([g["shape"][0], 2 * g["shape"][1]] + g["shape"][2:], g["model_output_seed"])
    terms = d.training_losses(fixed_output_model(out), x_start, torch.tensor(g["t"]), noise=noise)
    for key in ("mse", "vb", "loss"):
        assert terms[key].tolist() == pytest.approx(g[key], rel=1e-5), key


def test_q_sample_and_p_mean_variance_match_official():
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
def test_respacing_matches_official(spacing):
    g = GOLDEN["diffusion"]["respacing"][spacing]
    d = create_diffusion(spacing)
    assert d.timestep_map == g["timestep_map"] and d.num_timesteps == len(g["timestep_map"])
    assert d.betas.sum().item() == pytest.approx(g["betas_sum"], rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(g["betas_last"], rel=1e-12)


def toy_model(x, t):
    tt = (t.double() / 1000).float().view(-1, 1, 1, 1)
    return torch.cat([0.5 * torch.tanh(x) + 0.1 * tt, torch.tanh(0.3 * x - 0.2)], dim=1)


@pytest.mark.parametrize("key", ["ddpm:10", "ddim:ddim10"])
def test_sampling_loops_match_official(key):
    g = GOLDEN["diffusion"]["sampling"][key]
    sampler, spacing = key.split(":")
    d = create_diffusion(spacing)
    torch.manual_seed(g["torch_manual_seed"])
    z = torch.randn(*g["shape"])
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    x = loop(toy_model, z.shape, noise=z, clip_denoised=True, device="cpu")
    assert_summary(x, g["final"])


def test_cosine_schedule_and_fixed_variances():
    d = create_diffusion("", noise_schedule="cosine", learn_sigma=False, sigma_small=True)
    assert d.betas.max().item() <= 0.999 and d.var_type == "fixed_small"
    assert d.alphas_cumprod[-1].item() < 1e-4 < d.alphas_cumprod[0].item()
    x = torch.randn(2, 4, 4, 4)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 999]))
    assert set(terms) == {"loss", "mse"}
    large = create_diffusion("10", learn_sigma=False)
    out = large.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([9, 9]))
    assert torch.allclose(out["variance"], large.betas[9].float().expand_as(x))
    assert create_diffusion("", use_kl=True).training_losses(toy_model, x, torch.tensor([3, 900]))["loss"].shape == (2,)
