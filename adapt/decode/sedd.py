"""SEDD samplers for the absorbing graph (Lou et al. 2024, Algorithm 2 and 3): Euler (tau-leaping,
eq. 17) and analytic (Tweedie tau-leaping, eq. 19), driven by a masked-diffusion denoiser.

At a masked position the concrete score is s(x_t)_y = e^{-sigma_bar} / (1 - e^{-sigma_bar}) * p_theta(x0=y | x_t)
(DESIGN.md), and the forward process masks a token at rate sigma(t) = d sigma_bar / dt. Unmasked
positions never change (the absorbing graph only leaves MASK), so only masked ones need a rule:

Euler (eq. 17): the reverse rate MASK -> y is sigma(t) * s_y, so over a step of length dt
    p(y) = dt * sigma(t) * s_y,  p(MASK) = 1 - dt * sigma(t) * e^{-sigma_bar} / (1 - e^{-sigma_bar})
(clamped to [0, 1], Algorithm 2). Reveal with that total probability, draw y from p_theta.

Analytic (eq. 19) from sigma_bar(t) to sigma_bar(s), with exp(sigma Q) for the absorbing Q:
    p(y) = p_theta(y) * (e^{-sigma_bar(s)} - e^{-sigma_bar(t)}) / (1 - e^{-sigma_bar(t)}),
    p(MASK) = (1 - e^{-sigma_bar(s)}) / (1 - e^{-sigma_bar(t)}),
which is also the exact posterior q(x_s | x_t, x0 ~ p_theta). tests/test_sampling_math.py checks
it against eq. 19 computed with a dense matrix exponential.

With log-linear noise both reduce to MDLM's (t - s) / t. Time runs on t_k = 1 - k / steps; the
last step is SEDD's final denoising step (every position still masked is drawn from p_theta),
so `steps` counts it and at most `steps` model calls are made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapt.objectives.diffusion import absorbing_score_scale, geometric_sigma_bar, loglinear_sigma_bar
from adapt.decode.categorical import TokenFilter
from adapt.decode.loop import Step, Trace, bernoulli, denoise_loop

NOISES = ("loglinear", "geometric")


@dataclass(frozen=True)
class Noise:
    """SEDD total noise sigma_bar(t) and its rate sigma(t), for t in [0, 1]."""

    kind: str = "loglinear"
    """loglinear: sigma_bar = -log(1 - (1 - eps) t); geometric: sigma_min^(1-t) sigma_max^t."""
    eps: float = 1e-3
    """loglinear only: masking probability at t = 1 is 1 - eps."""
    sigma_min: float = 1e-4
    """geometric only: sigma_bar(0)."""
    sigma_max: float = 20.0
    """geometric only: sigma_bar(1)."""

    def __post_init__(self) -> None:
        if self.kind not in NOISES:
            raise ValueError(f"unknown noise {self.kind!r}; use one of {', '.join(NOISES)}")
        if not 0 < self.eps < 1 or not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"bad noise parameters: eps={self.eps} (need 0 < eps < 1), "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max} (need 0 < min < max)")

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "loglinear":
            return loglinear_sigma_bar(t, self.eps)
        return geometric_sigma_bar(t, self.sigma_min, self.sigma_max)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = d sigma_bar / dt."""
        if self.kind == "loglinear":
            return (1 - self.eps) / (1 - (1 - self.eps) * t)
        return self.sigma_bar(t) * math.log(self.sigma_max / self.sigma_min)


def analytic_reveal_prob(noise: Noise, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - p(MASK) of eq. 19 from t to s < t: (e^{-sb(s)} - e^{-sb(t)}) / (1 - e^{-sb(t)})."""
    sb_t, sb_s = noise.sigma_bar(t), noise.sigma_bar(s)
    # e^{-sb(s)} (1 - e^{-(sb(t) - sb(s))}) / (1 - e^{-sb(t)}), in expm1 form for small sigma_bar
    return torch.exp(-sb_s) * -torch.expm1(-(sb_t - sb_s)) / -torch.expm1(-sb_t)


def euler_reveal_prob(noise: Noise, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Total reveal probability of eq. 17 from t to s: (t - s) sigma(t) e^{-sb} / (1 - e^{-sb}), clamped to [0, 1]."""
    return ((t - s) * noise.rate(t) * absorbing_score_scale(noise.sigma_bar(t))).clamp(0.0, 1.0)


def _proposer(noise: Noise, rule):
    def propose(step: Step) -> torch.Tensor:
        if step.index == step.steps - 1:
            return step.masked  # final denoising step: reveal everything left
        t = torch.tensor(1.0 - step.index / step.steps, dtype=torch.float64)
        s = torch.tensor(1.0 - (step.index + 1) / step.steps, dtype=torch.float64)
        return bernoulli(float(rule(noise, t, s)), step.masked, step.generator)
    return propose


def _run(rule, denoiser, x, steps, generator, noise, eps, sigma_min, sigma_max, temperature, top_k, top_p,
         cache, active, trace) -> torch.Tensor:
    noise_ = Noise(noise, eps, sigma_min, sigma_max)
    filt = TokenFilter(temperature, top_k, top_p)
    return denoise_loop(denoiser, x, steps, _proposer(noise_, rule), generator, filt, active, trace, cache)


@torch.no_grad()
def euler_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                 noise: str = "loglinear", eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cache: bool = True,
                 active: torch.Tensor | None = None, trace: Trace | None = None) -> torch.Tensor:
    """SEDD Euler (tau-leaping) sampling of the mask positions of x (B, L) long -> (B, L) long."""
    return _run(euler_reveal_prob, denoiser, x, steps, generator, noise, eps, sigma_min, sigma_max,
                temperature, top_k, top_p, cache, active, trace)


@torch.no_grad()
def analytic_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                    noise: str = "loglinear", eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cache: bool = True,
                    active: torch.Tensor | None = None, trace: Trace | None = None) -> torch.Tensor:
    """SEDD analytic (Tweedie tau-leaping) sampling of the mask positions of x (B, L) long -> (B, L) long."""
    return _run(analytic_reveal_prob, denoiser, x, steps, generator, noise, eps, sigma_min, sigma_max,
                temperature, top_k, top_p, cache, active, trace)
