"""
The Stable Diffusion VAE, in whose latent space DiT works: diffusers' AutoencoderKL (same names,
same outputs) in PyTorch alone, with its own safetensors reader and Hugging Face downloader.

    vae = load_vae("ema")                     # stabilityai/sd-vae-ft-ema, what DiT uses
    z = (vae.encode(x).sample() - vae.shift_factor) * vae.scaling_factor   # x in [-1, 1]
    image = vae.decode(z / vae.scaling_factor + vae.shift_factor)
    python vae.py IMAGE [--vae mse]           # round-trip an image: writes IMAGE_vae.png
"""
import argparse
import hashlib
import http.client
import inspect
import json
import math
import os
import pathlib
import re
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

#################################################################################
#                                 The Autoencoder                               #
#################################################################################

class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) twice plus a skip, through a 1x1 conv when channels change."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        # in place on fresh tensors: fewer big allocations (the VAE is frozen, autograd needs none)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))

class Attention(nn.Module):
    """Single-head self-attention over all H*W positions plus a residual (in the mid blocks)."""
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        # diffusers' name is to_out.0
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        N, C, H, W = x.shape
        # views, no copies, for channels-last x (and back)
        t = self.group_norm(x).flatten(2).transpose(1, 2)                      # (N, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)                 # (N, HW, C)
        return self.to_out[0](o).transpose(1, 2).reshape(N, C, H, W) + x

class Resample(nn.Module):
    """2x down: pad right and bottom only (as LDM), stride-2 3x3 conv; 2x up: nearest, 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0)
        return self.conv(x)

class Level(nn.Module):
    """n resnets, then an optional 2x resampler; with attn: resnet, attention, resnet (mid)."""
    def __init__(self, cin, cout, n, groups, down=False, up=False, attn=False):
        super().__init__()
        # registered first, as in diffusers
        self.attentions = nn.ModuleList([Attention(cout, groups)] if attn else [])
        self.resnets = nn.ModuleList(ResnetBlock(cout if i else cin, cout, groups)
                                     for i in range(n))
        self.downsamplers = nn.ModuleList([Resample(cout, down=True)] if down else [])
        self.upsamplers = nn.ModuleList([Resample(cout, down=False)] if up else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for m in (*self.attentions, *self.resnets[1:], *self.downsamplers, *self.upsamplers):
            x = m(x)
        return x

class Encoder(nn.Module):
    """Image (N, 3, H, W) -> moments (N, 2 * latent, H/f, W/f): mean and log-variance stacked."""
    def __init__(self, cin, cout, chans, n, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        levels = [Level(chans[max(i - 1, 0)], c, n, groups, down=i < len(chans) - 1)
                  for i, c in enumerate(chans)]
        self.down_blocks = nn.Sequential(*levels)
        self.mid_block = Level(chans[-1], chans[-1], 2, groups, attn=True)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cout, 3, padding=1)

    def forward(self, x):
        h = self.mid_block(self.down_blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))

class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, 3, h*f, w*f); a resnet more per level than encoder."""
    def __init__(self, cin, cout, chans, n, groups):
        super().__init__()
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        levels = [Level(rev[max(i - 1, 0)], c, n + 1, groups, up=i < len(rev) - 1)
                  for i, c in enumerate(rev)]
        self.up_blocks = nn.Sequential(*levels)
        self.mid_block = Level(rev[0], rev[0], 2, groups, attn=True)
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], cout, 3, padding=1)

    def forward(self, z):
        # fp32 from here on if load_vae upcast the decoder
        h = self.mid_block(self.conv_in(z)).to(self.conv_out.weight.dtype)
        return self.conv_out(F.silu(self.conv_norm_out(self.up_blocks(h)), inplace=True))

class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)) from the encoder's moments (N, 2C, h, w)."""
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """mean + std * eps, eps drawn on the generator's device (as diffusers, so seeds match)."""
        device = self.mean.device if generator is None else generator.device
        dtype = self.mean.dtype
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        """The most likely latent: the mean."""
        return self.mean

