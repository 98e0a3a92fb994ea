"""
FID, sFID, Inception Score, precision and recall as the ADM evaluator (guided-diffusion's
evaluations/evaluator.py, behind the DiT paper's numbers) defines them, in PyTorch instead of
TensorFlow, with the 2015-12-05 TF Inception v3 as ported by pytorch-fid and torch-fidelity.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz     # prints IS, FID, sFID, P, R
    python fid.py ref_images/ --save-stats ref_stats.npz            # reference statistics only
"""
import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.request
import zipfile
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy import linalg

# the FID Inception weights as pytorch-fid released them
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + INCEPTION_FILE)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
STATS = ("mu", "sigma", "mu_s", "sigma_s")
# the image files read from folders (train.py's dataset too)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#################################################################################
#                    Inception v3, FID variant (TF graph 2015-12-05)             #
#################################################################################

class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (TF's eps 0.001), ReLU; "same" padding unless strided."""
    def __init__(self, cin, cout, kernel, stride=1, padding="same"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding if stride == 1 else 0, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu_(self.bn(self.conv(x)))

def chain(block, name, cin, *convs):
    """Add ConvBN (cout, kernel[, stride]) in turn to block as name_1, name_2, ... (name if one)."""
    layers = []
    for i, (cout, *k) in enumerate(convs, 1):
        layers.append(ConvBN(cin, cout, *k))
        block.add_module(f"{name}_{i}" if len(convs) > 1 else name, layers[-1])
        cin = cout
    return layers

def run(layers, x):
    """x through a chain of layers."""
    for layer in layers:
        x = layer(x)
    return x

# 3x3 average pool; the TF graph averages over valid pixels only at the borders
avg_pool = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
# 3x3 max pool of stride 2: it halves the grid
reduction_pool = partial(F.max_pool2d, kernel_size=3, stride=2)

class Mixed(nn.Module):
    """An Inception block: its branches (lists of layers run in turn) side by side, concatenated."""
    def forward(self, x):
        return torch.cat([run(branch, x) for branch in self.branches], 1)

class InceptionA(Mixed):
    """Mixed_5b..5d, 35x35."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branches = [chain(self, "branch1x1", cin, (64, 1)),
                         chain(self, "branch5x5", cin, (48, 1), (64, 5)),
                         chain(self, "branch3x3dbl", cin, (64, 1), (96, 3), (96, 3)),
                         [avg_pool, *chain(self, "branch_pool", cin, (pool_features, 1))]]

class InceptionB(Mixed):
    """Mixed_6a, 35x35 -> 17x17."""
    def __init__(self, cin):
        super().__init__()
        self.branches = [chain(self, "branch3x3", cin, (384, 3, 2)),
                         chain(self, "branch3x3dbl", cin, (64, 1), (96, 3), (96, 3, 2)),
                         [reduction_pool]]

class InceptionC(Mixed):
    """Mixed_6b..6e, 17x17, factorized 7x7 convolutions."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branches = [chain(self, "branch1x1", cin, (192, 1)),
                         chain(self, "branch7x7", cin, (c7, 1), (c7, (1, 7)), (192, (7, 1))),
                         chain(self, "branch7x7dbl", cin, (c7, 1), (c7, (7, 1)), (c7, (1, 7)),
                               (c7, (7, 1)), (192, (1, 7))),
                         [avg_pool, *chain(self, "branch_pool", cin, (192, 1))]]

class InceptionD(Mixed):
    """Mixed_7a, 17x17 -> 8x8."""
    def __init__(self, cin):
        super().__init__()
        self.branches = [chain(self, "branch3x3", cin, (192, 1), (320, 3, 2)),
                         chain(self, "branch7x7x3", cin, (192, 1), (192, (1, 7)), (192, (7, 1)),
                               (192, 3, 2)),
                         [reduction_pool]]

class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch), 8x8."""
    def __init__(self, cin, max_pool):
        super().__init__()
        # the TF graph's last block pools with max, not average
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        # each 3x3 is split into a 1x3 and a 3x1 side by side
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1))
        self.bd = chain(self, "branch3x3dbl", cin, (448, 1), (384, 3))
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = run(self.bd, x)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pool)], 1)

def resize_weights(n, size, device):
    """(size, n) matrix: output i mixes pixels floor(i * n / size) and the next one (clamped)."""
    # float32 positions, as TF computes them
    src = torch.arange(size, dtype=torch.float32) * (n / size)
    lo = src.floor()
    rows = torch.arange(size)
    w = torch.zeros(size, n)
    w[rows, lo.long()] = 1 - (src - lo)
    w[rows, (lo.long() + 1).clamp(max=n - 1)] += src - lo
    return w.to(device)

def tf1_resize(x, size=299):
    """Bilinear resize of (N, C, H, W) floats as TF-1's legacy ResizeBilinear (no half-pixel)."""
    if x.shape[-2:] == (size, size):
        return x
    # two small matmuls: much faster than gathers on CPU, equal to TF's lerps up to rounding
    left = resize_weights(x.shape[-2], size, x.device)
    right = resize_weights(x.shape[-1], size, x.device)
    return left @ x @ right.T                                               # (N, C, size, size)

