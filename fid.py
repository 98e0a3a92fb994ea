"""
FID, sFID, Inception Score, precision and recall as the ADM evaluator (guided-diffusion evaluations/
evaluator.py, behind the DiT paper's numbers) defines them, in PyTorch instead of TensorFlow, with the
2015-12-05 TF Inception v3 as ported by pytorch-fid / torch-fidelity (pt_inception-2015-12-05-6726825d.pth).

    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz     # prints IS, FID, sFID, P, R
    python fid.py ref_images/ --save-stats ref_stats.npz            # reference statistics only
"""
import argparse
import hashlib
import os
import sys
import time
import urllib.request
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

#################################################################################
#                    Inception v3, FID variant (TF graph 2015-12-05)             #
#################################################################################

class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (TF's eps 0.001), ReLU; size-preserving padding unless strided."""
    def __init__(self, cin, cout, kernel_size, stride=1, padding="same"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding if stride == 1 else 0, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu_(self.bn(self.conv(x)))

def chain(block, name, cin, *convs):
    """Add ConvBN block.name_1, name_2, ... (official names), each (cout, kernel[, stride]) feeding the next."""
    for i, (cout, *k) in enumerate(convs, 1):
        block.add_module(f"{name}_{i}", ConvBN(cin, cout, *k))
        cin = cout
    return [getattr(block, f"{name}_{i}") for i in range(1, len(convs) + 1)]  # in order, for run()

def run(layers, x):
    """x through a chain of layers."""
    for layer in layers:
        x = layer(x)
    return x

def avg_pool(x):
    # the TF graph averages over valid pixels only at the borders (count_include_pad=False)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):  # Mixed_5b..5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.b5 = chain(self, "branch5x5", cin, (48, 1), (64, 5))
        self.b3 = chain(self, "branch3x3dbl", cin, (64, 1), (96, 3), (96, 3))
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), run(self.b5, x), run(self.b3, x), self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.b3 = chain(self, "branch3x3dbl", cin, (64, 1), (96, 3), (96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), run(self.b3, x), F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorized 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.b7 = chain(self, "branch7x7", cin, (c7, 1), (c7, (1, 7)), (192, (7, 1)))
        self.b7dbl = chain(self, "branch7x7dbl", cin, (c7, 1), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7)))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), run(self.b7, x), run(self.b7dbl, x), self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.b3 = chain(self, "branch3x3", cin, (192, 1), (320, 3, 2))
        self.b7 = chain(self, "branch7x7x3", cin, (192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2))

    def forward(self, x):
        return torch.cat([run(self.b3, x), run(self.b7, x), F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(nn.Module):  # Mixed_7b (average pool branch), Mixed_7c (max pool branch), 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block pools with max, not average
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)  # split into 1x3 and 3x1 side by side
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, (1, 3)), ConvBN(384, 384, (3, 1))
        self.bd = chain(self, "branch3x3dbl", cin, (448, 1), (384, 3))
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = ConvBN(384, 384, (1, 3)), ConvBN(384, 384, (3, 1))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3, bd = self.branch3x3_1(x), run(self.bd, x)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pool)], 1)

def tf1_resize(x, size=299):
    """Bilinear resize of (N, C, H, W) floats as TF-1's legacy ResizeBilinear (no half-pixel offset)."""
    def weights(n):  # (size, n): output i mixes source pixels floor(i * n / size) and the next one (clamped)
        src = torch.arange(size, dtype=torch.float32) * (n / size)   # float32 positions, as TF computes them
        lo, rows = src.floor(), torch.arange(size)
        w = torch.zeros(size, n)
        w[rows, lo.long()] = 1 - (src - lo)
        w[rows, (lo.long() + 1).clamp(max=n - 1)] += src - lo
        return w.to(x.device)
    if x.shape[-2:] == (size, size):
        return x
    # two small matmuls: much faster than gathers on CPU, equal to TF's lerps up to float rounding
    return weights(x.shape[-2]) @ x @ weights(x.shape[-1]).T       # (N, C, size, size)