class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion; the keyword arguments are diffusers' config keys."""
    # encode/decode at most this many image pixels per pass, to bound memory
    slice_pixels = 8 * 256 * 256

    def __init__(self, in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
                 use_post_quant_conv=True, force_upcast=True, sample_size=256):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        chans = list(block_out_channels)
        c = latent_channels
        self.config = {**config, "block_out_channels": chans}
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.downsample_factor = 2 ** (len(chans) - 1)
        self.encoder = Encoder(in_channels, 2 * c, chans, layers_per_block, norm_num_groups)
        self.decoder = Decoder(c, out_channels, chans, layers_per_block, norm_num_groups)
        # FLUX.1 and SD3 VAEs have no quant convs
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if use_post_quant_conv else nn.Identity()

    def _sliced(self, net, x, pixels):
        """net(x) in slices of at most slice_pixels image pixels, in the dtype of net's weights."""
        # the fp16 start of an upcast decoder takes fp16 inputs
        dtype = next(net.parameters()).dtype
        # channels-last (NHWC) activations: oneDNN and cuDNN convolutions run faster on them
        parts = [net(chunk.to(dtype, memory_format=torch.channels_last)).to(x.dtype).contiguous()
                 for chunk in x.split(max(1, self.slice_pixels // pixels))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def encode(self, x):
        """
        The posterior q(z|x) of images.

        :param x: (N, in_channels, H, W) float images in [-1, 1]; H and W multiples of
                  downsample_factor f (8 for SD VAEs).
        :return: a DiagonalGaussian over (N, latent_channels, H/f, W/f) unscaled latents: for
                 DiT's, (z.sample() - shift_factor) * scaling_factor.
        """
        f = self.downsample_factor
        H, W = x.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"image size {H}x{W} is not a positive multiple of {f}; crop it")
        moments = self._sliced(nn.Sequential(self.encoder, self.quant_conv), x, H * W)
        return DiagonalGaussian(moments)

    def decode(self, z):
        """
        Images of latents.

        :param z: (N, latent_channels, h, w) unscaled latents: DiT's / scaling_factor +
                  shift_factor.
        :return: (N, out_channels, h*f, w*f) images in about [-1, 1], in z's dtype (clamp them).
        """
        pixels = z.shape[-2] * z.shape[-1] * self.downsample_factor ** 2
        return self._sliced(nn.Sequential(self.post_quant_conv, self.decoder), z, pixels)

#################################################################################
#                          Checkpoint Formats and Loading                       #
#################################################################################

# LDM's attention names (first line) and legacy diffusers' (second) -> diffusers'
ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
              "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LDM_NAMES = ((".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
             (".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."),
             (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
             (".mid.attn_1.", ".mid_block.attentions.0."))

def convert_state_dict(sd):
    """Any known key format (diffusers, legacy diffusers, LDM, SD checkpoint) -> diffusers'."""
    # Lightning checkpoints wrap the weights; the tensors, without training leftovers
    sd = sd["state_dict"] if isinstance(sd.get("state_dict"), dict) else sd
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
          and not k.startswith(("loss.", "model_ema."))}
    # a whole SD checkpoint: keep the VAE, drop the UNet and the text encoder
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    # LDM numbers decoder levels from the lowest resolution up; diffusers in the order they run
    ups = [int(m[1]) for m in (re.match(r"decoder\.up\.(\d+)\.", k) for k in sd) if m]
    top = max(ups, default=0)
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{top - int(m[1])}.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", k)
        k = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", k)
        for a, b in LDM_NAMES:
            k = k.replace(a, b)
        k = re.sub(r"attentions\.0\.(\w+)\.",
                   lambda m: f"attentions.0.{ATTN_NAMES.get(m[1], m[1])}.", k)
        # LDM's attention projections are 1x1 convolutions: the weights of Linear layers
        out[k] = v[:, :, 0, 0] if ".attentions.0.to_" in k and v.dim() == 4 else v
    return out

def vae_files(name):
    """(weights file, config.json or None) of a VAE folder, a weights file or a Hub repo id."""
    if os.path.isdir(name):
        found = [p for p in (os.path.join(name, n) for n in WEIGHTS_NAMES) if os.path.isfile(p)]
        config = os.path.join(name, "config.json")
        if not found or not os.path.isfile(config):
            raise FileNotFoundError(f"{name} lacks config.json or {WEIGHTS_NAMES[0]} (or .bin); "
                                    "pass a diffusers VAE folder")
        return found[0], config
    if os.path.isfile(name):
        return name, None
    weights_file = name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    if weights_file or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{name!r} is not a file, a directory, or a Hugging Face repo id "
                                f"(like 'stabilityai/sd-vae-ft-ema'; or {', '.join(SHORTHANDS)})")
    # a Hub repo: a cached copy of either weights file, else safetensors, else .bin
    cached = [p for n in WEIGHTS_NAMES for p in cache_paths(name, n) if os.path.isfile(p)]
    config = hub_file(name, "config.json")
    weights = cached[0] if cached else hub_file(name, WEIGHTS_NAMES[0], missing_ok=True)
    weights = weights or hub_file(name, WEIGHTS_NAMES[1], missing_ok=True)
    if weights is None:
        raise FileNotFoundError(f"{name} has no {WEIGHTS_NAMES[0]} or .bin; check the repo id, or "
                                "pass a local folder or file")
    return weights, config