class InceptionV3(nn.Module):
    """uint8 images (N, 3, H, W) -> pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, padding=0)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, padding=0)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # 1008 classes; its bias is in the file but unused here
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = tf1_resize(check_images(images, "InceptionV3").float())
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # (N, 3, 299, 299)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))
        x = reduction_pool(self.Conv2d_2b_3x3(x))                           # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = reduction_pool(x)                                                # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))    # (N, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # sFID's features: the first 7 channels of Mixed_6d's branch1x1, which leads its concat
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                    # (N, 17 * 17 * 7)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))    # (N, 2048, 8, 8)
        pool3 = x.mean((2, 3))                                               # (N, 2048)
        # no bias, as ADM's Inception Score
        logits = pool3 @ self.fc.weight.T                                    # (N, 1008)
        return pool3, spatial.contiguous(), logits

#################################################################################
#                                  Weights                                      #
#################################################################################

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

def load_inception(path=None, device="cpu"):
    """
    The FID Inception (InceptionV3), BatchNorm folded, in eval mode, without gradients.

    :param path: a copy of INCEPTION_FILE; None: cache_dir()/INCEPTION_FILE, downloaded once from
                 $DIT_INCEPTION_URL (default WEIGHTS_URL) and checked against WEIGHTS_SHA256.
    :param device: where the model runs, e.g. "cuda".
    :return: the model: uint8 images (N, 3, H, W) -> (pool3, spatial, logits).
    """
    name = INCEPTION_FILE
    if path is None:
        path = os.path.join(cache_dir(), name)
        # DIT_INCEPTION_URL: a mirror, or a file:// URL
        url = os.environ.get("DIT_INCEPTION_URL") or WEIGHTS_URL
        try:
            if not os.path.isfile(path):
                download(url, path, WEIGHTS_SHA256, mirror="DIT_INCEPTION_URL")
        except OSError as e:
            raise OSError(f"{e}, or pass its path (fid.py --inception PATH)") from None
    # no random init: every tensor comes from the file
    with torch.device("meta"):
        model = InceptionV3()
    with open(path, "rb") as f:
        try:
            model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True), assign=True)
        except Exception:
            # never torch's text: it suggests weights_only=False, which runs the file's code
            raise ValueError(f"{path} is not {name} (empty, truncated, corrupt, another model's "
                             "weights or not only tensors); delete it or pass that file") from None
    # fold each BatchNorm into its convolution: the same function, one pass less per layer
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvBN):
                scale = m.bn.weight * (m.bn.running_var + m.bn.eps).rsqrt()        # (cout,)
                m.conv.weight.mul_(scale[:, None, None, None])
                m.conv.bias = nn.Parameter(m.bn.bias - m.bn.running_mean * scale)
                m.bn = nn.Identity()
    # channels-last lets oneDNN / cuDNN run the convolutions without layout conversions
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

#################################################################################
#                                  Image sources                                #
#################################################################################

NPZ_ERROR = "{} is not a readable .npz file (truncated or corrupt: {}); write or download it again"

def check_images(x, what):
    """x if it is uint8 RGB images (N, 3, H, W), else a clear error."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected uint8 RGB images, (N, H, W, 3) in arrays and .npz "
                         f"files, (N, 3, H, W) in tensors, got {x.dtype} {tuple(x.shape)}; from "
                         "floats in [0, 1]: (x * 255).round(); grayscale: repeat to 3 channels")
    return x

def to_rgb(image):
    """A PIL image of any mode -> the 8-bit RGB a viewer shows (turned, 16 bits scaled, alpha on
    white)."""
    # the orientation in EXIF (camera JPEGs store their pixels unrotated)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16 bits scaled to 8, rounded (convert("RGB") clips them: white)
        x = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")

