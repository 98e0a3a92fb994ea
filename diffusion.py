"""
Gaussian diffusion for DiT, numerically the same as the official release (itself from ADM / IDDPM):
beta schedules, q_sample, the hybrid loss (MSE on epsilon + VLB for the learned variance), timestep
respacing, DDPM / DDIM sampling loops that draw random numbers exactly as the official ones, and
DPM-Solver++(2M) exactly as diffusers computes it.
"""
import math
import sys
import time

import torch

def print_progress(what, done, total, start, unit=""):
    """Print a status line to stderr: done/total, rate and ETA (h:mm:ss); a newline when done."""
    rate = done / max(time.time() - start, 1e-9)
    left = round((total - done) / rate) if rate > 0 else 0
    eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    end = "\n" if done >= total else ""
    line = f"\r{what} {done:,.0f}/{total:,.0f}{unit}, {rate:,.2f}{unit}/s, ETA {eta} "
    print(line, end=end, file=sys.stderr, flush=True)

#################################################################################
#                                 Beta schedules                                #
#################################################################################

def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas (float64) for "linear" (DDPM, rescaled to the number of steps) or "cosine" (IDDPM)."""
    T = num_diffusion_timesteps
    if name == "linear":
        scale = 1000 / T
        start = scale * 0.0001
        end = scale * 0.02
        # as numpy's linspace
        betas = start + torch.arange(T, dtype=torch.float64) * ((end - start) / (T - 1))
        betas[-1] = end
        return betas
    if name in ("cosine", "squaredcos_cap_v2"):
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear' or 'cosine'")

def space_timesteps(num_timesteps, section_counts):
    """Timesteps to keep: "250" (evenly spaced), "ddim50" (integer stride), "10,10,5" (sections)."""
    spec = section_counts
    ddim = isinstance(spec, str) and spec.startswith("ddim")
    text = spec[len("ddim"):] if ddim else spec
    try:
        counts = [int(x) for x in text.split(",")] if isinstance(text, str) else list(text)
    except (TypeError, ValueError):
        counts = []
    if not counts or min(counts) < 0 or (ddim and len(counts) > 1):
        raise ValueError(f"bad timestep respacing {spec!r}; use e.g. '250', 'ddim50' or '10,10,5'")
    if sum(counts) == 0:
        raise ValueError(f"timestep respacing {spec!r} keeps no steps; ask for at least 1")
    if ddim:
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[0]:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {counts[0]} DDIM steps out of {num_timesteps} with "
                         f"an integer stride; ask for a count that a stride gives (e.g. 'ddim50')")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            section = f" (section {i + 1} of {len(counts)})" if len(counts) > 1 else ""
            raise ValueError(f"cannot take {count} sampling steps out of {size} training "
                             f"steps{section}; ask for at most {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # round() as Python rounds: half to even
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return set(steps)

#################################################################################
#                         Gaussian log-likelihood helpers                       #
#################################################################################

def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.ndim)))

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))

def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (the tanh form of GELU)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))

def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] discretized to 256 bins under N(means, e^(2 log_scales))."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)

#################################################################################
#                               Gaussian diffusion                              #
#################################################################################

class GaussianDiffusion:
    """Diffusion over `timestep_map`, a subset of the original timesteps (by default all)."""
    # mean_type: "epsilon" or "x_start"; var_type: "learned_range", "fixed_large" or "fixed_small";
    # loss_type: "mse", "rescaled_mse", "kl" or "rescaled_kl"
    def __init__(self, betas, timestep_map=None, mean_type="epsilon", var_type="learned_range",
                 loss_type="mse"):
        if mean_type not in ("epsilon", "x_start"):
            raise ValueError(f"mean_type {mean_type!r} is unsupported; use 'epsilon' or 'x_start'")
        one = torch.ones(1, dtype=torch.float64)
        if timestep_map is not None:
            # respacing: new betas that give the kept steps' alpha_bar exactly
            kept = torch.cumprod(1.0 - betas, dim=0)[timestep_map]
            betas = 1 - kept / torch.cat([one, kept[:-1]])
        self.timestep_map = list(range(len(betas)) if timestep_map is None else timestep_map)
        self.timestep_map_tensor = torch.tensor(self.timestep_map)
        self._device_copies = {}
        self.mean_type = mean_type
        self.var_type = var_type
        self.loss_type = loss_type
        self.num_timesteps = len(betas)
        # All schedules in float64, as the original; _extract casts the picked values to float32.
        self.betas = betas
        self.log_betas = torch.log(betas)
        acp = torch.cumprod(1.0 - betas, dim=0)
        acp_prev = torch.cat([one, acp[:-1]])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1).sqrt()
        pv = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_variance = pv
        # log of the posterior variance, clipped because it is 0 at the start of the chain
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp)
        self.fixed_large_variance = torch.cat([pv[1:2], betas[1:]])
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)

    def _on(self, arr, device):
        """arr on device, copied once: a host-to-device copy per call would stall the GPU."""
        key = (id(arr), str(device))
        if key not in self._device_copies:
            self._device_copies[key] = arr.to(device)
        return self._device_copies[key]

    def _extract(self, arr, t, x):
        """arr[t] as float32, shaped to broadcast against x: (N, 1, 1, 1)."""
        return self._on(arr, t.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def _wrap_model(self, model):
        """Call the model with the original timesteps, which is what it was trained on."""
        def wrapped(x, t, **kwargs):
            return model(x, self._on(self.timestep_map_tensor, t.device)[t].to(t.dtype), **kwargs)
        return wrapped

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        return mean, variance, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None, wrap=True):
        """p(x_{t-1} | x_t): dict of mean, variance, log_variance and pred_xstart."""
        # float32 math even for a model that ran under bf16/fp16 autocast
        out = (self._wrap_model(model) if wrap else model)(x, t, **(model_kwargs or {})).float()
        C = x.shape[1]
        if self.var_type == "learned_range":
            # the model interpolates the log-variance between beta~_t and beta_t
            out, var_values = torch.split(out, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == "fixed_large":
                var, log_var = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            variance = self._extract(var, t, x).expand_as(x)
            log_variance = self._extract(log_var, t, x).expand_as(x)
            # a learned-sigma model sampled with a fixed variance
            if out.shape[1] == 2 * C:
                out = out[:, :C]
        pred_xstart = out
        if self.mean_type != "x_start":
            pred_xstart = self._predict_xstart_from_eps(x, t, out)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    #################################################################################
    #                                    Training                                   #
    #################################################################################

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None,
                      wrap=True):
        """One VLB term in bits per dimension: decoder NLL at t = 0, KL(q || p) elsewhere."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs, wrap=wrap)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Per-sample losses {"loss", "mse", "vb"}: the hybrid objective of Improved DDPM.

        :param model: called as model(x_t, t, **model_kwargs) -> (N, C, ...), or (N, 2C, ...)
                      with learned sigma; t are the original timesteps.
        :param x_start: (N, C, ...) float clean data, e.g. scaled VAE latents.
        :param t: (N,) int64 timestep indices into this diffusion, 0 <= t < num_timesteps.
        :param model_kwargs: extra model arguments, e.g. dict(y=labels); None: none.
        :param noise: (N, C, ...) the Gaussian noise of q_sample; None: drawn with randn_like.
        :return: dict of (N,) float32 tensors: "loss", and "mse" and "vb" for the MSE losses
                 ("vb" only with learned sigma); only "loss" for the KL losses.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                      model_kwargs=model_kwargs)
            return {"loss": loss * (self.num_timesteps if self.loss_type == "rescaled_kl" else 1)}
        # float32 loss math even for a model that ran under bf16/fp16 autocast
        out = self._wrap_model(model)(x_t, t, **(model_kwargs or {})).float()
        terms = {}
        if self.var_type == "learned_range":
            out, var_values = torch.split(out, x_t.shape[1], dim=1)
            # The VLB trains only the variance: the mean goes in detached, the MSE alone trains it.
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_: frozen, x_start, x_t, t,
                                             clip_denoised=False, wrap=False)
            if self.loss_type == "rescaled_mse":
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.mean_type == "x_start" else noise
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    #################################################################################
    #                                    Sampling                                   #
    #################################################################################

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """One ancestral (DDPM) step x_t -> x_{t-1}."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        # drawn at every step, the last included, as the official loop does
        noise = torch.randn_like(x)
        # no noise at t == 0
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        # drawn even when eta == 0, to keep the official random stream
        noise = torch.randn_like(x)
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _start(self, model, shape, noise, device):
        """The device to sample on (given, the model's or the CPU) and the start noise x_T."""
        if device is None:
            device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
        x = noise if noise is not None else torch.randn(*shape, device=device)
        return device, x

    def _loop(self, step, model, shape, noise, device, verbose, **kwargs):
        """Run `step` from t = T-1 down to 0, printing a progress line to stderr if verbose."""
        device, x = self._start(model, shape, noise, device)
        start = time.time()
        for n, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), i, device=device)
            with torch.no_grad():
                x = step(model, x, t, **kwargs)["sample"]
            if verbose:
                print_progress("sampling step", n + 1, self.num_timesteps, start)
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                      device=None, progress=False):
        """
        DDPM sampling: returns x_0 of the given shape.

        :param model: called as model(x_t, t, **model_kwargs), t (N,) int64 original timesteps;
                      e.g. a DiT's forward, or forward_with_cfg with cfg_scale in model_kwargs.
        :param shape: (N, C, H, W) of the samples.
        :param noise: x_T of that shape; None: torch.randn on `device`.
        :param clip_denoised: clamp each predicted x_0 to [-1, 1] (pixels; False for latents).
        :param model_kwargs: extra model arguments, e.g. dict(y=labels, cfg_scale=4.0).
        :param device: where to sample; None: the model's device (the CPU for a plain function).
        :param progress: print a progress line to stderr.
        :return: (N, C, H, W) float32 samples x_0.
        """
        return self._loop(self.p_sample, model, shape, noise, device, progress,
                          clip_denoised=clip_denoised, model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                         device=None, progress=False, eta=0.0):
        """DDIM sampling; arguments as p_sample_loop's; eta: 0 deterministic, 1 DDPM-like."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress,
                          clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta)

    def dpm_solver_timesteps(self, num_steps):
        """The timesteps DPM-Solver++ visits: diffusers' "linspace" spacing, from T - 1 down."""
        T = self.num_timesteps
        if self.timestep_map != list(range(T)):
            raise ValueError("DPM-Solver++ picks its own timesteps out of all training steps; "
                             "build the diffusion with create_diffusion(\"\")")
        if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps={num_steps!r}; DPM-Solver++ takes 1 to {T} (e.g. 20)")
        # numpy.linspace(0, T - 1, num_steps + 1).round(), computed as numpy does (half to even)
        return [round(i * ((T - 1) / num_steps)) for i in range(num_steps, 0, -1)]

    def dpm_solver_sample_loop(self, model, shape, noise=None, num_steps=20, clip_denoised=False,
                               model_kwargs=None, device=None, progress=False):
        """
        DPM-Solver++(2M) sampling in num_steps model calls, as diffusers does; returns x_0.

        Needs the full schedule, create_diffusion(""). The model predicts epsilon or, built with
        predict_xstart=True, x_0; other arguments as p_sample_loop's (clip_denoised clamps x_0).

        :param num_steps: model calls, 1 to num_timesteps; 20 is a good default.
        :return: (N, C, H, W) samples x_0; nothing is random but the start noise.
        """
        timesteps = self.dpm_solver_timesteps(num_steps)
        device, x = self._start(model, shape, noise, device)
        kwargs = model_kwargs or {}
        return self._dpm_solver(model, x, timesteps, clip_denoised, kwargs, device, progress)

    @torch.no_grad()
    def _dpm_solver(self, model, x, timesteps, clip_denoised, model_kwargs, device, verbose):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x at timesteps[0] to sigma = 0."""
        # alpha_s, sigma_s, lambda_s = log(alpha_s) - log(sigma_s) at each step and at the end (0)
        alpha_bar = self.alphas_cumprod[timesteps]
        alpha = torch.cat([alpha_bar.sqrt(), torch.ones(1, dtype=torch.float64)])
        sigma = torch.cat([(1 - alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
        lam = (alpha.log() - sigma.log()).tolist()
        alpha = alpha.tolist()
        sigma = sigma.tolist()
        start = time.time()
        for i, s in enumerate(timesteps):
            t = torch.full((x.shape[0],), s, device=device)
            # the first C channels (a learned-sigma model's variance channels are dropped)
            out = model(x, t, **model_kwargs)[:, : x.shape[1]]
            # DPM-Solver++ integrates the data prediction x0 = (x_s - sigma_s eps) / alpha_s
            x0 = out if self.mean_type == "x_start" else (x - sigma[i] * out) / alpha[i]
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            # h = lambda_t - lambda_s from s to the next timestep t (inf at the end: sigma_t = 0)
            h = lam[i + 1] - lam[i]
            # 2nd order: D = D0 + D1 / 2 with D0 = x0, D1 = (x0 - x0_prev) / r0 and r0 = h_prev / h;
            # 1st order (DPM-Solver-1 = DDIM), D = x0: at the first step, the last (to sigma = 0),
            # and after the timestep that repeats at num_steps = T (h_prev = 0: diffusers gets NaN)
            D = x0
            if 0 < i < len(timesteps) - 1 and lam[i] > lam[i - 1]:
                D1 = (x0 - x0_prev) * (h / (lam[i] - lam[i - 1]))
                D = x0 + 0.5 * D1
            # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * (math.exp(-h) - 1.0)) * D
            x0_prev = x0
            if verbose:
                print_progress("sampling step", i + 1, len(timesteps), start)
        return x

def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000):
    """
    The official factory of GaussianDiffusion.

    :param timestep_respacing: "" or None keeps all steps; "250" (evenly spaced), "ddim50"
                               (an integer stride) or "10,10,5" (counts per section) respace them.
    :param noise_schedule: "linear" (DDPM, DiT's) or "cosine" (IDDPM).
    :param use_kl: train on the VLB alone (rescaled KL) instead of the hybrid loss.
    :param sigma_small: with learn_sigma=False, the posterior variance instead of beta_t.
    :param predict_xstart: the model predicts x_0 instead of epsilon.
    :param learn_sigma: the model also outputs C channels that interpolate the log-variance.
    :param rescale_learned_sigmas: scale the VLB term by num_timesteps / 1000.
    :param diffusion_steps: training steps T.
    :return: a GaussianDiffusion over the kept timesteps.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    loss_type = "rescaled_kl" if use_kl else "rescaled_mse" if rescale_learned_sigmas else "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing))
    var_type = "learned_range" if learn_sigma else "fixed_small" if sigma_small else "fixed_large"
    mean_type = "x_start" if predict_xstart else "epsilon"
    return GaussianDiffusion(betas, kept, mean_type, var_type, loss_type)