def read_config(path):
    """The AutoencoderKL arguments in a diffusers config.json, checked."""
    try:
        cfg = json.loads(pathlib.Path(path).read_bytes())
    except (ValueError, RecursionError) as e:
        # RecursionError: thousands of nested [ or {
        raise ValueError(f"{path} is not valid JSON ({e}); restore the VAE's config.json") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object; restore the VAE's config.json")
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path}: a {cfg['_class_name']}; vae.py has only AutoencoderKL (SD VAEs)")
    # absent: SD's 0.18215 and 0; a null shift_factor is 0
    numbers = {"scaling_factor": cfg.get("scaling_factor", 1.0),
               "shift_factor": cfg.get("shift_factor") or 0.0}
    for key, value in numbers.items():
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"{path}: {key} is {json.dumps(value)}, not a number; write the "
                             "VAE's value there")
    return {k: v for k, v in cfg.items() if k in inspect.signature(AutoencoderKL).parameters}

def infer_config(sd, path):
    """The AutoencoderKL arguments read off the weight shapes of a lone file (no config.json)."""
    convs = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight", k)
        if m and v.dim() == 4:
            convs[int(m[1]), int(m[2])] = v.shape[0]
    if not convs or sd["decoder.conv_in.weight"].dim() != 4:
        raise ValueError(f"{path} has decoder but no encoder weights; pass a whole VAE")
    return dict(latent_channels=sd["decoder.conv_in.weight"].shape[1],
                layers_per_block=1 + max(convs)[1],
                block_out_channels=[c for (_, i), c in sorted(convs.items()) if i == 0],
                use_quant_conv="quant_conv.weight" in sd,
                use_post_quant_conv="post_quant_conv.weight" in sd)

def load_vae(name_or_path="stabilityai/sd-vae-ft-ema", device="cpu", dtype=torch.float32):
    """
    A ready AutoencoderKL: eval mode, no gradients, weights from the source.

    :param name_or_path: "ema" or "mse" (stabilityai/sd-vae-ft-ema, -mse), a Hugging Face repo
                         id, a diffusers folder, or a weights file (.safetensors, .bin, .pt,
                         .ckpt; diffusers or LDM names, or a whole SD checkpoint).
    :param device: where the model runs.
    :param dtype: float32, bfloat16, or float16 (the full-resolution layers then stay float32).
    :return: the AutoencoderKL, with scaling_factor and shift_factor from its config.json.
    """
    weights, config = vae_files(SHORTHANDS.get(name_or_path, str(name_or_path)))
    if weights.endswith(".safetensors"):
        sd = load_safetensors(weights)
    else:
        with open(weights, "rb") as f:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception:
                # never torch's text: it suggests weights_only=False, which runs the file's code
                sd = None
        if not isinstance(sd, dict):
            raise ValueError(f"{weights} is not a PyTorch state dict (empty, truncated, corrupt or "
                             "not only tensors); download it again, or pass a .safetensors file")
    sd = convert_state_dict(sd)
    if "decoder.conv_in.weight" not in sd:
        keys = ", ".join(list(sd)[:3])
        raise ValueError(f"{weights} holds no VAE weights (keys like {keys}); pass an SD VAE")
    cfg = read_config(config) if config else infer_config(sd, weights)
    try:
        # a config of millions of layers would take hours to build, and every layer has weights
        layers = len(cfg.get("block_out_channels", [0] * 4)) * cfg.get("layers_per_block", 2)
        if layers > len(sd):
            raise ValueError(f"its {layers} layers are more than the {len(sd)} tensors")
        # no random init (it would use up the global RNG); strict: every key, every shape
        with torch.device("meta"):
            vae = AutoencoderKL(**cfg)
        vae.load_state_dict(sd, assign=True)
    except (TypeError, ValueError, RuntimeError, ArithmeticError, LookupError) as e:
        # torch names every key (a line per kind or per shape): the first three
        why = "; ".join(line.strip()[:300] for line in str(e).split("\n\t")[1:4]) or str(e)
        raise ValueError(f"{weights} does not fit the VAE of {config or 'its weight shapes'}: "
                         f"{why}") from None
    vae = vae.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if dtype == torch.float16 and vae.config["force_upcast"]:
        # fp16 overflows (NaN, black images) in the full-resolution layers of SD VAEs; as diffusers'
        # upcast_vae does, only the cheap low-resolution start of the decoder stays in fp16
        vae.float()
        for m in (vae.post_quant_conv, vae.decoder.conv_in, vae.decoder.mid_block):
            m.half()
    return vae

