"""
DiT: Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers").
One file, PyTorch only. Parameter names, initialization and numerics follow the official
release, so official checkpoints load strictly and give the official outputs.
"""
import argparse
import functools
import hashlib
import http.client
import inspect
import math
import os
import sys
import time
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

BLOCKS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")

def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per sample and channel."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Module):
    """Split a (N, C, H, W) input into p x p patches and embed each one linearly."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)

class TimestepEmbedder(nn.Module):
    """Embed scalar timesteps with 256 sinusoidal frequencies and a two-layer MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of (fractional) timesteps t (N,) -> (N, dim), [cos, sin]."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32) / half
        freqs = torch.exp(-math.log(max_period) * exponents).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))

class LabelEmbedder(nn.Module):
    """Embed class labels; row num_classes is the null class that label dropout swaps in (CFG)."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            # one torch.rand per batch, as the official code draws it
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)

#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head attention; self-attention if ctx is None, otherwise cross-attention to ctx."""
    def __init__(self, dim, num_heads, cross=False):
        super().__init__()
        self.num_heads = num_heads
        if cross:
            # queries from the image tokens, keys and values from the conditioning tokens
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        N, T, D = x.shape
        H = self.num_heads
        if ctx is None:
            q, k, v = self.qkv(x).view(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (N, H, T, D/H)
        else:
            q = self.q(x).view(N, T, H, D // H).transpose(1, 2)
            k, v = self.kv(ctx).view(N, ctx.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast and torch.is_grad_enabled():
            # the CPU flash-attention backward is slow in bf16: plain matmuls train 1.15x faster
            scores = (q * (D // H) ** -0.5) @ k.transpose(-2, -1)
            x = scores.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))

class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

class DiTBlock(nn.Module):
    """A DiT block; `block` picks how it is conditioned on c (Section 3.2 and Figure 3)."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, block="adaLN-Zero"):
        super().__init__()
        self.block = block
        # adaptive blocks regress the norms' scale and shift instead of learning them
        adaptive = block in ("adaLN-Zero", "adaLN")
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if block == "cross-attention":
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, cross=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:
            # adaLN-Zero also regresses the gates alpha applied before each residual
            n = 6 if block == "adaLN-Zero" else 4
            linear = nn.Linear(hidden_size, n * hidden_size)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear)

    def forward(self, x, c):
        if self.block == "adaLN-Zero":  # c: (N, D)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
                self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
            return x
        if self.block == "adaLN":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        # cross-attention and in-context: a standard pre-norm ViT block
        x = x + self.attn(self.norm1(x))
        if self.block == "cross-attention":
            # c: (N, 2, D), the t and y tokens
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))

class FinalLayer(nn.Module):
    """Final (adaptive) layer norm and linear decoder of each token to p*p*out_channels values."""
    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            linear = nn.Linear(hidden_size, 2 * hidden_size)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear)

    def forward(self, x, c):
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, block="adaLN-Zero"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads "
                             f"{num_heads}; pick a head count that divides it")
        # everything DiT(**config) needs to rebuild this model; train.py stores it in checkpoints
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.block = block
        # recompute block activations in backward to save memory
        self.grad_checkpointing = False

        # Modules are created in the official order so that the same seed gives the same weights.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, a frozen Parameter as in the official checkpoints:
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, block)
                                     for _ in range(depth)])
        adaptive = block.startswith("adaLN")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive)
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: xavier linears, sin-cos pos_embed, N(0, 0.02) embeddings, zero outputs."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))
        # init the patch embedding like nn.Linear, not nn.Conv2d
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block == "adaLN-Zero":
            # zero the regressed shift, scale and gates: each block starts as the identity
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """
        The model's prediction for a noisy batch.

        :param x: (N, in_channels, H, W) float noisy latents (or pixels), H = W = input_size.
        :param t: (N,) timesteps in [0, 1000), int or float (fractional ones embed too).
        :param y: (N,) int64 labels in [0, num_classes]; num_classes is the null label (CFG).
        :return: (N, out_channels, H, W): the prediction (epsilon for the released models),
                 then with learn_sigma the C channels that interpolate the log-variance.
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)                   # (N, D)
        y = self.y_embedder(y, self.training)    # (N, D)
        if self.block.startswith("adaLN"):
            c = t + y                            # (N, D)
        elif self.block == "cross-attention":
            # the sequence of two tokens that the image tokens attend to
            c = torch.stack([t, y], dim=1)       # (N, 2, D)
        else:
            # in-context: t and y join the sequence as two more tokens
            x = torch.cat([t[:, None], y[:, None], x], dim=1)
            c = None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)                  # (N, T, D)
        if self.block == "in-context":
            # drop the conditioning tokens
            x = x[:, 2:]
        x = self.final_layer(x, c)               # (N, T, p * p * out_channels)
        return self.unpatchify(x)                # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3, cfg_interval=None):
        """
        Classifier-free guidance: uncond + cfg_scale * (cond - uncond), on both halves.

        :param x: (2N, C, H, W) the batch [x, x]; only the first half is read.
        :param t: (2N,) timesteps, as forward's.
        :param y: (2N,) labels [y, null]: the null label num_classes in the second half.
        :param cfg_scale: guidance scale; 1.0 gives the conditional prediction.
        :param cfg_channels: guide the first k output channels; 3 as the release (its FIDs
                             used that), None all in_channels.
        :param cfg_interval: (lo, hi): guide only where lo < t <= hi (Kynkaanniemi et al.
                             2024), the conditional prediction elsewhere; None: everywhere.
        :return: (2N, out_channels, H, W), the guided prediction twice.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps = model_out[:, :k]
        rest = model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if cfg_interval is not None:
            lo, hi = cfg_interval
            t_half = t[: len(t) // 2]
            inside = ((t_half > lo) & (t_half <= hi)).view(-1, 1, 1, 1)
            half_eps = torch.where(inside, half_eps, cond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def gflops(self):
        """Forward Gflops per image, counted as the paper does (multiply-accumulates of matmuls)."""
        D, p, C, L = (self.config[k] for k in ("hidden_size", "patch_size", "in_channels", "depth"))
        hidden = int(D * self.config["mlp_ratio"])
        num_patches = self.x_embedder.num_patches
        T = num_patches + (2 if self.block == "in-context" else 0)
        # qkv + proj, QK^T and AV, MLP
        per_block = 4 * T * D * D + 2 * T * T * D + 2 * T * D * hidden
        if self.block == "cross-attention":
            # q + out projections, kv of the 2 tokens, attention over them
            per_block += 2 * T * D * D + 2 * 2 * D * D + 2 * T * 2 * D
        per_block += {"adaLN-Zero": 6, "adaLN": 4}.get(self.block, 0) * D * D
        embed = num_patches * p * p * C * D + 256 * D + D * D
        final = num_patches * D * p * p * self.out_channels
        if self.block.startswith("adaLN"):
            final += 2 * D * D
        return (L * per_block + embed + final) / 1e9

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load weights; a checkpoint for another model gets an error that names both models."""
        if strict:
            mine = describe_state_dict(self.state_dict())
            theirs = describe_state_dict(state_dict)
            if mine != theirs:
                raise ValueError(f"checkpoint does not fit this model: checkpoint has {theirs}; "
                                 f"you built {mine}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

def describe_state_dict(sd):
    """A DiT state dict described as 'DiT-XL/2 (depth 28, hidden 1152, ...)' for error messages."""
    try:
        D, C, p, _ = sd["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        size = int(sd["pos_embed"].shape[1] ** 0.5) * p
        out = sd["final_layer.linear.weight"].shape[0] // (p * p)
        classes = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        return f"no DiT weights (missing or odd {e})"
    sizes = {(depth, hidden): name for name, (depth, hidden, _) in SIZES.items()}
    name = sizes.get((depth, D), "custom")
    latent = f"{size}x{size} latents ({size * 8}x{size * 8} images with an 8x VAE)"
    where = f"{size}x{size} pixels" if C == 3 else latent
    return (f"DiT-{name}/{p} (depth {depth}, hidden {D}, patch {p}) on {where}, "
            f"in_channels {C}, out_channels {out}, {classes} label rows")

#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim, pos):
    """Sin-cos embedding of positions pos (M,) -> (M, embed_dim), in float64 as MAE's original."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """2-D sin-cos embedding of a grid_size x grid_size grid of patches -> (grid_size**2, D)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    # w first, as the official code
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    return torch.cat([emb_w, emb_h], dim=1)

#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# the model sizes of Table 1: name -> (depth, hidden_size, num_heads)
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

DiT_models = {
    f"DiT-{name}/{p}": functools.partial(DiT, depth=depth, hidden_size=hidden, patch_size=p,
                                         num_heads=heads)
    for name, (depth, hidden, heads) in SIZES.items()
    for p in (2, 4, 8)
}

def create_dit(model="DiT-XL/2", **overrides):
    """
    A DiT of a config of DiT_models, with any DiT argument overridden.

    :param model: a key of DiT_models, "DiT-{S,B,L,XL}/{2,4,8}".
    :param overrides: DiT arguments, e.g. input_size=32 (latent side: image size / 8),
                      num_classes=10, in_channels=3 (pixels), depth=4, block="adaLN".
    :return: a DiT with the official initialization, in train mode.
    """
    if model not in DiT_models:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(DiT_models)}")
    params = list(inspect.signature(DiT).parameters)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"DiT has no argument {', '.join(unknown)}; it takes {', '.join(params)}")
    return DiT_models[model](**overrides)

#################################################################################
#                       Official checkpoints: find and load                     #
#################################################################################

PRETRAINED = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/DiT/models"

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

def load_checkpoint(name_or_path):
    """
    What a checkpoint file holds, loaded with weights_only (tensors, never code).

    :param name_or_path: a file, or an official name of PRETRAINED, downloaded once into
                         cache_dir() from $DIT_WEIGHTS_URL (default WEIGHTS_URL).
    :return: the dict in the file: a state dict, or train.py's {"model", "ema", "opt", ...}.
    """
    path = name_or_path
    if name_or_path in PRETRAINED:
        path = os.path.join(cache_dir(), name_or_path)
        if not os.path.isfile(path):
            base = os.environ.get("DIT_WEIGHTS_URL") or WEIGHTS_URL
            download(f"{base.rstrip('/')}/{name_or_path}", path, mirror="DIT_WEIGHTS_URL")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no DiT checkpoint at {path}; give a file path or one of "
                                f"{', '.join(PRETRAINED)}")
    try:
        # the official train.py stored its args as an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            # memory-mapped: only the tensors used are read (a training checkpoint holds 4x more)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        why = f"empty, truncated or not a PyTorch file ({type(e).__name__})"
        if "global" in str(e).lower():
            why = "it holds pickled Python objects, which are never loaded (they could run code)"
        # a download of an official name that was cached before downloads were checked
        fix = "delete it to download it again" if path != name_or_path else "give a DiT one"
        raise ValueError(f"{path} is not a readable checkpoint: {why}; {fix}") from None
    if not isinstance(ckpt, dict) or not ckpt:
        raise ValueError(f"{path} holds no weights (a {type(ckpt).__name__}); give a checkpoint")
    return ckpt

