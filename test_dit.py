"""
Tests for the whole project: python -m pytest test_dit.py -q
Golden numbers (golden.json, next to this file) were computed by the reference implementations
(official DiT, diffusers' AutoencoderKL, torch-fidelity's TF Inception) on deterministically filled weights.
"""
import argparse
import functools
import hashlib
import http.server
import json
import math
import os
import re
import struct
import subprocess
import sys
import threading

import numpy as np
from PIL import Image
import pytest
import torch

from diffusion import create_diffusion
import diffusion
from dit import DiT, DiT_models, find_model
import dit
import fid
import sample
import train
import vae
import vae as vae_lib

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
    # Training under CPU autocast runs the attention as plain matmuls (faster backward), sampling through SDPA:
    # both must be the same function as fp32.
    model, g = golden_dit()
    x, t, y = randn(g["x_shape"], g["x_seed"]), torch.tensor(g["t"]), torch.tensor(g["y"])
    with torch.no_grad():
        ref = model(x, t, y)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            out = model(x, t, y).float().detach()
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

#################################################################################
#                                     vae.py                                    #
#################################################################################

TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


def tiny_vae(seed=0, **kw):
    m = vae.AutoencoderKL(**{**TINY_VAE, **kw}).eval()
    with torch.no_grad():
        fill_(m.state_dict(), seed)
    return m


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
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", k)
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace(".resnets.", ".block.")
    for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
                 ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"),
                 ("conv_norm_out", "norm_out")):
        k = k.replace(f".{a}.", f".{b}.")
    return k


def to_ldm(sd, levels):
    return {to_ldm_name(k, levels): v[:, :, None, None] if ".attentions." in k and v.dim() == 2 else v
            for k, v in sd.items()}


def to_legacy(sd):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{names[m[1]]}.", k): v
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd_vae():
    gold = json.load(open(os.path.join(HERE, "golden.json")))["vae"]
    cfg = {k: v for k, v in gold["config"].items() if k not in ("down_block_types", "up_block_types", "act_fn")}
    m = vae.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        fill_(m.state_dict(), gold["weights_seed"])
    return m, gold


def test_vae_golden_encode_decode(sd_vae):
    m, gold = sd_vae
    assert m.scaling_factor == 0.18215 and m.shift_factor == 0.0 and m.downsample_factor == 8
    with torch.no_grad():
        post = m.encode(randn((2, 3, 32, 32), gold["x_seed"]).clamp(-1, 1))
        assert_summary(post.mean, gold["encode_mean"])
        assert_summary(post.logvar, gold["encode_logvar"])
        assert_summary(m.decode(randn(gold["z_shape"], gold["z_seed"])), gold["decode"])


def test_vae_key_names_and_formats_match_released_files(sd_vae):
    m, _ = sd_vae
    sd = m.state_dict()
    # sha256 of the sorted lines of the golden set's sd_vae_{diffusers_keys,ldm_keys,diffusers_to_ldm_map}.txt
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


def full_sd_checkpoint(sd, levels):
    """A full SD checkpoint holding sd: Lightning wrapper, LDM names under first_stage_model., UNet, loss, EMA."""
    full = {"first_stage_model." + k: v for k, v in to_ldm(sd, levels).items()}
    full.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "loss.logvar": torch.zeros(1),
                 "model_ema.decay": torch.tensor(0.999), "cond_stage_model.x": torch.zeros(1)})
    return {"state_dict": full, "global_step": 3}


def write_format(m, fmt, directory):
    """Save m's weights in one of the formats users have, in diffusers' directory layout; returns the directory."""
    sd, levels = m.state_dict(), len(m.config["block_out_channels"])
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:  # tiny config: groups cannot be inferred
        json.dump(m.config, f)
    st, pt = (os.path.join(directory, "diffusion_pytorch_model." + e) for e in ("safetensors", "bin"))
    if fmt == "diffusers":
        vae.save_safetensors(sd, st)
    elif fmt == "legacy":  # the released sd-vae-ft-* files
        vae.save_safetensors(to_legacy(sd), st)
    elif fmt == "ldm":
        vae.save_safetensors(to_ldm(sd, levels), st)
    elif fmt == "bin":
        torch.save(sd, pt)
    elif fmt == "sd_ckpt":
        torch.save(full_sd_checkpoint(sd, levels), pt)
    return directory


@pytest.mark.parametrize("fmt", ["diffusers", "legacy", "ldm", "bin", "sd_ckpt"])
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
    vae.save_safetensors(to_ldm(m.state_dict(), 3), path)
    loaded = vae.load_vae(path)
    assert loaded.config["block_out_channels"] == [32, 64, 64] and loaded.config["latent_channels"] == 16
    assert loaded.downsample_factor == 4 and loaded.scaling_factor == 0.18215  # no config: SD default
    assert_same_vae(m, loaded)
    m = tiny_vae(norm_num_groups=32, layers_per_block=2)  # a lone full SD checkpoint (.ckpt)
    torch.save(full_sd_checkpoint(m.state_dict(), 2), tmp_path / "sd.ckpt")
    loaded = vae.load_vae(str(tmp_path / "sd.ckpt"))
    assert loaded.config["layers_per_block"] == 2 and loaded.config["use_quant_conv"]
    assert_same_vae(m, loaded)


def test_vae_config_scaling_shift_roundtrip(tmp_path):
    m = tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
             shift_factor=0.1159)
    vae.save_vae(m, tmp_path / "flux")
    loaded = vae.load_vae(str(tmp_path / "flux"))
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.3611, 0.1159)
    assert_same_vae(m, loaded)
    cfg = json.load(open(tmp_path / "flux" / "config.json"))
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 2 and cfg["_class_name"] == "AutoencoderKL"  # diffusers
    for k in ("scaling_factor", "shift_factor"):
        del cfg[k]
    cfg.update(_diffusers_version="0.30.0", latents_mean=None, down_block_types=["DownEncoderBlock2D"] * 2)
    json.dump(cfg, open(tmp_path / "flux" / "config.json", "w"))
    loaded = vae.load_vae(str(tmp_path / "flux"))
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.18215, 0.0)  # SD defaults when absent