class InceptionV3(nn.Module):
    """uint8 images (N, 3, H, W) -> pool3 (N, 2048), sFID spatial (N, 2023), unbiased logits (N, 1008)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, padding=0)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, padding=0)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, c7=128), InceptionC(768, c7=160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, c7=160), InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 classes; its bias is in the file but unused here

    def forward(self, images):
        x = tf1_resize(check_images(images, "InceptionV3").float())
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # (N, 3, 299, 299)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)                # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))    # (N, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # sFID's features: the first 7 channels of Mixed_6d's branch1x1, which leads its concatenation
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                    # (N, 17 * 17 * 7) in NHWC order
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                   # (N, 2048, 8, 8)
        pool3 = x.mean((2, 3))                                               # (N, 2048)
        logits = pool3 @ self.fc.weight.T                                    # (N, 1008), no bias, as ADM's IS
        return pool3, spatial.contiguous(), logits

#################################################################################
#                                  Weights                                      #
#################################################################################

def download(url, sha256, dest):
    """Download url to dest (atomically) unless dest exists; fail clearly if its sha256 differs."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp, h = f"{dest}.{os.getpid()}.tmp", hashlib.sha256()
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha256:
            raise RuntimeError(f"sha256 of {url} is {h.hexdigest()}, expected {sha256}: the download is "
                               f"corrupt or not the right file; retry, or pass a verified file by path")
        os.replace(tmp, dest)
    except OSError as e:
        raise OSError(f"could not download {url} ({e}); fetch it by hand and pass its path "
                      f"(--inception PATH, load_inception(path)), or set DIT_INCEPTION_URL to a mirror") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest

def load_inception(path=None, device="cpu"):
    """The FID Inception in eval mode, from path or the cached download ($DIT_CACHE, ~/.cache/dit)."""
    if path is None:
        cache = os.environ.get("DIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit"))
        url = os.environ.get("DIT_INCEPTION_URL", WEIGHTS_URL)  # e.g. a mirror or a file:// path
        path = download(url, WEIGHTS_SHA256, os.path.join(cache, os.path.basename(WEIGHTS_URL)))
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = InceptionV3()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)  # strict
    with torch.no_grad():  # fold each BatchNorm into its convolution: same function, one pass less per layer
        for m in model.modules():
            if isinstance(m, ConvBN):
                scale = m.bn.weight * (m.bn.running_var + m.bn.eps).rsqrt()            # (cout,)
                m.conv.weight.mul_(scale[:, None, None, None])
                m.conv.bias = nn.Parameter(m.bn.bias - m.bn.running_mean * scale)
                m.bn = nn.Identity()
    # channels-last lets oneDNN / cuDNN run the convolutions without layout conversions
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

#################################################################################
#                                  Image sources                                #
#################################################################################

