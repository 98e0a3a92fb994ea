"""
The Stable Diffusion VAE (AutoencoderKL, Rombach et al. 2022) whose latent space DiT works in (a 256x256 image
becomes a 4x32x32 latent): diffusers' AutoencoderKL, same function and parameter names, in PyTorch alone, with its
own safetensors reader and Hugging Face downloader, for every common copy of the weights (diffusers, LDM, SD).

    vae = load_vae("ema")                               # stabilityai/sd-vae-ft-ema, what DiT uses
    latent = (vae.encode(x).sample() - vae.shift_factor) * vae.scaling_factor   # x in [-1, 1]
    image = vae.decode(latent / vae.scaling_factor + vae.shift_factor)
    python vae.py IMAGE [--vae mse]                     # round-trip an image: writes IMAGE_vae.png
"""
import hashlib
import inspect
import json
import math
import os
import pathlib
import re
import struct
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}

#################################################################################
#                                 Building Blocks                               #
#################################################################################

class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) twice plus a skip; a 1x1 conv on the skip when channels change."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        # in place on fresh tensors: fewer big allocations (the VAE is frozen, autograd never needs them)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions plus a residual (the mid blocks' only attention)."""
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' name is to_out.0

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C), no copy for channels-last x
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        return self.to_out[0](o).transpose(1, 2).reshape(n, c, h, w) + x  # channels-last view, no copy


class Resample(nn.Module):
    """2x down: pad right and bottom only (LDM's asymmetric pad), stride-2 3x3 conv; 2x up: nearest, 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """n resnets, then an optional 2x resampler (Down/UpDecoderBlock2D); or with attn, resnet, attention, resnet."""
    def __init__(self, cin, cout, n, groups, down=False, up=False, attn=False):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(cout, groups)] if attn else [])  # first, as in diffusers
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n))
        self.downsamplers = nn.ModuleList([Resample(cout, down=True)] if down else [])
        self.upsamplers = nn.ModuleList([Resample(cout, down=False)] if up else [])

    def forward(self, x):
        for m in (self.resnets[0], *self.attentions, *self.resnets[1:], *self.downsamplers, *self.upsamplers):
            x = m(x)
        return x


class Encoder(nn.Module):
    """Image (N, 3, H, W) -> moments (N, 2*latent, H/f, W/f): mean and log-variance stacked."""
    def __init__(self, cin, cout, chans, n, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        self.down_blocks = nn.Sequential(*(Level(chans[max(i - 1, 0)], c, n, groups, down=i < len(chans) - 1)
                                           for i, c in enumerate(chans)))
        self.mid_block = Level(chans[-1], chans[-1], 2, groups, attn=True)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cout, 3, padding=1)

    def forward(self, x):
        h = self.mid_block(self.down_blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, 3, h*f, w*f); one more resnet per level than the encoder."""
    def __init__(self, cin, cout, chans, n, groups):
        super().__init__()
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        self.up_blocks = nn.Sequential(*(Level(rev[max(i - 1, 0)], c, n + 1, groups, up=i < len(rev) - 1)
                                         for i, c in enumerate(rev)))
        self.mid_block = Level(rev[0], rev[0], 2, groups, attn=True)
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z)).to(self.conv_out.weight.dtype)  # fp32 from here if load_vae upcast
        return self.conv_out(F.silu(self.conv_norm_out(self.up_blocks(h)), inplace=True))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)) from the encoder's moments (N, 2C, h, w)."""
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator=None):
        """mean + std * eps, eps drawn on the generator's device (as diffusers does, so seeds match)."""
        dev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean

#################################################################################
#                                  AutoencoderKL                                #
#################################################################################

