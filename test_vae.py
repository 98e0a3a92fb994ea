"""Tests for vae.py: golden parity with diffusers' AutoencoderKL, every checkpoint format, the safetensors
reader/writer, and the downloader against a local HTTP server. Run: python -m pytest test_vae.py -q"""
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

import pytest
import torch

import vae

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs run ~50x slower with 2 OpenMP threads on a busy 2-core machine: use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fill_(sd, seed=0):
    """The golden weight fill (see golden README): deterministic values for every float tensor, by sorted name."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(sd):
        t = sd[name]
        if t.is_floating_point():
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            v = r * math.sqrt(2 / (t.numel() // t.shape[0])) if t.dim() >= 2 else \
                1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            t.copy_(v.to(t.dtype))


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def check_summary(t, s):
    """Compare a tensor with a golden summary (shape, sums, strided values, 8 random projections)."""
    assert list(t.shape) == list(s["shape"])
    t = t.detach().double().flatten()
    for key, val in (("sum", t.sum()), ("abs_sum", t.abs().sum()), ("sq_sum", t.pow(2).sum())):
        assert val.item() == pytest.approx(s[key], rel=1e-4, abs=1e-4 * s["abs_sum"] / t.numel() ** 0.5), key
    torch.testing.assert_close(t[::s["stride"]][:32], torch.tensor(s["values"], dtype=torch.float64), rtol=0, atol=1e-4)
    proj = [t @ torch.randn(t.numel(), generator=torch.Generator().manual_seed(12345 + k), dtype=torch.float64)
            for k in range(8)]
    scale = s["sq_sum"] ** 0.5  # each projection is ~N(0, sq_sum): compare relative to that
    for a, b in zip(proj, s["proj8"]):
        assert abs(a.item() - b) <= 1e-4 * scale, (a.item(), b)


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


# ---- independent writers of the other key formats (the inverse of what vae.py reads) ----

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

#################################################################################
#                     Golden parity (diffusers AutoencoderKL)                    #
#################################################################################

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
        check_summary(post.mean, gold["encode_mean"])
        check_summary(post.logvar, gold["encode_logvar"])
        check_summary(m.decode(randn(gold["z_shape"], gold["z_seed"])), gold["decode"])


def test_vae_key_names_and_formats_match_released_files(sd_vae):
    m, _ = sd_vae
    sd = m.state_dict()
    # sha256 of the sorted lines of ../shared/golden/sd_vae_{diffusers_keys,ldm_keys,diffusers_to_ldm_map}.txt
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

#################################################################################
#                        Every checkpoint format, same VAE                      #
#################################################################################

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

#################################################################################
#                                 safetensors                                   #
#################################################################################

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

#################################################################################
#                         Precision, slicing, sampling, CLI                     #
#################################################################################

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

#################################################################################
#                      Download (local HTTP server, no internet)                #
#################################################################################

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