def test_vae_wrong_model_errors_name_the_problem(tmp_path):
    m = tiny_vae()
    d = write_format(m, "diffusers", tmp_path / "a")
    cfg = {**m.config, "block_out_channels": [64, 64]}
    json.dump(cfg, open(tmp_path / "a" / "config.json", "w"))
    with pytest.raises(ValueError, match=r"does not fit the VAE of .*config.json: size mismatch for encoder.conv_in"
                                         r".weight: copying a param with shape torch.Size\(\[32, 3, 3, 3\]\)"):
        vae.load_vae(d)
    json.dump({**cfg, "_class_name": "AutoencoderTiny"}, open(tmp_path / "a" / "config.json", "w"))
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        vae.load_vae(d)
    sd = m.state_dict()
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    json.dump(m.config, open(tmp_path / "a" / "config.json", "w"))
    vae.save_safetensors(sd, str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r'config.json: Missing key\(s\) in state_dict: "decoder.conv_out.bias"\.; '
                                         r'Unexpected key\(s\) in state_dict: "decoder.extra.weight"\.$'):
        vae.load_vae(d)
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "y_embedder.embedding_table.weight": torch.zeros(1)},
               tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="holds no VAE weights.*x_embedder"):
        vae.load_vae(str(tmp_path / "dit.pt"))
    with pytest.raises(FileNotFoundError, match="not a file, a directory, or a Hugging Face repo id"):
        vae.load_vae("no such file.safetensors")
    with pytest.raises(ValueError, match="multiple of 2"):
        m.encode(torch.zeros(1, 3, 5, 6))


def test_safetensors_roundtrip_dtypes(tmp_path):
    ts = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
          "f64": torch.randn(2).double(), "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
          "strided": torch.randn(4, 6)[:, ::2]}
    path = str(tmp_path / "t.safetensors")
    vae.save_safetensors(ts, path)
    head_len = struct.unpack("<Q", open(path, "rb").read(8))[0]
    assert head_len % 8 == 0  # data stays aligned
    back = vae.load_safetensors(path)
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k


def st_bytes(entries, data, header_extra=None):
    """safetensors bytes from a header dict and raw data, written by hand (no writer involved)."""
    head = json.dumps({**entries, **(header_extra or {})}).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_safetensors_reads_hand_built_bytes(tmp_path):
    data = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25) + struct.pack("<3e", 1.5, -0.25, 8.0) \
        + bytes.fromhex("803f00c0003f") + struct.pack("<2q", -5, 1 << 40)  # bf16 1.0, -2.0, 0.5 (little endian)
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


@pytest.mark.parametrize("case,match", [
    ("truncated", r"tensor w \[4\] torch.float32 does not fit bytes 0..16 of the 13 data bytes: truncated"),
    ("tiny", "truncated or not a safetensors file"),
    ("huge_header", "truncated or not a safetensors file"),
    ("bad_json", "corrupt safetensors header"),
    ("bad_dtype", "corrupt safetensors header.*KeyError.*Q7"),
    ("bad_offsets", "tensor w .* does not fit bytes 0..12 of the 16 data bytes"),
])
def test_safetensors_corrupt_files_give_clear_errors(tmp_path, case, match):
    good = st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    blob = {"truncated": good[:-3], "tiny": b"\x01\x02", "huge_header": struct.pack("<Q", 1 << 40) + b"{}",
            "bad_json": struct.pack("<Q", 4) + b"{no}",
            "bad_dtype": st_bytes({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
            "bad_offsets": st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(16)),
            }[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=match):
        vae.load_safetensors(str(path))
    m = tiny_vae()
    write_format(m, "diffusers", tmp_path / "cut")  # a truncated download through load_vae
    w = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.*download again"):
        vae.load_vae(str(tmp_path / "cut"))


def test_vae_bf16_and_fp16_upcast(tmp_path):
    m = tiny_vae()
    d = write_format(m, "diffusers", tmp_path / "v")
    ref = vae_outputs(m)
    b = vae.load_vae(d, dtype=torch.bfloat16)
    assert b.decoder.conv_in.weight.dtype == torch.bfloat16
    for r, o in zip(ref, vae_outputs(b)):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()  # outputs in the caller's dtype
        assert (o - r).norm() / r.norm() < 3e-2
    h = vae.load_vae(d, dtype=torch.float16)
    assert h.decoder.mid_block.resnets[0].conv1.weight.dtype == torch.float16
    assert h.decoder.up_blocks[0].resnets[0].conv1.weight.dtype == torch.float32  # the full-res layers stay fp32
    z = randn((1, 4, 4, 4), 0).half()
    with torch.no_grad():
        h.decoder.up_blocks[-1].resnets[0].conv1.bias.fill_(1e5)  # activations past fp16's 65504
        out = h.decode(z)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert not torch.isfinite(h.half().decode(z)).all()  # what the upcast prevents


def test_vae_slicing_matches_separate_calls():
    m = tiny_vae()
    x, z = randn((5, 3, 8, 8), 0).clamp(-1, 1), randn((5, 4, 4, 4), 1)
    with torch.no_grad():  # conv kernels may differ with batch size, so compare with the same chunks by hand
        means = torch.cat([m.encode(c).mean for c in x.split(2)])
        images = torch.cat([m.decode(c) for c in z.split(2)])
        m.slice_pixels = 2 * 8 * 8  # two 8x8 images per pass
        assert torch.equal(m.encode(x).mean, means) and torch.equal(m.decode(z), images)


def test_vae_posterior_sample_mode():
    m = tiny_vae()
    with torch.no_grad():
        p = m.encode(randn((2, 3, 8, 8), 0))
    eps = torch.randn(p.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p.sample(torch.Generator().manual_seed(7)), p.mean + p.std * eps)
    assert torch.equal(p.mode(), p.mean) and torch.allclose(p.var, p.std ** 2)
    big = vae.DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1))
    assert big.logvar.max() == 20.0  # clamped


