"""
DiT: Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers").
One file, PyTorch only. Parameter names, initialization and numerics follow the official
release, so official checkpoints load strictly and give the official outputs.
"""
import argparse
import functools
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
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Module):
    """Split a (N, C, H, W) input into p x p patches and embed each one linearly."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
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
        """Sinusoidal embedding of (possibly fractional) timesteps t (N,) -> (N, dim), [cos, sin]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embed class labels; row num_classes is the null class that label dropout (for CFG) swaps in."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:  # one torch.rand per batch, as the official code draws it
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
        if cross:  # queries from the image tokens, keys and values from the conditioning tokens
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        N, T, D = x.shape
        H = self.num_heads
        if ctx is None:
            q, k, v = self.qkv(x).view(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, D/H)
        else:
            q = self.q(x).view(N, T, H, D // H).transpose(1, 2)
            k, v = self.kv(ctx).view(N, ctx.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled():
            # the CPU flash-attention backward is slow in bf16: plain matmuls train 1.15x faster
            x = ((q * (D // H) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block; `block` picks how it is conditioned on c (Section 3.2, Figure 3 of the paper)."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, block="adaLN-Zero"):
        super().__init__()
        self.block = block
        adaptive = block in ("adaLN-Zero", "adaLN")  # adaptive blocks regress the norms' scale and shift
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if block == "cross-attention":
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, cross=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:  # adaLN-Zero also regresses the gates alpha applied before each residual
            n = 6 if block == "adaLN-Zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n * hidden_size))

    def forward(self, x, c):
        if self.block == "adaLN-Zero":  # c: (N, D)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.block == "adaLN":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x))  # standard pre-norm ViT block
        if self.block == "cross-attention":  # c: (N, 2, D), the t and y tokens
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Final (adaptive) layer norm and linear decoder of each token to p*p*out_channels values."""
    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, block="adaLN-Zero"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {BLOCKS}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, learn_sigma=learn_sigma, block=block)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.block = block
        self.grad_checkpointing = False  # recompute block activations in backward to save memory

        # Modules are created in the official order so that the same seed gives the same weights.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, a Parameter (frozen) as in the official checkpoints:
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, block) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=block.startswith("adaLN"))
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: xavier linears, sin-cos pos_embed, N(0, 0.02) embeddings, zeroed adaLN and output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data  # init the patch embedding like nn.Linear, not nn.Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block == "adaLN-Zero":  # zero the regressed shift, scale and gates: each block starts as identity
            for m in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]:
                nn.init.constant_(m[-1].weight, 0)
                nn.init.constant_(m[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)                   # (N, D)
        y = self.y_embedder(y, self.training)    # (N, D)
        if self.block.startswith("adaLN"):
            c = t + y                            # (N, D)
        elif self.block == "cross-attention":
            c = torch.stack([t, y], dim=1)       # (N, 2, D): the sequence the image tokens attend to
        else:                                    # in-context: t and y join the sequence as two tokens
            x, c = torch.cat([t[:, None], y[:, None], x], dim=1), None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)                  # (N, T, D)
        if self.block == "in-context":
            x = x[:, 2:]                         # drop the conditioning tokens
        x = self.final_layer(x, c)               # (N, T, p * p * out_channels)
        return self.unpatchify(x)                # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Classifier-free guidance: the first half of the batch runs with y[:N/2] and with the null labels
        y[N/2:]. As in the paper's release, only the first 3 channels are guided by default (that is what
        its FID numbers used); cfg_channels=None guides every epsilon channel, the standard form."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def gflops(self):
        """Forward Gflops per image, counted as the paper does (multiply-accumulates of the matmuls)."""
        D, p, C, L, hidden = (self.config[k] for k in ("hidden_size", "patch_size", "in_channels", "depth", "mlp_ratio"))
        T, hidden = self.x_embedder.num_patches + (2 if self.block == "in-context" else 0), int(D * hidden)
        per_block = 4 * T * D * D + 2 * T * T * D + 2 * T * D * hidden  # qkv + proj, QK^T and AV, MLP
        if self.block == "cross-attention":
            per_block += 2 * T * D * D + 2 * 2 * D * D + 2 * T * 2 * D  # q + out proj, kv of 2 tokens, attention
        per_block += {"adaLN-Zero": 6, "adaLN": 4}.get(self.block, 0) * D * D
        embed = self.x_embedder.num_patches * p * p * C * D + 256 * D + D * D
        final = self.x_embedder.num_patches * D * p * p * self.out_channels
        final += 2 * D * D if self.block.startswith("adaLN") else 0
        return (L * per_block + embed + final) / 1e9

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load weights; a checkpoint for another model gets an error that names both models."""
        if strict:
            mine, theirs = describe_state_dict(self.state_dict()), describe_state_dict(state_dict)
            if mine != theirs:
                raise ValueError(f"checkpoint does not fit this model: checkpoint has {theirs}; "
                                 f"you built {mine}. Pick the matching --model / --image-size / --num-classes.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def describe_state_dict(sd):
    """Summarize a DiT state dict as 'DiT-XL/2 (depth 28, hidden 1152, ...)' to explain mismatches."""
    try:
        D, C, p, _ = sd["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        size = int(sd["pos_embed"].shape[1] ** 0.5) * p
        out = sd["final_layer.linear.weight"].shape[0] // (p * p)
        classes = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, AttributeError) as e:
        return f"no DiT weights (missing or odd {e})"
    name = {(28, 1152): "XL", (24, 1024): "L", (12, 768): "B", (12, 384): "S"}.get((depth, D), "custom")
    return (f"DiT-{name}/{p} (depth {depth}, hidden {D}, patch {p}), input_size {size} (images {size * 8}x{size * 8}"
            f" with an 8x VAE), in_channels {C}, out_channels {out}, {classes} label rows")

#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim, pos):
    """Sin-cos embedding of positions pos (M,) -> (M, embed_dim), in float64 like the MAE original."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """2-D sin-cos embedding for a grid_size x grid_size grid of patches -> (grid_size**2, embed_dim)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w first, as the official code
    return torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, grid_w),
                      get_1d_sincos_pos_embed(embed_dim // 2, grid_h)], dim=1)

#################################################################################
#                                   DiT Configs                                 #
#################################################################################

DiT_models = {f"DiT-{n}/{p}": functools.partial(DiT, depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
              for n, depth, hidden, heads in [("XL", 28, 1152, 16), ("L", 24, 1024, 16),
                                              ("B", 12, 768, 12), ("S", 12, 384, 6)]
              for p in (2, 4, 8)}

#################################################################################
#                       Official checkpoints: find and load                     #
#################################################################################

PRETRAINED = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/DiT/models"


def download(url, path):
    """Download url to path atomically (temp file + rename), printing progress to stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, t0, done = f"{path}.{os.getpid()}.part", time.time(), 0
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                eta = (total - done) * (time.time() - t0) / done
                print(f"\rdownloading {os.path.basename(path)}: {done / 2**20:.0f}/{total / 2**20:.0f} MB, "
                      f"ETA {eta:.0f}s", end="", file=sys.stderr)
        print(file=sys.stderr)
        if total and done != total:
            raise OSError(f"download of {url} stopped at {done} of {total} bytes; run again to retry")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def find_model(name_or_path):
    """State dict for an official name (downloaded once to $DIT_CACHE) or a path (raw or train.py checkpoint)."""
    path = name_or_path
    if name_or_path in PRETRAINED:
        cache = os.environ.get("DIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit"))
        path = os.path.join(cache, name_or_path)
        if not os.path.isfile(path):
            download(f"{os.environ.get('DIT_WEIGHTS_URL', WEIGHTS_URL).rstrip('/')}/{name_or_path}", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no DiT checkpoint at {path!r}; give a file path or one of {PRETRAINED}")
    with torch.serialization.safe_globals([argparse.Namespace]):  # official train.py stores args as a Namespace
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "ema" in ckpt:  # a training checkpoint: sample with the EMA weights
        ckpt = ckpt["ema"]
    return ckpt

#################################################################################
#                        Model table and quick benchmark                        #
#################################################################################

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DiT model table and a quick throughput check")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--bench", type=str, default=None, help="model to time, e.g. DiT-S/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    latent = args.image_size // 8
    print(f"{'model':10s} {'params (M)':>11s} {'Gflops':>8s}   ({args.image_size}x{args.image_size})")
    for name, make in DiT_models.items():
        with torch.device("meta"):
            m = make(input_size=latent)
        print(f"{name:10s} {sum(p.numel() for p in m.parameters()) / 1e6:11.2f} {m.gflops():8.2f}")
    if args.bench:  # forward + backward of one training batch; the first step warms up
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = DiT_models[args.bench](input_size=latent).to(device)
        n = args.batch_size
        x, t, y = torch.randn(n, 4, latent, latent), torch.randint(0, 1000, (n,)), torch.randint(0, 1000, (n,))
        for i in range(args.steps + 1):
            t0 = time.time() if i <= 1 else t0
            with torch.autocast(device, torch.bfloat16, enabled=args.bf16):
                model(x.to(device), t.to(device), y.to(device)).float().square().mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
        dt = (time.time() - t0) / args.steps
        print(f"{args.bench} forward+backward, batch {n}: {dt * 1e3:.1f} ms/step, {n / dt:.1f} img/s, "
              f"{3 * 2 * model.gflops() * n / dt / 1e3:.3f} TFLOP/s")