def check_images(x, what):
    """x if it is uint8 RGB images (N, 3, H, W), else a clear error."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected uint8 RGB images, (N, H, W, 3) in numpy arrays and .npz files, "
                         f"(N, 3, H, W) in tensors; got {x.dtype} {tuple(x.shape)}. From floats in [0, 1]: "
                         f"(x * 255).round().clip(0, 255) as uint8; from grayscale: repeat to 3 channels")
    return x

def _npz_batches(path, batch_size):
    """(count, batches) of arr_0 (N, H, W, 3) uint8 in an ADM .npz, streamed from the zip in chunks."""
    z = zipfile.ZipFile(path)
    if "arr_0.npy" not in z.namelist():
        raise ValueError(f"{path} has no images (arr_0), only {[n[:-4] for n in z.namelist()]}; ADM "
                         f".npz files hold uint8 images (N, H, W, 3) as arr_0: np.savez(path, images)")
    f = z.open("arr_0.npy")
    shape, fortran, dtype = getattr(np.lib.format, "read_array_header_%d_%d" % np.lib.format.read_magic(f))(f)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be C-ordered uint8 RGB images (N, H, W, 3), got {dtype} {shape}")
    def batches():
        with z, f:
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                x = np.frombuffer(f.read(n * int(np.prod(shape[1:]))), np.uint8).reshape(n, *shape[1:])
                yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2)  # (n, 3, H, W), channels-last memory
    return shape[0], batches()

def _folder_batches(path, batch_size):
    """(count, batches) of the images in a folder, sorted by name; grayscale and RGBA converted to RGB."""
    from PIL import Image
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))
             if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp"))]
    if not files:
        raise ValueError(f"{path}: no images (.png, .jpg, .jpeg, .bmp, .webp) in this folder")
    def load(file, first=None):
        try:
            with Image.open(file) as im:
                im = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{file} is not a readable image: {e}") from None
        if first is not None and im.shape != first.shape:
            raise ValueError(f"{file} is {im.shape[1]}x{im.shape[0]}, {files[0]} is {first.shape[1]}x"
                             f"{first.shape[0]}: all images must have the same size")
        return im
    first = load(files[0])
    batches = ([load(f, first) for f in files[i:i + batch_size]] for i in range(0, len(files), batch_size))
    return len(files), (torch.from_numpy(np.stack(b)).permute(0, 3, 1, 2) for b in batches)  # (B, 3, H, W)

def image_batches(images, batch_size=50):
    """(count, iterator of uint8 (B, 3, H, W)) from a .npz, a folder, an array (N, H, W, 3) or a tensor (N, 3, H, W)."""
    if isinstance(images, (str, os.PathLike)):
        images = os.fspath(images)
        if os.path.isdir(images):
            return _folder_batches(images, batch_size)
        if images.endswith(".npz") and os.path.isfile(images):
            return _npz_batches(images, batch_size)
        raise ValueError(f"{images}: expected an existing .npz file (arr_0: uint8 (N, H, W, 3)) or a folder of images")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).movedim(-1, 1) if images.ndim == 4 else torch.from_numpy(images)
    x = check_images(images, "images")
    return len(x), (x[i:i + batch_size] for i in range(0, len(x), batch_size))

@torch.inference_mode()
def compute_features(images, model, batch_size=50):
    """Inception features of all images: pool3 (N, 2048), spatial (N, 2023), logits (N, 1008), numpy float32."""
    n, batches = image_batches(images, batch_size)
    device = next(model.parameters()).device
    out = [np.empty((n, d), np.float32) for d in (2048, 2023, 1008)]
    i, t0, shown = 0, time.time(), time.time()
    for x in batches:
        for o, f in zip(out, model(x.to(device))):
            o[i:i + len(x)] = f.float().cpu().numpy()
        i += len(x)
        if time.time() - shown > 10 or i == n:
            rate = i / (time.time() - t0)
            print(f"inception features {i}/{n} images, {rate:.1f} img/s, ETA {(n - i) / rate:.0f}s", file=sys.stderr)
            shown = time.time()
    return tuple(out)

#################################################################################
#                        Metrics (ADM evaluator definitions)                    #
#################################################################################

def statistics(features):
    """Mean and covariance of features (N, D) as the evaluator computes them (float64 covariance)."""
    return features.mean(0, dtype=np.float64), np.cov(features, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); eps on the diagonals if the product is singular."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different features: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid: singular product, adding {eps} to the covariance diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, split_size=5000):
    """Mean over ordered splits of exp(E_x KL(p(y|x) || p(y))), with p = softmax of the 1008 logits."""
    scores = []
    for i in range(0, len(logits), split_size):
        p = torch.from_numpy(np.asarray(logits[i:i + split_size])).double().softmax(1)  # (n, 1008)
        p_y = p.mean(0)                                                                 # marginal p(y)
        # E_x KL(p(y|x) || p(y)) = E_x sum p log p - sum p(y) log p(y); xlogy makes 0 log 0 = 0
        kl = torch.special.xlogy(p, p).sum(1).mean() - torch.special.xlogy(p_y, p_y).sum()
        scores.append(kl.exp().item())
    return float(np.mean(scores))

def _sq_distances(u, v):
    """Pairwise squared distances (n, m) as the evaluator computes them: in float16, float32 on overflow."""
    for dtype in (torch.float16, torch.float32):
        a, b = u.to(dtype), v.to(dtype)
        d = (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)  # TF's op order
        if torch.isfinite(d).all():
            return d.float()

def _radii(x, k, rows):
    """Squared distance of each point to its k-th nearest neighbour (itself excluded)."""
    return torch.cat([_sq_distances(x[i:i + rows], x).kthvalue(k + 1, 1).values for i in range(0, len(x), rows)])

@torch.inference_mode()
def precision_recall(ref, sample, k=3, rows=1000, device="cpu"):
    """Improved precision (samples inside the reference manifold) and recall (reference inside the samples')."""
    if min(len(ref), len(sample)) <= k:
        raise ValueError(f"precision/recall need at least {k + 1} images per set, got {len(ref)} and {len(sample)}")
    ref, sample = (torch.from_numpy(np.asarray(a, np.float32)).to(device) for a in (ref, sample))
    r_ref, r_sample = _radii(ref, k, rows), _radii(sample, k, rows)
    in_ref, ref_in = (torch.zeros(len(a), dtype=torch.bool, device=device) for a in (sample, ref))
    for i in range(0, len(ref), rows):
        d = _sq_distances(ref[i:i + rows], sample)                   # (rows, N_sample)
        ref_in[i:i + rows] = (d <= r_sample[None]).any(1)
        in_ref |= (d <= r_ref[i:i + rows, None]).any(0)
    return in_ref.double().mean().item(), ref_in.double().mean().item()

#################################################################################
#                                    CLI                                        #
#################################################################################

def reference(path, model, batch_size):
    """((mu, sigma), (mu_s, sigma_s), pool3 or None): a reference .npz's stored statistics win, as in the evaluator."""
    z = np.load(path) if str(path).endswith(".npz") and os.path.isfile(path) else {}
    stored = ((z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"])) if "mu" in z else None
    if stored and "arr_0" not in z:
        return (*stored, None)
    pool, spatial, _ = compute_features(path, model, batch_size)  # a clear error if there are no images
    return (*(stored or (statistics(pool), statistics(spatial))), pool)

def main():
    p = argparse.ArgumentParser(description="ADM evaluator metrics (IS, FID, sFID, precision, recall) in PyTorch")
    p.add_argument("ref", help="reference batch: ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or image folder")
    p.add_argument("samples", nargs="?", help="sample batch: .npz (arr_0 uint8 (N, H, W, 3)) or image folder")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: downloaded to $DIT_CACHE)")
    p.add_argument("--save-stats", metavar="NPZ", help="save the reference's mu, sigma, mu_s, sigma_s to NPZ")
    args = p.parse_args()
    if args.samples is None and args.save_stats is None:
        p.error("give SAMPLES to evaluate against REF, or --save-stats NPZ to save REF's statistics")
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions, as the evaluator's TF graph
    model = load_inception(args.inception, args.device)
    (mu, sigma), (mu_s, sigma_s), ref_pool = reference(args.ref, model, args.batch_size)
    if args.save_stats:  # written to a temporary name first, then renamed: never a half-written file
        np.savez(args.save_stats + ".tmp.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        os.replace(args.save_stats + ".tmp.npz", args.save_stats)
    if args.samples is None:
        return
    pool, spatial, logits = compute_features(args.samples, model, args.batch_size)
    print("Inception Score:", inception_score(logits))
    print("FID:", frechet_distance(*statistics(pool), mu, sigma))
    print("sFID:", frechet_distance(*statistics(spatial), mu_s, sigma_s))
    if ref_pool is None:
        print("Precision/Recall: skipped, the reference file has statistics but no images (arr_0)")
        return
    print("Precision: {}\nRecall: {}".format(*precision_recall(ref_pool, pool, device=args.device)))

if __name__ == "__main__":
    main()