def test_vae_cli_roundtrip(tmp_path):
    from PIL import Image
    write_format(tiny_vae(), "diffusers", tmp_path / "v")
    Image.new("RGB", (21, 18), (200, 30, 90)).save(tmp_path / "img.png")
    r = subprocess.run([sys.executable, os.path.join(HERE, "vae.py"), str(tmp_path / "img.png"), "--vae",
                        str(tmp_path / "v")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and Image.open(tmp_path / "img_vae.png").size == (20, 18)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hugging Face endpoint on 127.0.0.1: routes maps path -> (status, headers, body); log records hits."""
    routes, log = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            status, headers, body = routes.get(self.path, (404, {}, b"Entry not found"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    for k in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "dit_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    yield routes, log
    server.shutdown()
    server.server_close()


def publish_vae(routes, repo, m, tmp_path, sha=None, weights="safetensors"):
    """Serve m like the Hub: config.json directly, weights via a redirect to a CDN path that sends X-Linked-Etag."""
    d = tmp_path / "published"
    vae.save_vae(m, d)
    if weights == "bin":
        torch.save(m.state_dict(), d / "w.bin")
    body = (d / ("w.bin" if weights == "bin" else "diffusion_pytorch_model.safetensors")).read_bytes()
    routes[f"/{repo}/resolve/main/config.json"] = (200, {}, (d / "config.json").read_bytes())
    etag = '"%s"' % (sha or hashlib.sha256(body).hexdigest())
    routes[f"/{repo}/resolve/main/diffusion_pytorch_model.{weights}"] = \
        (302, {"Location": f"/cdn/{repo}/blob", "X-Linked-Etag": etag}, b"")
    routes[f"/cdn/{repo}/blob"] = (200, {"ETag": '"not-a-sha256"'}, body)
    return body


def test_download_redirect_cache_and_offline(fake_hub, tmp_path, monkeypatch, capfd):
    routes, log = fake_hub
    m = tiny_vae()
    body = publish_vae(routes, "stabilityai/sd-vae-ft-ema", m, tmp_path)
    assert_same_vae(m, vae.load_vae("ema"))  # the shorthand resolves to the repo DiT uses
    assert "downloading" in capfd.readouterr().err
    cached = tmp_path / "dit_cache" / "stabilityai--sd-vae-ft-ema" / "main"
    assert (cached / "diffusion_pytorch_model.safetensors").read_bytes() == body
    assert sorted(os.listdir(cached)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # no temp files
    hits = len(log)
    assert_same_vae(m, vae.load_vae("stabilityai/sd-vae-ft-ema"))  # from the cache: no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_vae(m, vae.load_vae("ema"))
    assert len(log) == hits
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        vae.load_vae("mse")  # not cached
    assert len(log) == hits


def test_download_sha256_mismatch_leaves_nothing(fake_hub, tmp_path):
    routes, _ = fake_hub
    publish_vae(routes, "org/vae", tiny_vae(), tmp_path, sha="0" * 64)
    with pytest.raises(OSError, match="truncated or corrupt.*sha256 [0-9a-f]{64}, server says 0{64}"):
        vae.load_vae("org/vae")
    assert [f for f in os.listdir(tmp_path / "dit_cache" / "org--vae" / "main") if "diffusion" in f] == []


def test_download_falls_back_to_bin(fake_hub, tmp_path):
    routes, log = fake_hub
    m = tiny_vae()
    publish_vae(routes, "org/vae", m, tmp_path, weights="bin")
    assert_same_vae(m, vae.load_vae("org/vae"))
    assert "/org/vae/resolve/main/diffusion_pytorch_model.safetensors" in log  # safetensors tried first
    with pytest.raises(FileNotFoundError, match="HTTP Error 404.*check the repo id"):
        vae.load_vae("org/missing")


def test_reuses_huggingface_cache_offline(fake_hub, tmp_path, monkeypatch):
    routes, log = fake_hub
    m = tiny_vae()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for env, hub_dir in (("HF_HUB_CACHE", "hf_hub"), ("HF_HOME", "hf_home/hub")):
        if env == "HF_HOME":  # HF_HUB_CACHE unset: the cache is $HF_HOME/hub
            monkeypatch.delenv("HF_HUB_CACHE")
            monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        repo = tmp_path / hub_dir / "models--stabilityai--sd-vae-ft-mse"
        vae.save_vae(m, repo / "snapshots" / "0123abc")  # the layout huggingface_hub writes
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        assert_same_vae(m, vae.load_vae("mse"))
        (repo / "refs" / "main").unlink()
    assert log == [] and not (tmp_path / "dit_cache").exists()


#################################################################################
#                                     fid.py                                    #
#################################################################################

FID_HERE = os.path.dirname(os.path.abspath(__file__))


# sha256 of "key<TAB>shape" lines of pt_inception-2015-12-05 (shared/golden/inception_keys.txt), 566 entries
INCEPTION_KEYS_SHA256 = "e22ace644c9f030d9793411454945147d47bff1a80d8339955d5867176d77687"


@pytest.fixture(scope="module")
def fid_inception():
    """The FID Inception with the golden fill (seed 0), unfolded, in eval mode."""
    m = fid.InceptionV3()
    with torch.no_grad():
        fill_(m.state_dict())
    return m.eval()


@pytest.fixture(scope="module")
def fid_weights_file(fid_inception, tmp_path_factory):
    """The filled state_dict saved like the official .pth file."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_inception.state_dict(), path)
    return path


def fid_images(n, size, seed):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fid_inception_keys_match_official_file():
    sd = fid.InceptionV3().state_dict()
    lines = "\n".join(f"{k}\t{tuple(v.shape)}" for k, v in sd.items())
    assert len(sd) == 566
    assert hashlib.sha256(lines.encode()).hexdigest() == INCEPTION_KEYS_SHA256


@pytest.mark.parametrize("size", ["64", "256", "299"])
def test_fid_golden_features(fid_inception, size):
    golden = json.load(open(os.path.join(FID_HERE, "golden.json")))["inception"]
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


def test_fid_inception_rejects_non_uint8(fid_inception):
    with pytest.raises(ValueError, match="uint8"):
        fid_inception(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) in tensors"):
        fid_inception(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))


def test_fid_tf1_resize_identity_at_299():
    x = fid_images(1, 299, 3).float()
    assert torch.equal(fid.tf1_resize(x), x)


def test_fid_tf1_resize_hand_computed():
    x = torch.tensor([[0.0, 30.0], [60.0, 90.0]]).view(1, 1, 2, 2)
    # sources 0, 2/3, 4/3; the last clamps to pixel 1 (no half-pixel offset, unlike align_corners=False)
    expected = torch.tensor([[0.0, 20.0, 30.0], [40.0, 60.0, 70.0], [60.0, 80.0, 90.0]])
    torch.testing.assert_close(fid.tf1_resize(x, size=3)[0, 0], expected)
    # downscaling by 2 picks every other pixel: TF-1 does not average (aliasing)
    y = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(fid.tf1_resize(y, size=2)[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    mu, sigma = fid.statistics(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-6)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def _fid_psd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_matches_closed_form_on_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), _fid_psd(rng, 8), _fid_psd(rng, 8)
    # independent form: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric eigenproblem
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    one_d = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert one_d == pytest.approx(5.0)


def test_fid_singular_fallback_adds_eps(monkeypatch):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(4), _fid_psd(rng, 4), _fid_psd(rng, 4)
    real_sqrtm, calls = fid.linalg.sqrtm, []
    def flaky_sqrtm(a):  # the first call fails as for a singular product
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


def test_fid_inception_score_definition():
    assert fid.inception_score(np.zeros((20, 1008), np.float32)) == pytest.approx(1.0, abs=1e-12)
    # confident predictions spread evenly over 5 classes -> IS 5; all one class -> IS 1
    five = 1000 * np.eye(1008, dtype=np.float32)[np.arange(10) % 5]
    one = 1000 * np.eye(1008, dtype=np.float32)[np.zeros(10, int)]
    assert fid.inception_score(five) == pytest.approx(5.0, rel=1e-9)
    # ordered splits of split_size: mean over splits of per-split scores
    assert fid.inception_score(np.concatenate([five, one]), split_size=10) == pytest.approx(3.0, rel=1e-9)
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
    x = torch.arange(10.0).view(-1, 1)  # points 0..9 on a line
    radii = fid._radii(x, k=3, rows=4)
    # 3rd neighbour (self excluded), squared: 0 -> 3, 1 -> 3 (0, 2, 3), 4 -> 2 (3, 5, 2), 9 -> 6
    torch.testing.assert_close(radii[[0, 1, 4, 9]], torch.tensor([9.0, 4.0, 4.0, 9.0]))
    assert torch.equal(radii, fid._radii(x, k=3, rows=1000))


def test_fid_precision_recall_on_clusters():
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(size=(100, 8)) + off for off in (0.0, 50.0, -50.0))
    # reference = clusters A and B; samples = A exactly and a far cluster C
    precision, recall = fid.precision_recall(np.concatenate([a, b]), np.concatenate([a, c]), rows=64)
    assert (precision, recall) == (0.5, 0.5)
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least 4"):
        fid.precision_recall(a[:3], a)


def test_fid_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)  # small integers: squared distances are exact in float16
    ref = rng.integers(0, 6, size=(60, 4)).astype(np.float32)
    sample = rng.integers(1, 7, size=(50, 4)).astype(np.float32)
    d = lambda u, v: ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    r_ref, r_sample = np.sort(d(ref, ref), 1)[:, 3], np.sort(d(sample, sample), 1)[:, 3]
    precision = np.mean((d(sample, ref) <= r_ref[None]).any(1))
    recall = np.mean((d(ref, sample) <= r_sample[None]).any(1))
    assert 0 < precision < 1 and 0 < recall < 1
    assert fid.precision_recall(ref, sample, rows=7) == (pytest.approx(precision), pytest.approx(recall))


