"""
The Stable Diffusion VAE (AutoencoderKL, Rombach et al. 2022) whose latent space DiT works in: a 256x256
image becomes a 4x32x32 latent. The same function as diffusers' AutoencoderKL with the same parameter
names, in PyTorch alone: its own safetensors reader and Hugging Face downloader, and every common copy
of the weights (diffusers current/legacy names, CompVis/LDM files, full SD checkpoints).

    vae = load_vae("ema")                               # stabilityai/sd-vae-ft-ema, what DiT uses
    latent = (vae.encode(x).sample() - vae.shift_factor) * vae.scaling_factor   # x in [-1, 1]
    image = vae.decode(latent / vae.scaling_factor + vae.shift_factor)
    python vae.py IMAGE [--vae mse]                     # round-trip an image: writes IMAGE_vae.png
"""
import argparse
import hashlib
import inspect
import json
import math
import os
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

def Norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)  # every norm of the SD VAEs


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) twice plus a skip; a 1x1 conv on the skip when channels change."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
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
        self.group_norm = Norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' name is to_out.0

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C), no copy for channels-last x
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        return self.to_out[0](o).transpose(1, 2).reshape(n, c, h, w) + x  # channels-last view, no copy


class Resample(nn.Module):
    """2x down: stride-2 3x3 conv after padding right and bottom only (LDM's asymmetric pad).
    2x up: nearest-neighbour upsampling, then a 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """n resnets at one resolution, then an optional 2x resampler (diffusers' Down/UpDecoderBlock2D);
    with attn, resnet -> attention -> resnet (the mid block at the lowest resolution)."""
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
        self.down_blocks = nn.ModuleList(Level(chans[max(i - 1, 0)], c, n, groups, down=i < len(chans) - 1)
                                         for i, c in enumerate(chans))
        self.mid_block = Level(chans[-1], chans[-1], 2, groups, attn=True)
        self.conv_norm_out, self.conv_out = Norm(chans[-1], groups), nn.Conv2d(chans[-1], cout, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h)), inplace=True))


class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, 3, h*f, w*f); one more resnet per level than the encoder."""
    def __init__(self, cin, cout, chans, n, groups):
        super().__init__()
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(Level(rev[max(i - 1, 0)], c, n + 1, groups, up=i < len(rev) - 1)
                                       for i, c in enumerate(rev))
        self.mid_block = Level(rev[0], rev[0], 2, groups, attn=True)
        self.conv_norm_out, self.conv_out = Norm(chans[0], groups), nn.Conv2d(chans[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z)).to(self.conv_out.weight.dtype)  # fp32 from here if load_vae upcast
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))


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
        if any(c % groups for c in chans):
            raise ValueError(f"block_out_channels {chans} must all be divisible by norm_num_groups={groups}")
        self.config = {**config, "block_out_channels": list(chans)}
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor or 0.0)
        self.force_upcast = force_upcast  # fp16 overflows in SD VAEs: load_vae keeps the big layers in fp32
        self.downsample_factor = 2 ** (len(chans) - 1)
        self.encoder = Encoder(in_channels, 2 * latent_channels, chans, layers_per_block, groups)
        self.decoder = Decoder(latent_channels, out_channels, chans, layers_per_block, groups)
        c = latent_channels  # FLUX/SD3 VAEs have no quant convs
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if use_post_quant_conv else nn.Identity()

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    def _in_slices(self, fn, x, pixels):
        parts = [fn(chunk) for chunk in x.split(max(1, self.slice_pixels // pixels))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def encode(self, x):
        """Images (N, C, H, W) in [-1, 1] -> posterior (DiagonalGaussian) over latents (N, latent, H/f, W/f)."""
        f, (H, W) = self.downsample_factor, x.shape[-2:]
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must be a multiple of {f}; crop or resize it")

        def moments(chunk):  # channels-last (NHWC) activations: oneDNN and cuDNN convs run faster on them
            h = chunk.to(self.encoder.conv_in.weight.dtype, memory_format=torch.channels_last)
            return self.quant_conv(self.encoder(h)).to(x.dtype).contiguous()
        return DiagonalGaussian(self._in_slices(moments, x, H * W))

    def decode(self, z):
        """Latents (N, latent, h, w), already unscaled -> images (N, C, h*f, w*f) in about [-1, 1]."""
        def images(chunk):
            h = chunk.to(self.dtype, memory_format=torch.channels_last)
            return self.decoder(self.post_quant_conv(h)).to(z.dtype).contiguous()
        return self._in_slices(images, z, z.shape[-2] * z.shape[-1] * self.downsample_factor ** 2)

#################################################################################
#                          Checkpoint Formats and Loading                       #
#################################################################################

ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",  # LDM
              "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # legacy diffusers
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def config_from_state_dict(sd):
    """The architecture read off the weight shapes, for a lone file; scaling/shift need config.json (else SD's)."""
    convs = [(m[1], m[2], v.shape[0]) for k, v in sd.items()  # the first conv of every encoder resnet
             for m in [re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight", k)] if m]
    chans = dict(sorted((int(level), c) for level, i, c in convs if i == "0"))
    return dict(latent_channels=sd["decoder.conv_in.weight"].shape[1], block_out_channels=list(chans.values()),
                layers_per_block=sum(level == "0" for level, _, _ in convs),
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def read_config(path):
    """Constructor kwargs from a diffusers config.json; refuses architectures this file does not implement."""
    with open(path) as f:
        cfg = json.load(f)
    n = len(cfg.get("block_out_channels", []))
    for key, want in (("_class_name", "AutoencoderKL"), ("act_fn", "silu"), ("mid_block_add_attention", True),
                      ("down_block_types", ["DownEncoderBlock2D"] * n), ("up_block_types", ["UpDecoderBlock2D"] * n)):
        if cfg.get(key, want) != want:
            raise ValueError(f"{path}: {key}={cfg[key]!r}, but vae.py only implements {want!r} (SD-style VAEs)")
    names = inspect.signature(AutoencoderKL).parameters
    return {k: v for k, v in cfg.items() if k in names}  # the rest (latents_mean, _diffusers_version...) unused


def load_weights(vae, sd, source="checkpoint"):
    """Strict load_state_dict whose errors name the first missing, unexpected or wrongly shaped keys."""
    own = vae.state_dict()
    missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
           if k in sd and v.shape != sd[k].shape]
    if missing or extra or bad:
        raise ValueError(f"{source} does not fit this VAE (block_out_channels={vae.config['block_out_channels']}, "
                         f"latent_channels={vae.config['latent_channels']}): {len(missing)} missing keys {missing[:5]}, "
                         f"{len(extra)} unexpected keys {extra[:5]}, {len(bad)} wrong shapes {bad[:3]}")
    vae.load_state_dict(sd)


def read_weights(path):
    """A state dict from .safetensors (own reader) or a torch pickle (.bin/.pt/.ckpt, weights_only)."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a torch checkpoint with weights_only=True ({e}); "
                         "if it is a safetensors file, give it the .safetensors extension") from None


def load_vae(name_or_path="stabilityai/sd-vae-ft-ema", device="cpu", dtype=torch.float32):
    """A ready AutoencoderKL (eval, frozen) from "ema"/"mse", a HF repo id, a directory, or a weights file."""
    name, config = SHORTHANDS.get(name_or_path, str(name_or_path)), None
    if os.path.isdir(name):  # prefer diffusers' file names, then safetensors
        diffusers_names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        files = sorted((f for f in os.listdir(name) if f.endswith(WEIGHT_EXTS)),
                       key=lambda f: (f not in diffusers_names, not f.endswith(".safetensors"), f))
        if not files:
            raise FileNotFoundError(f"no weights ({', '.join(WEIGHT_EXTS)}) in directory {name}")
        weights, config = os.path.join(name, files[0]), os.path.join(name, "config.json")
        config = config if os.path.isfile(config) else None
    elif os.path.isfile(name):
        weights = name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)*", name):
        config, weights = hub_files(name)
    else:
        raise FileNotFoundError(f"{name!r} is not a file, a directory, or a Hugging Face repo id "
                                f"(like 'stabilityai/sd-vae-ft-ema'; shorthands: {', '.join(SHORTHANDS)})")
    sd = convert_state_dict(read_weights(weights))
    if "decoder.conv_in.weight" not in sd:
        raise ValueError(f"{weights} holds no VAE weights (keys like {', '.join(list(sd)[:3])}); pass an SD VAE")
    vae = AutoencoderKL(**(read_config(config) if config else config_from_state_dict(sd)))
    load_weights(vae, sd, weights)
    vae = vae.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if dtype == torch.float16 and vae.force_upcast:
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
    with open(path + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(path + ".tmp", path)
    save_safetensors(vae.state_dict(), os.path.join(directory, "diffusion_pytorch_model.safetensors"))

#################################################################################
#                                  safetensors                                  #
#################################################################################
# A little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]},
# "__metadata__": {str: str}}, then the raw little-endian tensor bytes (offsets count from their start).

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors, checking every offset against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: truncated or not a safetensors file (header length {n}, file size {size}); "
                             "delete it and download again")
        try:
            entries = {k: (ST_DTYPES[v["dtype"]], [int(s) for s in v["shape"]], [int(o) for o in v["data_offsets"]])
                       for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        except Exception as e:
            raise ValueError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        data, sd = size - 8 - n, {}
        for name, (dtype, shape, (begin, end)) in entries.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if end > data:
                raise ValueError(f"{path}: truncated: tensor {name} ends at byte {end} of the data but the file "
                                 f"has only {data}; delete it and download again")
            if not 0 <= begin <= end or end - begin != nbytes or min(shape, default=0) < 0:
                raise ValueError(f"{path}: corrupt entry {name}: offsets {begin}..{end} do not hold {shape} {dtype}")
            buf = bytearray(nbytes)
            f.seek(8 + n + begin)
            f.readinto(buf)
            sd[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if nbytes else torch.zeros(shape, dtype=dtype)
    return sd


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of tensors as .safetensors, atomically (temp file + rename)."""
    names, header, blobs, offset = {v: k for k, v in ST_DTYPES.items()}, {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blobs[-1])])
        offset += len(blobs[-1])
    header["__metadata__"] = metadata or {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keeps the data 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.writelines(blobs)
    os.replace(path + ".tmp", path)

#################################################################################
#                                    Download                                   #
#################################################################################

def cache_dir():
    return os.path.expanduser(os.environ.get("DIT_CACHE") or "~/.cache/dit")


def hf_hub_cache():
    """The standard Hugging Face cache, honouring HF_HUB_CACHE and HF_HOME as huggingface_hub does."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def cached(repo, filename, revision="main"):
    """Path of a repo file in DIT_CACHE or in the Hugging Face cache (snapshots/<commit>/file), else None."""
    root = os.path.join(hf_hub_cache(), "models--" + repo.replace("/", "--"))
    try:
        with open(os.path.join(root, "refs", revision)) as f:
            commit = f.read().strip()
    except OSError:
        commit = revision  # a commit hash given directly
    paths = (os.path.join(cache_dir(), repo.replace("/", "--"), revision, filename),
             os.path.join(root, "snapshots", commit, filename))
    return next((p for p in paths if os.path.isfile(p)), None)


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, remembering the sha256 the Hub announces (X-Linked-Etag) before sending to its CDN."""
    sha256 = ""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha256 = self.sha256 or headers.get("X-Linked-Etag", "")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url, path):
    """Download url to path atomically, with a progress line, checking the sha256 when the server sends it."""
    req, redirects = urllib.request.Request(url, headers={"User-Agent": "dit-vae"}), Redirects()
    if os.environ.get("HF_TOKEN"):  # unredirected: the token must not travel on to the CDN
        req.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, sha, done, t0, shown = f"{path}.{os.getpid()}.tmp", hashlib.sha256(), 0, time.time(), 0.0
    try:
        with urllib.request.build_opener(redirects).open(req, timeout=60) as r, open(tmp, "wb") as f:
            want = (r.headers.get("X-Linked-Etag") or redirects.sha256).removeprefix("W/").strip('"').lower()
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if time.time() - shown > 0.5 or done == total:
                    shown, rate = time.time(), done / max(time.time() - t0, 1e-6)
                    eta = f", ETA {(total - done) / rate:.0f}s" if total else ""
                    print(f"\rdownloading {url}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({rate / 1e6:.1f} MB/s{eta})",
                          end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if total and done != total:
            raise OSError(f"download of {url} stopped after {done} of {total} bytes; run again")
        if re.fullmatch(r"[0-9a-f]{64}", want) and sha.hexdigest() != want:
            raise OSError(f"download of {url} is corrupt: sha256 {sha.hexdigest()}, server says {want}; run again")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def hub_file(repo, filename, revision="main", missing_ok=False):
    """Local path of a repo file: from a cache, else downloaded from HF_ENDPOINT; None if missing_ok and 404."""
    path = cached(repo, filename, revision)
    if path:
        return path
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise FileNotFoundError(f"{repo}/{filename} is in neither {cache_dir()} (DIT_CACHE) nor {hf_hub_cache()}, and "
                                "HF_HUB_OFFLINE=1 forbids downloading: unset it, or pass a local path to the weights")
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/{revision}/{filename}"
    path = os.path.join(cache_dir(), repo.replace("/", "--"), revision, filename)
    try:
        download(url, path)
    except urllib.error.HTTPError as e:
        if e.code == 404 and missing_ok:
            return None
        hint = "set HF_TOKEN for a gated or private repo" if e.code in (401, 403) else \
            "check the repo id (or, if you meant a local path, that it exists)"
        raise FileNotFoundError(f"cannot download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        raise ConnectionError(f"cannot download {url}: {e.reason}. Offline? Put the files in {cache_dir()} or "
                              "the Hugging Face cache and set HF_HUB_OFFLINE=1, or pass a local path") from None
    return path


def hub_files(repo_id, revision="main"):
    """(config.json, weights) of "org/name" or "org/name/subfolder", preferring safetensors to .bin."""
    parts = repo_id.split("/")
    repo, sub = "/".join(parts[:2]), "".join(p + "/" for p in parts[2:])
    names = [sub + "diffusion_pytorch_model.safetensors", sub + "diffusion_pytorch_model.bin"]
    weights = (next(filter(None, (cached(repo, n, revision) for n in names)), None)
               or hub_file(repo, names[0], revision, missing_ok=True) or hub_file(repo, names[1], revision))
    return hub_file(repo, sub + "config.json", revision), weights

#################################################################################
#                        Round-trip an Image from the Shell                     #
#################################################################################

def main():
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser(description="Encode and decode an image with the SD VAE; print the PSNR.")
    p.add_argument("image")
    p.add_argument("--vae", default="ema", help='"ema", "mse", a HF repo id, a directory or a weights file')
    p.add_argument("--out", default=None, help="output path (default: IMAGE_vae.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    vae = load_vae(args.vae, device=args.device)
    img, f = Image.open(args.image).convert("RGB"), vae.downsample_factor
    w, h = img.width // f * f, img.height // f * f  # the VAE needs multiples of f: center crop
    left, top = (img.width - w) // 2, (img.height - h) // 2
    x = torch.from_numpy(np.array(img.crop((left, top, left + w, top + h)))).permute(2, 0, 1)[None]
    x = x.float().div(127.5).sub(1).to(args.device)
    with torch.no_grad():
        z = vae.encode(x).mode()
        y = vae.decode(z).clamp(-1, 1)
    psnr = 10 * math.log10(4.0 / max(F.mse_loss(y, x).item(), 1e-12))  # peak-to-peak range is 2
    out = args.out or os.path.splitext(args.image)[0] + "_vae.png"
    Image.fromarray(y[0].add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()).save(out)
    print(f"wrote {out}: {w}x{h} -> latent {tuple(z.shape[1:])} -> back, PSNR {psnr:.2f} dB")


if __name__ == "__main__":
    main()