def _npz_batches(path, batch_size):
    """(count, batches) of arr_0 (N, H, W, 3) uint8 in an ADM .npz, streamed from the zip."""
    try:
        z = zipfile.ZipFile(path)
        f = z.open("arr_0.npy")
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = getattr(np.lib.format, "read_array_header_%d_%d" % version)(f)
    except KeyError:
        names = [n.removesuffix(".npy") for n in z.namelist()]
        raise ValueError(f"{path} has no images (arr_0), only {names}; ADM .npz files hold uint8 "
                         "images (N, H, W, 3) as arr_0: np.savez(path, images)") from None
    except Exception as e:
        raise ValueError(NPZ_ERROR.format(path, e)) from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3 or 0 in shape[1:3]:
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}; expected C-ordered uint8 (N, H, W, 3)")
    # a header that claims more images than the file holds (hostile, or not arr_0's own)
    held = z.getinfo("arr_0.npy").file_size - f.tell()
    if min(shape) < 0 or shape[0] * shape[1] * shape[2] * 3 > held:
        raise ValueError(f"{path}: arr_0 claims {shape} but holds {held:,} bytes: corrupt; write "
                         "or download it again")
    def batches():
        """The images, batch_size at a time, read from the zip as they are needed."""
        with z, f:
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                try:
                    data = f.read(n * int(np.prod(shape[1:])))
                    x = np.frombuffer(data, np.uint8).reshape(n, *shape[1:])
                except Exception as e:
                    raise ValueError(NPZ_ERROR.format(path, e)) from None
                # (n, 3, H, W) with channels-last memory
                yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2)
    return shape[0], batches()

