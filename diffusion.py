"""
Gaussian diffusion for DiT, numerically the same as the official release (itself from ADM / IDDPM):
beta schedules, q_sample, the hybrid loss (MSE on epsilon + VLB for the learned variance), timestep
respacing, and DDPM / DDIM sampling loops that draw random numbers exactly as the official ones.
"""
import math
import sys
import time

import torch

#################################################################################
#                                 Beta schedules                                #
#################################################################################

def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas (float64) for "linear" (DDPM, rescaled to the number of steps) or "cosine" (IDDPM)."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        start, end, T = scale * 0.0001, scale * 0.02, num_diffusion_timesteps
        betas = start + torch.arange(T, dtype=torch.float64) * ((end - start) / (T - 1))  # as numpy's linspace
        betas[-1] = end
        return betas
    if name in ("cosine", "squaredcos_cap_v2"):
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        T = num_diffusion_timesteps
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps, section_counts):
    """The original timesteps to keep: "250" (evenly spaced), "ddim50" (integer stride), "10,10,5" (per section)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} DDIM steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]  # round() as Python rounds: half to even
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
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (the tanh form of GELU)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data x in [-1, 1] discretized to 256 bins under N(means, e^(2 log_scales))."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))

#################################################################################
#                               Gaussian diffusion                              #
#################################################################################

class GaussianDiffusion:
    """Diffusion over the timesteps `timestep_map` (a subset of the original ones, all of them by default).
    mean_type: "epsilon" or "x_start"; var_type: "learned_range", "fixed_large" or "fixed_small";
    loss_type: "mse", "rescaled_mse", "kl" or "rescaled_kl"."""
    def __init__(self, betas, timestep_map=None, mean_type="epsilon", var_type="learned_range", loss_type="mse"):
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if timestep_map is not None:  # respacing: new betas that give the kept steps' alpha_bar exactly
            kept = alphas_cumprod[timestep_map]
            betas = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        self.timestep_map_tensor = torch.tensor(self.timestep_map)
        self._device_copies = {}
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.num_timesteps = len(betas)
        # All schedules in float64, as the original; _extract casts the picked values to float32.
        self.betas, self.log_betas = betas, torch.log(betas)
        self.alphas_cumprod = acp = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1).sqrt()
        self.posterior_variance = pv = betas * (1.0 - acp_prev) / (1.0 - acp)
        # log of the posterior variance, clipped because it is 0 at the start of the chain
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp)
        self.fixed_large_variance = torch.cat([pv[1:2], betas[1:]])
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)

    def _on(self, arr, device):
        """arr on device, copied once: a host-to-device copy per call would stall the GPU at every step."""
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
        mean = self._extract(self.posterior_mean_coef1, t, x_t) * x_start + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._extract(self.posterior_variance, t, x_t), self._extract(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None, wrap=True):
        """p(x_{t-1} | x_t): dict of mean, variance, log_variance and pred_xstart from the model's output."""
        out = (self._wrap_model(model) if wrap else model)(x, t, **(model_kwargs or {}))
        C = x.shape[1]
        if self.var_type == "learned_range":  # the model interpolates the log-variance between beta~_t and beta_t
            out, var_values = torch.split(out, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            large = self.var_type == "fixed_large"
            var = self.fixed_large_variance if large else self.posterior_variance
            log_var = self.fixed_large_log_variance if large else self.posterior_log_variance_clipped
            variance, log_variance = self._extract(var, t, x).expand_as(x), self._extract(log_var, t, x).expand_as(x)
            if out.shape[1] == 2 * C:  # a learned-sigma model sampled with a fixed variance
                out = out[:, :C]
        pred_xstart = out if self.mean_type == "x_start" else self._predict_xstart_from_eps(x, t, out)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    #################################################################################
    #                                    Training                                   #
    #################################################################################

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, wrap=True):
        """One VLB term in bits per dimension: decoder NLL at t = 0, KL(q || p) elsewhere."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs, wrap=wrap)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses {"loss", "mse", "vb"}: the hybrid objective of Improved DDPM used by DiT."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            return {"loss": loss * (self.num_timesteps if self.loss_type == "rescaled_kl" else 1)}
        out = self._wrap_model(model)(x_t, t, **(model_kwargs or {}))
        terms = {}
        if self.var_type == "learned_range":
            out, var_values = torch.split(out, x_t.shape[1], dim=1)
            # The VLB trains only the variance: the mean goes in detached, so the MSE alone trains it.
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_: frozen, x_start, x_t, t, clip_denoised=False, wrap=False)
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
        noise = torch.randn_like(x)  # drawn at every step, the last included, as the official loop does
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        return {"sample": out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar, alpha_bar_prev = self._extract(self.alphas_cumprod, t, x), self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)  # drawn even when eta == 0, to keep the official random stream
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, device, progress, **kwargs):
        """Run `step` from t = T-1 down to 0, printing progress and an ETA to stderr if asked."""
        if device is None:
            device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
        x = noise if noise is not None else torch.randn(*shape, device=device)
        t0 = time.time()
        for n, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), i, device=device)
            with torch.no_grad():
                x = step(model, x, t, **kwargs)["sample"]
            if progress:
                eta = (time.time() - t0) / (n + 1) * (self.num_timesteps - n - 1)
                print(f"\rsampling step {n + 1}/{self.num_timesteps}, ETA {eta:.0f}s ", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None, progress=False):
        """DDPM sampling: returns x_0 of the given shape, starting from `noise` (or fresh noise)."""
        return self._loop(self.p_sample, model, shape, noise, device, progress,
                          clip_denoised=clip_denoised, model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
                         progress=False, eta=0.0):
        """DDIM sampling: returns x_0 of the given shape."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress,
                          clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000):
    """The official factory: "" keeps all steps; "250", "ddim50" or "10,10,5" respaces them for sampling."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    loss_type = "rescaled_kl" if use_kl else "rescaled_mse" if rescale_learned_sigmas else "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing))
    var_type = "learned_range" if learn_sigma else "fixed_small" if sigma_small else "fixed_large"
    return GaussianDiffusion(betas, kept, "x_start" if predict_xstart else "epsilon", var_type, loss_type)