def find_model(name_or_path):
    """The state dict of load_checkpoint(name_or_path): the file's own, or a run's "ema"."""
    ckpt = load_checkpoint(name_or_path)
    return ckpt.get("ema", ckpt)

#################################################################################
#                  Fine-tuning: start from another DiT's weights                #
#################################################################################

def design(sd, config=None):
    """What fine-tuning keeps of a DiT state dict: depth, width, heads, patch, MLP and block."""
    try:
        D, _, p, _ = sd["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
        ada = sd.get("blocks.0.adaLN_modulation.1.weight")
        sd["y_embedder.embedding_table.weight"].shape
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"the checkpoint holds no DiT weights (missing or odd {e})") from None
    block = "in-context" if ada is None else "adaLN-Zero" if len(ada) == 6 * D else "adaLN"
    if "blocks.0.cross_attn.q.weight" in sd:
        block = "cross-attention"
    # a state dict does not store the head count: a train.py config does, the presets imply it
    presets = {(d, h): heads for d, h, heads in SIZES.values()}
    heads = (config or {}).get("num_heads", presets.get((depth, D)))
    return dict(depth=depth, hidden_size=D, num_heads=heads, patch_size=p, mlp_ratio=mlp / D,
                block=block)

def label_rows(model, old_K, init_classes):
    """The old label rows the new classes start from: init_classes, all of them, or None."""
    K = model.y_embedder.num_classes
    if init_classes is None:
        return list(range(K)) if K == old_K else None
    if len(init_classes) != K:
        raise ValueError(f"init_classes has {len(init_classes)} labels for {K} classes; give one "
                         "old class per new class")
    bad = [c for c in init_classes if not 0 <= c < old_K]
    if bad:
        raise ValueError(f"init_classes {bad} are not classes of the checkpoint, which has "
                         f"{old_K} (0 to {old_K - 1})")
    return list(init_classes)