def _fid_write_folder(path, x):
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(os.path.join(path, f"{i:03d}.png"))
    return path


def _fid_batches(source, batch_size=2):
    n, it = fid.image_batches(source, batch_size)
    out = torch.cat(list(it))
    assert len(out) == n
    return out


def test_fid_npz_folder_array_tensor_give_the_same_images(tmp_path):
    x = fid_images(5, 24, 9)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "a.npz", nhwc)
    np.savez_compressed(tmp_path / "c.npz", nhwc)
    folder = _fid_write_folder(str(tmp_path / "imgs"), x)
    for source in (str(tmp_path / "a.npz"), tmp_path / "c.npz", folder, nhwc, x):
        assert torch.equal(_fid_batches(source), x)


def test_fid_npz_and_tensor_give_the_same_features(fid_inception, tmp_path):
    x = fid_images(2, 32, 10)
    np.savez(tmp_path / "s.npz", x.permute(0, 2, 3, 1).numpy())
    pool3, spatial, logits = fid.compute_features(str(tmp_path / "s.npz"), fid_inception, batch_size=1)
    with torch.no_grad():
        expected = fid_inception(x)
    for a, b in zip((pool3, spatial, logits), expected):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fid_grayscale_files_become_rgb_arrays_must_be_rgb(tmp_path):
    gray = fid_images(2, 16, 11)[:, :1]
    for i, im in enumerate(gray[:, 0].numpy()):
        Image.fromarray(im, mode="L").save(tmp_path / f"{i}.png")
    assert torch.equal(_fid_batches(str(tmp_path)), gray.expand(-1, 3, -1, -1))
    for x in (gray, gray.permute(0, 2, 3, 1).numpy(), gray[:, 0].numpy()):
        with pytest.raises(ValueError, match="repeat to 3 channels"):
            fid.image_batches(x)