def _folder_batches(path, batch_size):
    """(count, batches) of the images in a folder, sorted by name, as the RGB a viewer shows."""
    # regular files only: reading a named pipe would wait forever
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))
             if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))]
    if not files:
        raise ValueError(f"{path}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
    def load(file, size=None):
        """One image file as uint8 (H, W, 3), of the given size."""
        try:
            with Image.open(file) as im:
                im = np.asarray(to_rgb(im))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{file} is not a readable image: {e}") from None
        if size and im.shape != size:
            raise ValueError(f"{file}: not the size of {files[0]}; images must be the same size")
        return im
    size = load(files[0]).shape
    def batches():
        """The images, batch_size at a time, loaded as they are needed."""
        for i in range(0, len(files), batch_size):
            x = np.stack([load(f, size) for f in files[i:i + batch_size]])
            yield torch.from_numpy(x).permute(0, 3, 1, 2)                   # (B, 3, H, W)
    return len(files), batches()

def image_batches(images, batch_size=50):
    """
    The images to evaluate, batch by batch, read as they are needed.

    :param images: an ADM .npz (arr_0: uint8 (N, H, W, 3)), a folder of IMAGE_EXTENSIONS files
                   of one size (sorted by name; 16-bit scaled to 8, alpha on white), a uint8
                   array (N, H, W, 3) or a uint8 tensor (N, 3, H, W).
    :param batch_size: images per batch; the last may be smaller.
    :return: (N, iterator of uint8 tensors (B, 3, H, W)).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size}")
    if isinstance(images, (str, os.PathLike)):
        images = os.fspath(images)
        if os.path.isdir(images):
            return _folder_batches(images, batch_size)
        if images.endswith(".npz") and os.path.isfile(images):
            return _npz_batches(images, batch_size)
        raise ValueError(f"{images}: expected an existing .npz file or a folder of images")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        images = images.movedim(-1, 1) if images.dim() == 4 else images
    x = check_images(images, "images")
    return len(x), (x[i:i + batch_size] for i in range(0, len(x), batch_size))

@torch.inference_mode()
def compute_features(images, model, batch_size=50):
    """
    The Inception features of images, with a progress line on stderr.

    :param images: anything image_batches takes (.npz, folder, uint8 array or tensor).
    :param model: load_inception()'s model; the images go to its device.
    :param batch_size: images per forward pass.
    :return: numpy float32 pool3 (N, 2048) for FID, precision and recall, spatial (N, 2023)
             for sFID, logits (N, 1008) for the Inception Score.
    """
    n, batches = image_batches(images, batch_size)
    device = next(model.parameters()).device
    out = [np.empty((n, d), np.float32) for d in (2048, 2023, 1008)]
    i = 0
    start = time.time()
    for x in batches:
        for o, f in zip(out, model(x.to(device))):
            o[i:i + len(x)] = f.float().cpu().numpy()
        i += len(x)
        print_progress("inception features", i, n, start)
    return tuple(out)

#################################################################################
#                        Metrics (ADM evaluator definitions)                    #
#################################################################################

def statistics(features):
    """
    FID statistics of features as the evaluator computes them.

    :param features: (N, D) float array, N >= 2 (compute_features' pool3 or spatial).
    :return: float64 mean (D,) and covariance (D, D) (np.cov, N - 1 normalized).
    """
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(0, dtype=np.float64), np.cov(features, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    FID: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); eps on the diagonals if S1 S2 is singular.

    :param mu1, sigma1: mean (D,) and covariance (D, D) of one set, as statistics() returns.
    :param mu2, sigma2: the same of the other set (the order does not matter).
    :param eps: added to both diagonals if the product's square root is not finite.
    :return: the distance, a float >= 0 (up to rounding); lower is better.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different features: {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    for name, a in zip(("mu1", "sigma1", "mu2", "sigma2"), (mu1, sigma1, mu2, sigma2)):
        # sqrtm would run for minutes on NaN
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds NaN or inf; FID needs the statistics of 2 or more "
                             "finite feature vectors per set")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid: singular product, adding {eps} to the covariance diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error can leave a small imaginary part
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"sqrtm has imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, split_size=5000):
    """
    Inception Score: mean over ordered splits of exp(E_x KL(p(y|x) || p(y))).

    :param logits: (N, 1008) Inception logits (compute_features' third output); p = softmax.
    :param split_size: images per split (the evaluator's 5000); the last may be smaller.
    :return: the score, a float in [1, 1008]; higher is better.
    """
    scores = []
    for i in range(0, len(logits), split_size):
        p = torch.from_numpy(np.asarray(logits[i:i + split_size])).double().softmax(1)  # (n, 1008)
        p_y = p.mean(0)
        # E_x KL(p(y|x) || p(y)) = E_x sum p log p - sum p(y) log p(y); xlogy: 0 log 0 = 0
        kl = torch.special.xlogy(p, p).sum(1).mean() - torch.special.xlogy(p_y, p_y).sum()
        scores.append(kl.exp().item())
    return float(np.mean(scores))

def _sq_distances(u, v):
    """Pairwise squared distances (n, m) as the evaluator's: in float16, float32 on overflow."""
    for dtype in (torch.float16, torch.float32):
        a, b = u.to(dtype), v.to(dtype)
        # TF's order of operations
        d = (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()

def _radii(x, k, rows):
    """Squared distance of each point to its k-th nearest neighbour (itself excluded)."""
    return torch.cat([_sq_distances(x[i:i + rows], x).kthvalue(k + 1, 1).values
                      for i in range(0, len(x), rows)])

@torch.inference_mode()
def precision_recall(ref, sample, k=3, rows=1000, device="cpu"):
    """
    Improved precision and recall (Kynkaanniemi et al. 2019) as the evaluator computes them.

    :param ref: (N, D) reference pool3 features, N > k.
    :param sample: (M, D) sample pool3 features, M > k.
    :param k: the k-th nearest neighbour sets each point's radius (the evaluator's 3).
    :param rows: rows of the distance matrix per pass, to bound memory.
    :param device: torch device for the distances.
    :return: (precision, recall) floats in [0, 1]: the share of samples inside the reference
             manifold, and of reference points inside the samples'.
    """
    if min(len(ref), len(sample)) <= k:
        raise ValueError(f"precision/recall need at least {k + 1} images per set, got {len(ref)} "
                         f"and {len(sample)}")
    ref = torch.from_numpy(np.asarray(ref, np.float32)).to(device)
    sample = torch.from_numpy(np.asarray(sample, np.float32)).to(device)
    r_ref = _radii(ref, k, rows)
    r_sample = _radii(sample, k, rows)
    in_ref = torch.zeros(len(sample), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(ref), rows):
        d = _sq_distances(ref[i:i + rows], sample)                          # (rows, N_sample)
        ref_in[i:i + rows] = (d <= r_sample[None]).any(1)
        in_ref |= (d <= r_ref[i:i + rows, None]).any(0)
    return in_ref.double().mean().item(), ref_in.double().mean().item()

#################################################################################
#                                    CLI                                        #
#################################################################################

def read_stats(path):
    """A reference's stored (mu, sigma, mu_s, sigma_s) or None, and whether to read its images."""
    if not (str(path).endswith(".npz") and os.path.isfile(path)):
        return None, True
    try:
        with np.load(path) as z:
            stats = {k: z[k] for k in STATS if k in z.files}
            has_images = "arr_0" in z.files
    except Exception as e:
        raise ValueError(NPZ_ERROR.format(path, e)) from None
    if stats and len(stats) < len(STATS):
        missing = ", ".join(k for k in STATS if k not in stats)
        raise ValueError(f"{path} has statistics without {missing}; write all four with "
                         "fid.py REF --save-stats NPZ")
    for k, a in stats.items():
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise ValueError(f"{path}: {k} is not finite floats (NaN, inf or {a.dtype}); "
                             "compute the statistics again: fid.py REF --save-stats NPZ")
    # the images are read if there are some, or if there are no statistics (then they must be)
    return tuple(stats[k] for k in STATS) if stats else None, has_images or not stats

def reference(path, model, batch_size):
    """
    A reference set's statistics; stored ones win over its images, as ADM's evaluator.

    :param path: an ADM .npz (images and/or mu, sigma, mu_s, sigma_s), a fid.py --save-stats
                 file, or a folder of images.
    :param model: load_inception()'s model (used only if images must be read).
    :param batch_size: images per forward pass.
    :return: ((mu, sigma), (mu_s, sigma_s), pool3 features or None if no images were read).
    """
    stats, read_images = read_stats(path)
    pool = None
    if read_images:
        pool, spatial, _ = compute_features(path, model, batch_size)
        stats = stats or (*statistics(pool), *statistics(spatial))
    return stats[:2], stats[2:], pool

def save_stats(path, mu, sigma, mu_s, sigma_s):
    """Write statistics in the evaluator's layout, atomically (a temp file, renamed when done)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def check_args(args):
    """Check every argument and input of the CLI before anything is loaded or computed."""
    if args.samples is None and args.save_stats is None:
        raise ValueError("give SAMPLES to evaluate against REF, or --save-stats NPZ")
    if args.inception and not os.path.isfile(args.inception):
        raise FileNotFoundError(f"--inception {args.inception}: no such file; leave it out to "
                                "download the weights")
    if args.save_stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
        raise FileNotFoundError(f"--save-stats {args.save_stats}: its folder does not exist")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {args.device} is not usable ({e}); pass --device cpu") from None
    read_images = read_stats(args.ref)[1]
    # FID needs 2 images per set, precision and recall (reference images and samples) 4; the
    # reference's images count unless it holds statistics alone
    need = 4 if read_images and args.samples else 2
    for path in filter(None, (args.ref if read_images else None, args.samples)):
        n = image_batches(path, args.batch_size)[0]
        if n < need:
            raise ValueError(f"{path} has {n} image(s); FID needs at least 2 per set, precision "
                             "and recall 4 (the paper's numbers: 50,000)")

def main():
    """python fid.py REF [SAMPLES]: the evaluator's lines; a user's error is one line on stderr."""
    p = argparse.ArgumentParser(description="IS, FID, sFID, precision, recall as ADM's evaluator",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ref", help="reference: an ADM .npz (images and/or statistics) or image folder")
    p.add_argument("samples", nargs="?", help="samples: an .npz (arr_0) or a folder of images")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for the Inception network and precision/recall")
    p.add_argument("--inception", metavar="PATH", help=f"{INCEPTION_FILE}; "
                   "None: downloaded once into $DIT_CACHE (~/.cache/dit)")
    p.add_argument("--save-stats", metavar="NPZ", help="write REF's mu, sigma, mu_s, sigma_s here")
    args = p.parse_args()
    try:
        check_args(args)
        # full float32 convolutions, as the evaluator's TF graph
        torch.backends.cudnn.allow_tf32 = False
        model = load_inception(args.inception, args.device)
        (mu, sigma), (mu_s, sigma_s), ref_pool = reference(args.ref, model, args.batch_size)
        if args.save_stats:
            save_stats(args.save_stats, mu, sigma, mu_s, sigma_s)
        if args.samples is None:
            return
        pool, spatial, logits = compute_features(args.samples, model, args.batch_size)
        print("Inception Score:", inception_score(logits))
        print("FID:", frechet_distance(*statistics(pool), mu, sigma))
        print("sFID:", frechet_distance(*statistics(spatial), mu_s, sigma_s))
        if ref_pool is None:
            print("Precision/Recall: skipped, the reference has statistics but no images (arr_0)")
            return
        precision, recall = precision_recall(ref_pool, pool, device=args.device)
        print(f"Precision: {precision}\nRecall: {recall}")
    except (ValueError, OSError) as e:
        raise SystemExit(f"fid.py: error: {' '.join(str(e).split())}") from None

if __name__ == "__main__":
    main()