#################################################################################
#                        safetensors Files and Hub Downloads                    #
#################################################################################
# A little-endian u64 header length n, a JSON header {name: {dtype, shape, data_offsets: [begin,
# end]}, "__metadata__": {str: str}}, then the data: the tensors' bytes, which must tile it.

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}

def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors, every entry checked against the file."""
    # writable, so the tensors can share its memory
    blob = bytearray(pathlib.Path(path).read_bytes())
    n = int.from_bytes(blob[:8], "little")
    fix = "delete it and download again"
    try:
        header = json.loads(blob[8:8 + n]) if 8 + n <= len(blob) else None
    except (ValueError, RecursionError) as e:
        # RecursionError: a header of thousands of nested [ or {
        raise ValueError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: truncated or not a safetensors file; {fix}")
    header.pop("__metadata__", None)
    tensors = []
    for name, e in header.items():
        shape = e.get("shape") if isinstance(e, dict) else None
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        # whole numbers >= 0 (in JSON, 1.5 is a float and true a bool)
        whole = all(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)
                    for v in (shape, offsets))
        dtype = e.get("dtype") if isinstance(e, dict) else None
        if not whole or len(offsets) != 2 or not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name} is "
                             f"{json.dumps(e)[:200]}, not a known dtype, a shape and two offsets; "
                             f"{fix}")
        # torch takes sizes and strides below 2**63, even for a tensor of no elements
        if math.prod(max(d, 1) for d in shape) >= 2 ** 63:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name} has shape "
                             f"{str(shape)[:100]}, larger than any tensor; {fix}")
        tensors.append((offsets, name, ST_DTYPES[dtype], shape))
    size = len(blob) - 8 - n
    sd = {}
    pos = 0
    # sorted by offsets, each tensor begins where the previous one ended
    for (begin, end), name, dtype, shape in sorted(tensors):
        count = math.prod(shape)
        if begin != pos or end - begin != count * dtype.itemsize or end > size:
            raise ValueError(f"{path}: tensor {name} {shape} {dtype} does not fit bytes {begin}.."
                             f"{end} of the {size} data bytes: truncated or corrupt; {fix}")
        pos = end
        x = torch.zeros(0, dtype=dtype)
        if count:
            x = torch.frombuffer(blob, dtype=dtype, count=count, offset=8 + n + begin)
        sd[name] = x.reshape(shape)
    if pos != size:
        raise ValueError(f"{path}: {size - pos} data bytes after the last tensor: corrupt; {fix}")
    return sd

# a server that sends nothing for DOWNLOAD_TIMEOUT seconds fails the try; a stall, a dropped or
# cut transfer or a busy server (5xx) is tried DOWNLOAD_TRIES times in all, the wait between
# tries doubling from DOWNLOAD_BACKOFF seconds
DOWNLOAD_TIMEOUT = 30
DOWNLOAD_TRIES = 3
DOWNLOAD_BACKOFF = 1.0

def print_progress(what, done, total, start, unit=""):
    """Print a status line to stderr: done/total, rate and ETA (h:mm:ss); a newline when done."""
    rate = done / max(time.time() - start, 1e-9)
    left = round((total - done) / rate) if rate > 0 else 0
    eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    end = "\n" if done >= total else ""
    line = f"\r{what} {done:,.0f}/{total:,.0f}{unit}, {rate:,.2f}{unit}/s, ETA {eta} "
    print(line, end=end, file=sys.stderr, flush=True)

def cache_dir():
    """Downloads go to $DIT_CACHE, or ~/.cache/dit when it is unset or empty."""
    return os.environ.get("DIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit")

def download_retry(e, tries, url):
    """(Why try number `tries` of url failed with e, whether to try again); waits if so."""
    # urllib wraps the socket's error in a URLError, except while it reads
    cause = getattr(e, "reason", e)
    why = str(e).strip()
    if isinstance(cause, TimeoutError):
        why = f"no answer for {DOWNLOAD_TIMEOUT:g} s"
    code = getattr(e, "code", None) or 0
    # a stall, a dropped or cut connection, a busy or failing server: the next try may work
    dropped = (TimeoutError, ConnectionResetError, ConnectionAbortedError,
               http.client.IncompleteRead)
    if not (isinstance(cause, dropped) or code in (408, 429) or code >= 500):
        return why, False
    if tries >= DOWNLOAD_TRIES:
        return f"{why}; {tries} tries", False
    wait = DOWNLOAD_BACKOFF * 2 ** (tries - 1)
    print(f"{url}: {why}; trying again in {wait:g} s", file=sys.stderr, flush=True)
    time.sleep(wait)
    return why, True

def download(url, path, sha256=None, mirror=None):
    """Download url to path (temp file; length, HTML and sha256 checks; rename) or say why."""
    folder = os.path.dirname(os.path.abspath(path))
    # the nearest folder that exists: a failed download removes the empty ones it made below it
    kept = folder
    while not os.path.isdir(kept):
        kept = os.path.dirname(kept)
    os.makedirs(folder, exist_ok=True)
    part = f"{path}.{os.getpid()}.partial"
    tries = 0
    again = True
    while again:
        tries += 1
        size = done = 0
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(part, "wb") as f:
                length = r.headers.get("Content-Length", "")
                size = int(length) if length.isdigit() else 0
                html = r.headers.get_content_type() == "text/html"
                digest = hashlib.sha256()
                start = time.time()
                what = f"downloading {os.path.basename(path)}"
                scale, unit = (1e6, " MB") if size >= 1e6 else (1, " bytes")
                chunk = r.read(1 << 20)
                # a mirror's login, error or index page, sent with a 200
                if html or chunk.lstrip()[:9].lower().startswith((b"<!doctype", b"<html")):
                    raise ValueError("an HTML page, not the file")
                while chunk:
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if size:
                        print_progress(what, done / scale, size / scale, start, unit)
                    chunk = r.read(1 << 20)
            # a connection closed early: an error that another try may mend
            if size and done != size:
                raise ConnectionAbortedError(f"cut short: {done:,} of {size:,} bytes")
            if not done:
                raise ValueError("an empty file")
            if sha256 and digest.hexdigest() != sha256:
                raise ValueError(f'invalid hash value (expected "{sha256}", got '
                                 f'"{digest.hexdigest()}")')
            os.replace(part, path)
            return path
        except (OSError, ValueError, http.client.HTTPException) as e:
            if 0 < done < size:
                # ends the progress line
                print(file=sys.stderr)
            why, again = download_retry(e, tries, url)
        finally:
            if os.path.exists(part):
                os.remove(part)
    while folder != kept and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)
    hint = f", or set {mirror} to a mirror" if mirror else ""
    raise OSError(f"cannot download {url} ({why}); put the file at {path}{hint}")

def cache_paths(repo, filename):
    """A Hub repo file's place in cache_dir() (where downloads go) and in the Hugging Face cache."""
    dit = os.path.join(cache_dir(), repo.replace("/", "--"), "main", filename)
    hf_home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
    hub = pathlib.Path(hub, "models--" + repo.replace("/", "--")).expanduser()
    # huggingface_hub keeps the files in snapshots/<the commit that refs/main names>/
    ref = hub / "refs" / "main"
    commit = ref.read_text().strip() if ref.is_file() else "main"
    return [dit, str(hub / "snapshots" / commit / filename)]

