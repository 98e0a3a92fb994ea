# Tests of train.py on the CPU: tiny DiTs, tiny image folders written by the tests, gloo DDP via torchrun.
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dit
import train
import vae as vae_lib

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