class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion; keyword arguments are diffusers' config.json keys."""
    slice_pixels = 8 * 256 * 256  # encode/decode at most this many image pixels per pass, to bound memory

    def __init__(self, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                 use_quant_conv=True, use_post_quant_conv=True, force_upcast=True, sample_size=256):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        chans, groups = tuple(block_out_channels), norm_num_groups
        self.config = {**config, "block_out_channels": list(chans)}
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor or 0.0)
        self.downsample_factor = 2 ** (len(chans) - 1)
        self.encoder = Encoder(in_channels, 2 * latent_channels, chans, layers_per_block, groups)
        self.decoder = Decoder(latent_channels, out_channels, chans, layers_per_block, groups)
        c = latent_channels  # FLUX/SD3 VAEs have no quant convs
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if use_post_quant_conv else nn.Identity()

    def _sliced(self, net, x, pixels):
        """net(x) in slices of at most slice_pixels image pixels, in the dtype of net's first layer."""
        dtype = next(net.parameters()).dtype  # the fp16 start of an upcast decoder takes fp16 inputs
        # channels-last (NHWC) activations: oneDNN and cuDNN convs run faster on them
        parts = [net(chunk.to(dtype, memory_format=torch.channels_last)).to(x.dtype).contiguous()
                 for chunk in x.split(max(1, self.slice_pixels // pixels))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def encode(self, x):
        """Images (N, C, H, W) in [-1, 1] -> posterior (DiagonalGaussian) over latents (N, latent, H/f, W/f)."""
        f, (H, W) = self.downsample_factor, x.shape[-2:]
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must be a multiple of {f}; crop or resize it")
        return DiagonalGaussian(self._sliced(nn.Sequential(self.encoder, self.quant_conv), x, H * W))

    def decode(self, z):
        """Latents (N, latent, h, w), already unscaled -> images (N, C, h*f, w*f) in about [-1, 1]."""
        pixels = z.shape[-2] * z.shape[-1] * self.downsample_factor ** 2
        return self._sliced(nn.Sequential(self.post_quant_conv, self.decoder), z, pixels)

#################################################################################
#                          Checkpoint Formats and Loading                       #
#################################################################################

ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",  # LDM
              "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # legacy diffusers


def convert_state_dict(sd):
    """Any known key format (current/legacy diffusers, CompVis/LDM, full SD checkpoint) -> current diffusers."""
    if isinstance(sd.get("state_dict"), dict):  # Lightning checkpoints wrap the weights
        sd = sd["state_dict"]
    if any(k.startswith("first_stage_model.") for k in sd):  # full SD checkpoint: keep the VAE, drop UNet etc.
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}  # training leftovers
    top = max((int(m[1]) for k in sd for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m), default=0)
    out = {}
    for k, v in sd.items():
        # LDM numbers decoder levels from the lowest resolution up; diffusers in the order they run
        k = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{top - int(m[1])}.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", k)
        k = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", k)
        for a, b in ((".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
                     (".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."),
                     (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
                     (".mid.attn_1.", ".mid_block.attentions.0.")):
            k = k.replace(a, b)
        k = re.sub(r"(attentions\.0\.)(\w+)\.", lambda m: m[1] + ATTN_NAMES.get(m[2], m[2]) + ".", k)
        out[k] = v[:, :, 0, 0] if ".attentions.0.to_" in k and v.dim() == 4 else v  # LDM: 1x1 convs = Linear
    return out


def load_vae(name_or_path="stabilityai/sd-vae-ft-ema", device="cpu", dtype=torch.float32):
    """A ready AutoencoderKL (eval, frozen) from "ema"/"mse", a HF repo id, a directory, or a weights file."""
    name, config = SHORTHANDS.get(name_or_path, str(name_or_path)), None
    if os.path.isdir(name):  # diffusers' layout: config.json + diffusion_pytorch_model.safetensors (or .bin)
        config, weights = os.path.join(name, "config.json"), os.path.join(name, "diffusion_pytorch_model.safetensors")
        weights = weights if os.path.isfile(weights) else weights.replace(".safetensors", ".bin")
    elif os.path.isfile(name):
        weights = name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):  # a Hub repo: a cached copy of either file, else safetensors
        names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        weights = next((p for n in names for p in cache_paths(name, n) if os.path.isfile(p)), None)
        weights = weights or hub_file(name, names[0], missing_ok=True) or hub_file(name, names[1])
        config = hub_file(name, "config.json")
    else:
        raise FileNotFoundError(f"{name!r} is not a file, a directory, or a Hugging Face repo id "
                                f"(like 'stabilityai/sd-vae-ft-ema'; shorthands: {', '.join(SHORTHANDS)})")
    sd = convert_state_dict(load_safetensors(weights) if weights.endswith(".safetensors") else
                            torch.load(weights, map_location="cpu", weights_only=True))  # tensors, never code
    if "decoder.conv_in.weight" not in sd:
        raise ValueError(f"{weights} holds no VAE weights (keys like {', '.join(list(sd)[:3])}); pass an SD VAE")
    if config:
        with open(config) as f:
            cfg = json.load(f)
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{config}: a {cfg['_class_name']}, but vae.py implements only AutoencoderKL (SD VAEs)")
        cfg = {k: v for k, v in cfg.items() if k in inspect.signature(AutoencoderKL).parameters}
    else:  # a lone file: the architecture read off its weight shapes; scaling and shift need config.json
        convs = {tuple(map(int, m.groups())): v.shape[0] for k, v in sd.items()  # {(level, resnet): channels}
                 for m in [re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight", k)] if m}
        cfg = dict(latent_channels=sd["decoder.conv_in.weight"].shape[1], layers_per_block=1 + max(convs)[1],
                   block_out_channels=[c for (_, i), c in sorted(convs.items()) if i == 0],
                   use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)
    with torch.device("meta"):  # no random init: it would be thrown away, and would use up the global RNG
        vae = AutoencoderKL(**cfg)
    try:
        vae.load_state_dict(sd, assign=True)  # strict: a key missing, left over or of another shape is an error
    except RuntimeError as e:  # torch names them all (a line per kind or per shape): show the first three
        raise ValueError(f"{weights} does not fit the VAE of {config or 'its weight shapes'}: "
                         + "; ".join(line.strip()[:300] for line in str(e).split("\n\t")[1:4])) from None
    vae = vae.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if dtype == torch.float16 and vae.config["force_upcast"]:
        # fp16 overflows (NaN, black images) in the full-resolution layers of SD VAEs; as diffusers'
        # upcast_vae does, only the cheap low-resolution start of the decoder stays in fp16
        vae.float()
        for m in (vae.post_quant_conv, vae.decoder.conv_in, vae.decoder.mid_block):
            m.half()
    return vae


def save_vae(vae, directory):
    """Write config.json + diffusion_pytorch_model.safetensors (the diffusers layout) into directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.json")
    n = len(vae.config["block_out_channels"])  # the block types too, or diffusers would build one level
    cfg = {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n,
           "up_block_types": ["UpDecoderBlock2D"] * n, **vae.config}
    pathlib.Path(path + ".tmp").write_text(json.dumps(cfg, indent=2))
    os.replace(path + ".tmp", path)  # atomic: never half a config
    save_safetensors(vae.state_dict(), os.path.join(directory, "diffusion_pytorch_model.safetensors"))

#################################################################################
#                        safetensors Files and Hub Downloads                    #
#################################################################################
# A little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]},
# "__metadata__": {str: str}}, then the raw little-endian tensor bytes (offsets count from their start).

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors, checking every offset against the file size."""
    with open(path, "rb") as f:
        blob = bytearray(f.read())  # writable, so the tensors can share its memory
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else len(blob)
    if len(blob) < 8 or n > len(blob) - 8:
        raise ValueError(f"{path}: truncated or not a safetensors file (header length {n}, file size {len(blob)}); "
                         "delete it and download again")
    try:
        entries = {k: (ST_DTYPES[v["dtype"]], [int(s) for s in v["shape"]], [int(o) for o in v["data_offsets"]])
                   for k, v in json.loads(blob[8:8 + n]).items() if k != "__metadata__"}
    except Exception as e:
        raise ValueError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    sd, size = {}, len(blob) - 8 - n
    for name, (dtype, shape, (begin, end)) in entries.items():
        if not 0 <= begin <= end <= size or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} {shape} {dtype} does not fit bytes {begin}..{end} of the {size} "
                             "data bytes: truncated or corrupt; delete it and download again")
        sd[name] = torch.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=8 + n + begin).reshape(shape) \
            if end > begin else torch.zeros(shape, dtype=dtype)
    return sd


def save_safetensors(tensors, path):
    """Write a dict of tensors as .safetensors, atomically (temp file + rename)."""
    names, header, blobs, offset = {v: k for k, v in ST_DTYPES.items()}, {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blobs.append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blobs[-1])])
        offset += len(blobs[-1])
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keeps the data 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.writelines(blobs)
    os.replace(path + ".tmp", path)


