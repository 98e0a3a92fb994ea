"""Tests for fid.py: golden parity of the FID Inception, the TF-1 resize, metrics against their
definitions, image sources, weight loading (local file and a local HTTP server), the CLI."""
import functools
import hashlib
import http.server
import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fid

FID_HERE = os.path.dirname(os.path.abspath(__file__))
# sha256 of "key<TAB>shape" lines of pt_inception-2015-12-05 (shared/golden/inception_keys.txt), 566 entries
INCEPTION_KEYS_SHA256 = "e22ace644c9f030d9793411454945147d47bff1a80d8339955d5867176d77687"


def fid_fill_(state_dict, seed=0):
    """The golden README's deterministic weight fill, in place."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(state_dict):
        t = state_dict[name]
        if not t.is_floating_point():
            continue
        randn = functools.partial(torch.randn, t.shape, generator=g, dtype=torch.float64)
        if name.endswith("running_var"):
            v = 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)
        elif name.endswith("running_mean"):
            v = 0.1 * randn()
        elif t.dim() >= 2:
            v = randn() * math.sqrt(2 / (t.numel() // t.shape[0]))
        elif t.dim() == 1 and name.endswith("weight"):
            v = 1 + 0.1 * randn()
        else:
            v = 0.1 * randn()
        t.copy_(v.to(t.dtype))


def fid_check_summary(x, s, rtol=1e-4):
    """Compare a tensor with a golden summary (sums, strided values, 8 random projections)."""
    x = x.double().flatten()
    assert list(s["shape"])[1:] == [x.numel() // s["shape"][0]] and x.numel() == s["numel"]
    scale = x.abs().max().item()
    for key, val in (("sum", x.sum()), ("abs_sum", x.abs().sum()), ("sq_sum", x.square().sum())):
        assert val.item() == pytest.approx(s[key], rel=rtol, abs=1e-6 * scale * x.numel()), key
    np.testing.assert_allclose(x[::s["stride"]][:32].numpy(), s["values"], rtol=rtol, atol=1e-5 * scale)
    for k, ref in enumerate(s["proj8"]):
        r = torch.randn(x.numel(), generator=torch.Generator().manual_seed(12345 + k), dtype=torch.float64)
        assert (x @ r).item() == pytest.approx(ref, rel=rtol, abs=1e-5 * x.norm().item())


@pytest.fixture(scope="module")
def fid_inception():
    """The FID Inception with the golden fill (seed 0), unfolded, in eval mode."""
    m = fid.InceptionV3()
    with torch.no_grad():
        fid_fill_(m.state_dict())
    return m.eval()


@pytest.fixture(scope="module")
def fid_weights_file(fid_inception, tmp_path_factory):
    """The filled state_dict saved like the official .pth file."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_inception.state_dict(), path)
    return path


def fid_images(n, size, seed):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------- network

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
    fid_check_summary(pool3, case["pool3"])
    fid_check_summary(spatial, case["spatial_mixed6_conv_first7_nhwc"])
    fid_check_summary(logits, case["logits_unbiased_1008"])


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


# ---------------------------------------------------------------- TF-1 resize

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


# ---------------------------------------------------------------- metrics

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


# ---------------------------------------------------------------- image sources

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


# ---------------------------------------------------------------- weights: cache and download

class _FidQuiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def fid_http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FidQuiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fid_download_checks_sha256_and_loads(fid_http_root, fid_weights_file, fid_inception, tmp_path):
    root, url = fid_http_root
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


# ---------------------------------------------------------------- CLI

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