def test_fid_bad_inputs_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        fid.image_batches(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="uint8"):
        fid.image_batches(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        fid.image_batches(np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        np.savez(tmp_path / "f.npz", np.zeros((2, 8, 8, 3), np.float32))
        fid.image_batches(str(tmp_path / "f.npz"))
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
        fid.image_batches(str(tmp_path / "k.npz"))
    with pytest.raises(ValueError, match="expected an existing .npz"):
        fid.image_batches(str(tmp_path / "missing.npz"))
    mixed = _fid_write_folder(str(tmp_path / "mixed"), fid_images(2, 8, 0))
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(os.path.join(mixed, "002.png"))
    with pytest.raises(ValueError, match="same size"):
        _fid_batches(mixed)
    broken = _fid_write_folder(str(tmp_path / "broken"), fid_images(1, 8, 0))
    open(os.path.join(broken, "001.png"), "wb").write(b"not a png")
    with pytest.raises(ValueError, match="001.png is not a readable image"):
        _fid_batches(broken)


def test_fid_download_checks_sha256_and_loads(http_server, fid_weights_file, fid_inception, tmp_path):
    root, url, _ = http_server
    data = open(fid_weights_file, "rb").read()
    (root / "w.pth").write_bytes(data)
    dest = str(tmp_path / "cache" / "w.pth")
    with pytest.raises(RuntimeError, match="sha256"):
        fid.download(f"{url}/w.pth", "0" * 64, dest)
    assert os.listdir(tmp_path / "cache") == []  # nothing half-written is left behind
    assert fid.download(f"{url}/w.pth", hashlib.sha256(data).hexdigest(), dest) == dest
    assert open(dest, "rb").read() == data
    model = fid.load_inception(dest)  # same bytes as fid_weights_file, whose outputs are checked above
    torch.testing.assert_close(model.fc.weight, fid_inception.fc.weight, rtol=0, atol=0)


def test_fid_load_inception_uses_the_cache(fid_weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_CACHE", str(tmp_path))
    monkeypatch.setenv("DIT_INCEPTION_URL", "http://127.0.0.1:9/unreachable.pth")
    with pytest.raises(OSError, match="DIT_INCEPTION_URL"):  # nothing cached: the download is tried, and fails
        fid.load_inception()
    assert os.listdir(tmp_path) == []
    os.symlink(fid_weights_file, tmp_path / os.path.basename(fid.WEIGHTS_URL))
    assert isinstance(fid.load_inception(), fid.InceptionV3)


def test_fid_cli_prints_evaluator_lines_and_saves_stats(fid_weights_file, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "ref.npz", fid_images(4, 16, 1).permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "samples.npz", fid_images(4, 16, 2).permute(0, 2, 3, 1).numpy())
    # sqrtm of 2048 x 2048 matrices takes minutes on 2 cores: record the FID calls instead
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: calls.append(a) or float(len(calls)))
    run = lambda *argv: (monkeypatch.setattr("sys.argv", ["fid.py", *map(str, argv)]), fid.main())
    run(tmp_path / "ref.npz", tmp_path / "samples.npz", "--inception", fid_weights_file,
        "--batch-size", 3, "--save-stats", tmp_path / "stats.npz")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    stats = np.load(tmp_path / "stats.npz")
    assert sorted(stats.files) == ["mu", "mu_s", "sigma", "sigma_s"]
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
    (mu, sigma, ref_mu, ref_sigma), (_, _, ref_mu_s, _) = calls
    assert mu.shape == (2048,) and np.array_equal(ref_mu, stats["mu"]) and np.array_equal(ref_mu_s, stats["mu_s"])
    # a statistics-only reference: its stored statistics, no fid_images for precision/recall
    (mu2, sigma2), (mu_s2, sigma_s2), pool3 = fid.reference(str(tmp_path / "stats.npz"), None, 2)
    assert pool3 is None and np.array_equal(mu2, stats["mu"]) and np.array_equal(sigma_s2, stats["sigma_s"])
    with pytest.raises(ValueError, match="no images"):
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        fid.reference(str(tmp_path / "other.npz"), None, 2)


#################################################################################
#                                    train.py                                   #
#################################################################################

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


TINY = ["--model", "DiT-S/8", "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}',
        "--num-workers", "0", "--log-every", "1"]


TINY_LATENT = '{"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}'  # 8x8 latents: 16 tokens


def write_images(root, per_class=(5, 5), flat=False, seed=0):
    """root/class_k/i.png: random RGB images of odd sizes, or flat colours per class (a learnable set)."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(per_class):
        os.makedirs(f"{root}/class_{k}", exist_ok=True)
        for i in range(n):
            h, w = rng.integers(16, 40, size=2)
            if flat:
                a = np.broadcast_to(np.array([[200, 30, 30], [30, 30, 200]][k % 2], np.uint8), (h, w, 3))
            else:
                a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(np.ascontiguousarray(a)).save(f"{root}/class_{k}/{i}.png")
    return str(root)


DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import train
dist.init_process_group("gloo")  # train.main uses the caller's group: several runs in one launch
for argv in json.load(open(sys.argv[1])):
    train.main(argv)
dist.destroy_process_group()
"""


def run_torchrun(script_and_args, cwd, nproc=2):
    """torchrun with nproc gloo processes (1 thread each) on the CPU; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *script_and_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def run_torchrun_many(runs, cwd, nproc=2):
    """train.main(argv) for each argv in runs, all in one torchrun launch (start-up is most of the time here)."""
    with open(os.path.join(cwd, "driver.py"), "w") as f:
        f.write(DRIVER.format(repo=os.path.dirname(TRAIN)))
    with open(os.path.join(cwd, "runs.json"), "w") as f:
        json.dump(runs, f)
    return run_torchrun(["driver.py", "runs.json"], cwd, nproc)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2-process gloo runs: `torchrun train.py` pixel space 5 steps straight (a); then in one more launch:
    2 steps then resumed to 5 (b), and a latent run with a tiny VAE whose cache both ranks build (c)."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_images(root / "data", per_class=(7, 6))  # 13 images, batch 4 on 2 ranks: 3 steps per epoch
    pixel = [*TINY, "--data-path", data, "--vae", "none", "--image-size", "16", "--num-classes", "2",
             "--global-batch-size", "4", "--ckpt-every", "2"]
    latent = [*TINY, "--data-path", data, "--vae", tiny_vae_dir(root / "vae"), "--image-size", "16",
              "--num-classes", "2", "--global-batch-size", "2", "--model-kwargs", TINY_LATENT]
    a = run_torchrun([TRAIN, *pixel, "--results-dir", "a", "--max-steps", "5"], cwd=root)
    r = run_torchrun_many([[*pixel, "--results-dir", "b", "--max-steps", "2"],
                      [*pixel, "--resume", "b/000-DiT-S-8", "--max-steps", "5"],
                      [*latent, "--results-dir", "c", "--latent-cache", "cache", "--max-steps", "2"]], cwd=root)
    return root, a.stdout + r.stdout


def run_inline(args):
    """train.main in this process, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(args)
    finally:
        torch.set_num_threads(threads)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_vae_dir(path):
    """A small filled VAE (down-sampling 2, 4 latent channels) saved where --vae can load it."""
    torch.manual_seed(0)
    v = vae_lib.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    vae_lib.save_vae(v, str(path))
    return str(path)


def test_center_crop_matches_adm():
    """Box-halving then bicubic to the short side, centre crop: shapes and a pure-resize case."""
    a = np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8)
    out = train.center_crop_arr(Image.fromarray(a), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    half = Image.fromarray(a).resize((75, 35), resample=Image.BOX)  # 70 >= 64: halved once
    ref = np.asarray(half.resize((round(75 * 32 / 35), 32), resample=Image.BICUBIC))
    left = (ref.shape[1] - 32) // 2
    np.testing.assert_array_equal(out, ref[:, left:left + 32])


def test_epoch_order_is_distributed_sampler():
    """Same indices as DistributedSampler(shuffle=True, seed), padded, split over ranks; flips per index."""
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


def test_ddp_resume_is_bit_identical(ddp_runs):
    """2-process gloo DDP, pixel space: 5 steps straight == 2 steps + resume (mid-epoch) + 3 steps (crossing
    into the next epoch): model, EMA, optimizer and every rank's RNG bit-identical."""
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
    assert [torch.equal(a["cpu"], b["cpu"]) for a, b in zip(straight["rng"], resumed["rng"])] == [True, True]
    assert not torch.equal(straight["rng"][0]["cpu"], straight["rng"][1]["cpu"])  # one stream per rank
    first = load(root / "a/000-DiT-S-8/checkpoints/0000002.pt")
    assert (first["epoch"], first["batch"]) == (0, 2)  # the resume point is inside an epoch
    assert not torch.equal(first["ema"]["final_layer.linear.weight"], straight["ema"]["final_layer.linear.weight"])
    assert "(step=0000005)" in open(root / "b/000-DiT-S-8/log.txt").read()  # the log goes on in the same folder


def test_checkpoint_layout_logging_samples_and_find_model(tmp_path):
    """Official layout and keys, weights_only loading, dit.find_model, --keep-last, log lines, sample grid."""
    data = write_images(tmp_path / "data")
    run_inline([*TINY, "--data-path", data, "--results-dir", str(tmp_path / "results"), "--vae", "none",
                "--image-size", "16", "--num-classes", "1", "--global-batch-size", "2", "--max-steps", "3",
                "--ckpt-every", "1", "--keep-last", "2", "--sample-every", "3"])
    exp = tmp_path / "results/000-DiT-S-8"
    assert sorted(os.listdir(exp / "checkpoints")) == ["0000002.pt", "0000003.pt"]
    ckpt = load(exp / "checkpoints/0000003.pt")
    assert {"model", "ema", "opt", "args"} <= set(ckpt) and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["model"] == "DiT-S/8" and ckpt["step"] == 3
    sd = dit.find_model(str(exp / "checkpoints/0000003.pt"))
    assert all(torch.equal(sd[k], v) for k, v in ckpt["ema"].items())
    model = dit.DiT(input_size=16, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1)
    model.load_state_dict(sd)
    log = open(exp / "log.txt").read()
    assert "(step=0000003) loss" in log and "steps/s" in log and "img/s" in log and "Saved checkpoint" in log
    grid = Image.open(exp / "samples/0000003.png")
    assert grid.size == (64, 64) and grid.mode == "RGB"


def test_loss_goes_down_on_a_learnable_set(tmp_path):
    """Flat colour per class: the tiny pixel DiT's loss falls several-fold within 60 steps."""
    data = write_images(tmp_path / "data", per_class=(8, 8), flat=True)
    run_inline([*TINY, "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}',
                "--data-path", data, "--results-dir", str(tmp_path / "r"), "--vae", "none", "--image-size", "8",
                "--num-classes", "2", "--global-batch-size", "16", "--max-steps", "60", "--lr", "2e-3",
                "--log-every", "10", "--ckpt-every", "1000"])
    lines = [l for l in open(tmp_path / "r/000-DiT-S-8/log.txt") if "(step=" in l]
    losses = [float(l.split("loss ")[1].split(",")[0]) for l in lines]
    assert len(losses) == 6 and losses[-1] < 0.3 * losses[0], losses


def test_latent_cache_ddp_and_same_inputs(ddp_runs):
    """Latent path with a tiny VAE: 2 ranks built the cache (mean and std of every image and its mirror) and
    trained from it; a cached draw equals vae.encode(x).sample() under the same random state."""
    root, stdout = ddp_runs
    assert "Wrote latent cache" in stdout and not os.path.exists(root / "cache.tmp")
    ckpt = load(root / "c/000-DiT-S-8/checkpoints/0000002.pt")
    assert ckpt["model"]["x_embedder.proj.weight"].shape[1] == 4  # latent channels
    vae = vae_lib.load_vae(str(root / "vae"))
    _, samples = train.find_images(str(root / "data"))
    images, cache = train.ImageFolder(samples, 16), train.LatentCache(str(root / "cache"))
    assert list(cache.labels) == [0] * 7 + [1] * 6
    for i in range(13):  # rows written by both ranks
        for flip in (0, 1):
            x, y = images[(i, flip)]
            cached, label = cache[(i, flip)]
            posterior = vae.encode(x[None])
            assert label == y and cached.shape == (2, 4, 8, 8)
            torch.testing.assert_close(cached[0], posterior.mean[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cached[1], posterior.std[0], rtol=1e-5, atol=1e-6)
            torch.manual_seed(i)
            direct = train.to_latent(x[None], vae, cached=False)
            torch.manual_seed(i)
            from_cache = train.to_latent(cached[None], vae, cached=True)
            torch.testing.assert_close(from_cache, direct, rtol=1e-5, atol=1e-5)
    # the cache is reused, and refused for other settings; the on-the-fly VAE path trains and samples too
    common = [*TINY, "--data-path", str(root / "data"), "--vae", str(root / "vae"), "--image-size", "16",
              "--num-classes", "2", "--global-batch-size", "2", "--model-kwargs", TINY_LATENT,
              "--results-dir", str(root / "d"), "--max-steps", "1"]
    run_inline([*common, "--latent-cache", str(root / "cache")])
    with pytest.raises(SystemExit, match="latent-cache .* holds other images or settings"):
        run_inline([*common, "--latent-cache", str(root / "cache"), "--image-size", "32"])
    run_inline([*common, "--sample-every", "1"])
    assert Image.open(root / "d/001-DiT-S-8/samples/0000001.png").size == (64, 64)


def test_bf16_and_fp16_steps_run(tmp_path):
    """Mixed precision paths (bf16 autocast; fp16 with a grad scaler that is saved for resume)."""
    data = write_images(tmp_path / "data")
    common = [*TINY, "--data-path", data, "--results-dir", str(tmp_path / "r"), "--vae", "none",
              "--image-size", "16", "--num-classes", "2", "--global-batch-size", "2", "--max-steps", "2"]
    run_inline([*common, "--precision", "bf16"])
    run_inline([*common, "--precision", "fp16", "--grad-checkpointing"])
    ckpt = load(tmp_path / "r/001-DiT-S-8/checkpoints/0000002.pt")
    assert ckpt["scaler"]["scale"] > 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run with a message naming the last good checkpoint; none is written after."""
    data = write_images(tmp_path / "data")
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
    with pytest.raises(SystemExit, match=r"NaN/inf at step 4 or before; last good checkpoint: .*0000002.pt"):
        run_inline([*TINY, "--data-path", data, "--results-dir", str(tmp_path / "r"), "--vae", "none",
                    "--image-size", "16", "--num-classes", "2", "--global-batch-size", "2", "--max-steps", "6",
                    "--ckpt-every", "2", "--log-every", "4"])
    assert os.listdir(tmp_path / "r/000-DiT-S-8/checkpoints") == ["0000002.pt"]


def test_bad_inputs_fail_before_compute(tmp_path):
    """Clear errors for: batch not divisible by the world size, missing/empty/class-less data, an image size
    the VAE or patch can't take, too few --num-classes, and --resume of another model's checkpoint."""
    data = write_images(tmp_path / "data")
    base = [*TINY, "--results-dir", str(tmp_path / "r"), "--vae", "none", "--num-classes", "2",
            "--global-batch-size", "2", "--max-steps", "1"]
    args = train.parse_args([*base, "--data-path", data, "--image-size", "16", "--global-batch-size", "3"])
    with pytest.raises(SystemExit, match="--global-batch-size 3 is not divisible by the 2 processes"):
        train.train(args, rank=0, world_size=2, device=torch.device("cpu"))
    os.makedirs(tmp_path / "empty/cls")
    cases = [(["--data-path", str(tmp_path / "nope"), "--image-size", "16"], "is not a directory"),
             (["--data-path", str(tmp_path / "empty/cls"), "--image-size", "16"], "with class sub-folders"),
             (["--data-path", str(tmp_path / "empty"), "--image-size", "16"], "has no images"),
             (["--data-path", data, "--image-size", "20"], "--image-size 20 is not a multiple of 8"),
             (["--data-path", data, "--image-size", "16", "--latent-cache", "x"], "--latent-cache needs a VAE"),
             (["--data-path", data, "--image-size", "16", "--model-kwargs", "depth=2"], "must be a JSON object")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            run_inline([*base, *extra])
    write_images(tmp_path / "three", per_class=(2, 2, 2))
    with pytest.raises(SystemExit, match="3 class folders but --num-classes is 2"):
        run_inline([*base, "--data-path", str(tmp_path / "three"), "--image-size", "16"])
    vae_dir = tiny_vae_dir(tmp_path / "vae")
    with pytest.raises(SystemExit, match=r"--image-size 12 is not a multiple of 16 \(VAE down-sampling 2"):
        run_inline([*base, "--data-path", data, "--image-size", "12", "--vae", vae_dir])
    assert not os.path.exists(tmp_path / "r")  # nothing was created by the failed runs
    run_inline([*base, "--data-path", data, "--image-size", "16"])
    exp = str(tmp_path / "r/000-DiT-S-8")
    with pytest.raises(SystemExit, match="was trained with --model-kwargs"):
        run_inline([*base, "--data-path", data, "--image-size", "16", "--resume", exp,
                    "--model-kwargs", '{"depth": 3, "hidden_size": 32, "num_heads": 2}'])
    with pytest.raises(SystemExit, match="was trained with --image-size 16, not 32"):
        run_inline([*base, "--data-path", data, "--image-size", "32", "--resume", exp])
    torch.save({"model": {}, "ema": {}}, tmp_path / "official.pt")
    with pytest.raises(SystemExit, match="not a checkpoint written by this train.py"):
        run_inline([*base, "--data-path", data, "--image-size", "16", "--resume", str(tmp_path / "official.pt")])


def test_corrupt_image_is_named_and_skipped(tmp_path, capsys):
    """An unreadable file is reported by name on stderr and replaced by the next image; never a crash."""
    data = write_images(tmp_path / "data", per_class=(2, 2))
    with open(tmp_path / "data/class_0/0.png", "wb") as f:
        f.write(b"not a png")
    _, samples = train.find_images(data)
    x, y = train.ImageFolder(samples, 16)[(0, 1)]
    err = capsys.readouterr().err
    assert f"skipping unreadable image {samples[0][0]}" in err and samples[0][0].endswith("class_0/0.png")
    ref, _ = train.ImageFolder(samples, 16)[(1, 1)]
    assert torch.equal(x, ref) and y == 0 and x.shape == (3, 16, 16)


#################################################################################
#                                   sample.py                                   #
#################################################################################

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


# sha256 of the pixels torchvision 0.29's save_image(x, nrow=4, normalize=True, value_range=(-1, 1)) writes for
# x = randn((n, 3, 6, 7), seed n) * 1.5 (computed once with torchvision; it is not a dependency).
TORCHVISION_GRID_SHA256 = {5: "227e872104a061968cb0c271f0dc6fb5da3996b90e403a1a2b5d3b91240be46d",
                           8: "f8ca214d4be3d88a91e877ae163caf8f351f7be78752338fe677012621686ee3"}


@pytest.mark.parametrize("n", [5, 8])
def test_sample_grid_matches_torchvision_save_image(n):
    x = torch.randn((n, 3, 6, 7), generator=torch.Generator().manual_seed(n), dtype=torch.float64).float() * 1.5
    grid = sample.make_grid(x)
    assert grid.shape == (2 * (6 + 2) + 2, 4 * (7 + 2) + 2, 3) and grid.dtype == np.uint8
    assert hashlib.sha256(grid.tobytes()).hexdigest() == TORCHVISION_GRID_SHA256[n]
    assert np.array_equal(grid, sample_grid_reference(x.numpy()))  # the test's own reference agrees too


SAMPLE_DDIM = ["--sampler", "ddim", "--cfg-all-channels", "--labels", "3", "999", "0", "5", "7"]


@pytest.mark.parametrize("extra", [[], SAMPLE_DDIM], ids=["ddpm", "ddim-all-channels-5-labels"])
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
def test_sample_bad_input_fails_before_sampling(sample_files, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as e:
        sample.main(sample_latent_args(sample_files, tmp_path / "x.png", *change))  # the last of a repeated flag wins
    assert message in str(e.value)
    assert not (tmp_path / "x.png").exists() and "sampling step" not in capsys.readouterr().err


def test_sample_download_requires_official_model():
    with pytest.raises(SystemExit, match="only DiT-XL/2"):
        sample.main([*SAMPLE_TINY_ARGS, "--image-size", "32"])


def sample_pixel_fid_args(out, n, *extra):
    return [*SAMPLE_TINY_ARGS, "--vae", "none", "--image-size", "16", "--num-classes", "10",
            "--num-sampling-steps", "3", "--per-proc-batch-size", "2", "--num-fid-samples", str(n),
            "--out", str(out), *extra]


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


def test_sample_default_download_from_local_servers(sample_files, tmp_path, monkeypatch, http_server):
    # Stand-ins: the official DiT-XL/2 is the tiny model (so its checkpoint is small), the SD VAE a tiny one
    # that downsamples 8x, both served over HTTP from 127.0.0.1 as the two real hosts would.
    monkeypatch.setitem(dit.DiT_models, "DiT-XL/2", lambda **kw: dit.DiT(**SAMPLE_TINY, **kw))
    root, url, requests = http_server
    (root / "dit").mkdir(parents=True)
    torch.save(sample_fill_(dit.DiT(input_size=32, num_classes=1000, **SAMPLE_TINY), seed=4, scale=0.5),
               root / "dit" / "DiT-XL-2-256x256.pt")
    v = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    sample_fill_(v, seed=5)
    vae.save_vae(v, root / "stabilityai" / "sd-vae-ft-mse" / "resolve" / "main")
    monkeypatch.setenv("DIT_WEIGHTS_URL", url + "/dit")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = ["--num-sampling-steps", "2", "--labels", "1", "2"]
    sample.main(args + ["--out", str(tmp_path / "a.png")])  # everything else default: DiT-XL/2, 256, mse
    assert "/dit/DiT-XL-2-256x256.pt" in requests
    assert "/stabilityai/sd-vae-ft-mse/resolve/main/config.json" in requests
    served = len(requests)
    assert sample_png(tmp_path / "a.png").shape == (256 + 4, 2 * 256 + 6, 3)
    sample.main(args + ["--out", str(tmp_path / "b.png")])
    assert len(requests) == served  # the second run reads the caches
    sample.main(args + ["--out", str(tmp_path / "c.png"), "--ckpt", str(root / "dit" / "DiT-XL-2-256x256.pt"),
                        "--vae", str(root / "stabilityai" / "sd-vae-ft-mse" / "resolve" / "main")])
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "b.png"))
    assert np.array_equal(sample_png(tmp_path / "a.png"), sample_png(tmp_path / "c.png"))