def cache_paths(repo, filename):
    """A Hub repo file's place in DIT_CACHE (where downloads go) and in the standard Hugging Face cache."""
    hf = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or "~/.cache/huggingface", "hub")
    hf = pathlib.Path(hf, "models--" + repo.replace("/", "--")).expanduser()
    ref = hf / "refs" / "main"  # huggingface_hub keeps the files in snapshots/<the commit main points at>/
    commit = ref.read_text().strip() if ref.is_file() else "main"
    dit = pathlib.Path(os.environ.get("DIT_CACHE") or "~/.cache/dit", repo.replace("/", "--"), "main", filename)
    return [str(dit.expanduser()), str(hf / "snapshots" / commit / filename)]


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the sha256 the Hub announces (X-Linked-Etag) before it sends us to its CDN."""
    sha256 = ""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha256 = self.sha256 or headers.get("X-Linked-Etag", "")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def hub_file(repo, filename, missing_ok=False):
    """Local path of a Hub repo file: a cached copy, else downloaded from HF_ENDPOINT into DIT_CACHE."""
    paths, offline = cache_paths(repo, filename), os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "TRUE")
    if any(os.path.isfile(p) for p in paths) or (offline and missing_ok):
        return next((p for p in paths if os.path.isfile(p)), None)
    if offline:
        raise FileNotFoundError(f"{repo}/{filename} is in neither {paths[0]} nor {paths[1]}, and HF_HUB_OFFLINE=1 "
                                "forbids downloading: unset it, or pass a local path to the weights")
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"
    redirects, tmp, sha, done, t0 = Redirects(), f"{paths[0]}.{os.getpid()}.tmp", hashlib.sha256(), 0, time.time()
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:  # into a temp file, renamed once complete and checked: the cache never holds half a file
        with urllib.request.build_opener(redirects).open(url, timeout=60) as r, open(tmp, "wb") as f:
            want = (r.headers.get("X-Linked-Etag") or redirects.sha256).removeprefix("W/").strip('"').lower()
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 22):  # 4 MB: a progress update every ~1% of the 335 MB SD VAE
                f.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                print(f"\rdownloading {url}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, "
                      f"ETA {max(total - done, 0) / done * (time.time() - t0):.0f}s", end="", file=sys.stderr)
        print(file=sys.stderr)
        if total and done != total or re.fullmatch(r"[0-9a-f]{64}", want) and sha.hexdigest() != want:
            raise OSError(f"download of {url} is truncated or corrupt ({done} of {total} bytes, sha256 "
                          f"{sha.hexdigest()}, server says {want or '?'}); run again")
        os.replace(tmp, paths[0])
    except urllib.error.URLError as e:  # HTTPError included
        if getattr(e, "code", None) == 404 and missing_ok:
            return None
        raise FileNotFoundError(f"cannot download {url}: {e}; check the repo id, or (offline, or a gated repo) put "
                                "the files in DIT_CACHE and set HF_HUB_OFFLINE=1, or pass a local path") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return paths[0]


if __name__ == "__main__":  # round-trip an image through the VAE
    import argparse
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser(description="Encode and decode an image with the SD VAE: writes IMAGE_vae.png.")
    p.add_argument("image")
    p.add_argument("--vae", default="ema", help='"ema", "mse", a HF repo id, a directory or a weights file')
    args, device = p.parse_args(), "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(args.vae, device=device)
    img, f = Image.open(args.image).convert("RGB"), vae.downsample_factor
    img = img.crop((0, 0, img.width // f * f, img.height // f * f))  # the VAE needs multiples of f
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    psnr = 10 * math.log10(4.0 / max(F.mse_loss(y, x).item(), 1e-12))  # peak-to-peak range is 2
    out = os.path.splitext(args.image)[0] + "_vae.png"
    Image.fromarray(y[0].add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()).save(out)
    print(f"wrote {out}: {img.width}x{img.height} -> {f}x smaller latent -> back, PSNR {psnr:.2f} dB")