class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Makes urllib report a redirect (as an HTTPError with its headers) instead of following it."""
    def redirect_request(self, *args):
        """No new request: the redirect becomes an HTTPError."""
        return None

def hub_file(repo, filename, missing_ok=False):
    """Local path of a Hub repo file: a cached copy, else downloaded from HF_ENDPOINT."""
    paths = cache_paths(repo, filename)
    if os.path.isfile(paths[0]) or os.path.isfile(paths[1]):
        return paths[0] if os.path.isfile(paths[0]) else paths[1]
    advice = (f"put its config.json and {WEIGHTS_NAMES[0]} in {os.path.dirname(paths[0])}{os.sep}, "
              "or set HF_ENDPOINT to a mirror, or pass a local folder or file")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "TRUE", "YES"):
        raise FileNotFoundError(f"{repo} is not cached and HF_HUB_OFFLINE is set; unset it to "
                                f"download, or {advice}")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/{filename}"
    # HEAD without following redirects: the Hub announces the sha256 of a large (LFS) file as
    # X-Linked-Etag, on its redirect to the CDN or on its 200; ETag is no sha256 for other files
    tries = 0
    again = True
    while again:
        tries += 1
        try:
            head = urllib.request.Request(url, method="HEAD")
            opener = urllib.request.build_opener(NoRedirect)
            with opener.open(head, timeout=DOWNLOAD_TIMEOUT) as r:
                etag = r.headers.get("X-Linked-Etag", "")
            break
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                etag = e.headers.get("X-Linked-Etag", "")
                break
            if e.code == 404 and missing_ok:
                return None
            if e.code < 500 and e.code not in (408, 429):
                raise OSError(f"cannot download {url} ({e}; no such repo or file, or a gated or "
                              f"private repo); check the repo id, or {advice}") from None
            why, again = download_retry(e, tries, url)
        except (OSError, http.client.HTTPException) as e:
            why, again = download_retry(e, tries, url)
    else:
        # no break: every try failed
        raise OSError(f"cannot reach {url} ({why}); {advice}")
    sha = re.fullmatch(r'(w/)?"?([0-9a-f]{64})"?', etag.lower())
    return download(url, paths[0], sha and sha[2], mirror="HF_ENDPOINT")

#################################################################################
#                                       CLI                                     #
#################################################################################

def main():
    """python vae.py IMAGE [--vae NAME]: writes IMAGE_vae.png and prints the PSNR."""
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser(description="Encode and decode an image with the SD VAE: writes "
                                "IMAGE_vae.png and prints the PSNR.")
    p.add_argument("image", help="an image file (PNG, JPEG, ...), cropped to a multiple of 8")
    p.add_argument("--vae", default="ema", help='"ema", "mse", a Hugging Face repo id, a diffusers '
                   "folder or a weights file (default: %(default)s)")
    args = p.parse_args()
    try:
        with Image.open(args.image) as im:
            img = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SystemExit(f"vae.py: error: {args.image} is not a readable image ({e}); pass a PNG "
                         "or JPEG file") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        vae = load_vae(args.vae, device=device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"vae.py: error: {' '.join(str(e).split())}") from None
    f = vae.downsample_factor
    if img.width < f or img.height < f:
        raise SystemExit(f"vae.py: error: {args.image} is {img.width}x{img.height}, smaller than "
                         f"the VAE's {f}x{f} pixels per latent; pass an image of at least {f}x{f}")
    # cropped to multiples of f; the peak-to-peak range of x is 2
    img = img.crop((0, 0, img.width // f * f, img.height // f * f))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    psnr = 10 * math.log10(4.0 / max(F.mse_loss(y, x).item(), 1e-12))
    out = os.path.splitext(args.image)[0] + "_vae.png"
    pixels = torch.clamp(127.5 * y[0] + 128, 0, 255).to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(out)
    print(f"wrote {out}: {img.width}x{img.height} -> {f}x smaller latent -> back, "
          f"PSNR {psnr:.2f} dB")

if __name__ == "__main__":
    main()