@torch.no_grad()
def load_pretrained(model, state_dict, init_classes=None, config=None):
    """
    Fine-tuning: copy what fits of another DiT's weights into a freshly initialized model.

    What cannot fit keeps the model's own (DiT's) init: the label table for another class count
    (the old null row is copied, so that guidance works), the patch embedding and final linear
    for other channels; pos_embed is the fixed one of the model's grid.

    :param model: a new DiT (as built, DiT's init); changed in place.
    :param state_dict: the weights to start from, e.g. find_model(name_or_path).
    :param init_classes: new class i starts from old class init_classes[i] (one per new class);
                         None: the old rows for the same class count, else DiT's init.
    :param config: the weights' DiT config if known (train.py checkpoints store it); without it
                   the head count is a preset's and the last label row the null class, as in
                   the official checkpoints.
    :return: a one-line report: how many tensors were loaded, what was rebuilt and why.
    :raises ValueError: (one line) for another depth, width, head count, patch size, MLP or block
                        design (another model, not fine-tuning), non-DiT weights, bad init_classes.
    """
    sd = state_dict
    theirs = design(sd, config)
    mine = design(model.state_dict(), model.config)
    if theirs["num_heads"] is None:
        theirs["num_heads"] = mine["num_heads"]
    differ = [f"{k} {theirs[k]} in the checkpoint, {mine[k]} in the model" for k in mine
              if theirs[k] != mine[k]]
    if differ:
        raise ValueError(f"{'; '.join(differ)}: fine-tuning may change only the classes, the "
                         "image size and the channels")
    own = model.state_dict()
    if set(own) != set(sd):
        raise ValueError(f"the checkpoint and the model differ in {sorted(set(own) ^ set(sd))[0]}")
    # what is rebuilt: name prefix -> why
    rebuilt = {}
    # the label table: old rows for the new classes, and the old null row for guidance
    key = "y_embedder.embedding_table.weight"
    K = model.y_embedder.num_classes
    old_null = (config or {}).get("class_dropout_prob", 0.1) > 0 and len(sd[key]) > 1
    old_K = len(sd[key]) - old_null
    null = model.y_embedder.dropout_prob > 0
    rows = label_rows(model, old_K, init_classes)
    if rows != list(range(K)) or null != old_null:
        if rows is not None:
            own[key][:K] = sd[key][rows].to(own[key].dtype)
        if null and old_null:
            own[key][K] = sd[key][old_K]
        shown = " ".join(map(str, (rows or [])[:8])) + " ..." * (len(rows or []) > 8)
        where = f"from its rows {shown}" if rows else "newly initialized"
        copied = "copied" if old_null else "new"
        rebuilt[key] = (f"label table for {K} classes (the checkpoint has {old_K}; classes "
                        f"{where}" + f", null row {copied}" * null + ")")
    # the fixed sin-cos position embedding of the model's grid
    if own["pos_embed"].shape != sd["pos_embed"].shape:
        old, new = (int(x.shape[1] ** 0.5) for x in (sd["pos_embed"], own["pos_embed"]))
        rebuilt["pos_embed"] = f"pos_embed of the {new}x{new} patch grid (sin-cos; was {old}x{old})"
    # the layers that touch the channels: pixels vs latents, or learn_sigma
    for name, what in [("x_embedder.proj", "in_channels"), ("final_layer.linear", "out_channels")]:
        old, new = (x[f"{name}.weight"].shape for x in (sd, own))
        if old != new:
            # (D, C, p, p) and (p * p * C, D)
            old, new = (s[1] if what == "in_channels" else s[0] // mine["patch_size"] ** 2
                        for s in (old, new))
            rebuilt[name] = f"{name} for {what} {new} (was {old})"
    kept = [k for k in own if any(k.startswith(name) for name in rebuilt)]
    for k in own:
        if k not in kept:
            if own[k].shape != sd[k].shape:
                raise ValueError(f"{k} has shape {tuple(sd[k].shape)} in the checkpoint, "
                                 f"{tuple(own[k].shape)} in the model")
            own[k].copy_(sd[k])
    report = f"loaded {len(own) - len(kept)} of {len(own)} tensors"
    return f"{report}; rebuilt {', '.join(rebuilt.values())}" if rebuilt else f"{report}: all"

def main():
    """python dit.py: the table of DiT configs (Table 4 of the paper), parameters and Gflops."""
    parser = argparse.ArgumentParser(description="The DiT configs: parameters and Gflops per image")
    parser.add_argument("--image-size", type=int, default=256, help="pixels (default: 256)")
    size = parser.parse_args().image_size
    print(f"{'model':10s} {'params (M)':>11s} {'Gflops':>8s}   ({size}x{size} images)")
    for name, make in DiT_models.items():
        with torch.device("meta"):
            m = make(input_size=size // 8)
        params = sum(p.numel() for p in m.parameters()) / 1e6
        print(f"{name:10s} {params:11.2f} {m.gflops():8.2f}")

if __name__ == "__main__":
    main()
