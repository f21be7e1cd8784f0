"""Batched two-component 1-D Gaussian mixtures: one EM for every GT of a batch at once.

PAA fits, per GT, scikit-learn's `GaussianMixture(2, covariance_type="diag")` with weights 0.5/0.5, means at the
min and max loss and precisions 1, then reads `predict` and `score_samples`. Doing that one GT at a time costs
about a millisecond of Python per GT; here all GTs are rows of a padded `[G, K]` matrix and iterate together.

What is kept from scikit-learn, so the two agree (see `docs/decisions.md`, "Batched GMM"):
- the initialisation, an E-step then an M-step per iteration, `reg_covar` added to each variance, weights
  `nk / n` renormalised, `nk` padded by 10 float64 eps;
- the stopping rule per GT: stop after the iteration whose mean log-likelihood (computed in that iteration's
  E-step) moved by less than `tol`, keeping the parameters of that iteration's M-step; at most `max_iter`;
- `predict` = argmax of the weighted log-probabilities (ties to component 0), `score_samples` = their logsumexp.

What differs, on purpose:
- each row is shifted by its minimum first. The mixture is translation-equivariant (same responsibilities,
  likelihoods and scores), and float32 moments of the shifted losses lose less to cancellation;
- variances come from second moments about the previous means (not raw `E[x^2] - m^2`), and are floored at
  `reg_covar`: where scikit-learn's arithmetic would make a collapsed variance <= 0 and raise "ill-defined
  empirical covariance", this keeps a needle component of variance `reg_covar` instead, deterministically.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

TOL = 1e-3
REG_COVAR = 1e-6
MAX_ITER = 100
NK_EPS = 10 * torch.finfo(torch.float64).eps  # scikit-learn pads nk with its (float64) resp dtype's eps
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _log_prob(x: Tensor, params: Tensor) -> Tensor:
    """Weighted log-probabilities `[G, K, 2]` of x `[G, K, 1]` under params `[G, 3, 2]` (mean, -0.5/var, const)."""
    diff = x - params[:, 0:1]
    return torch.addcmul(params[:, 2:3], diff * diff, params[:, 1:2])


def _pack(mean: Tensor, var: Tensor, weight: Tensor) -> Tensor:
    """Parameters in the form the E-step reads: mean, -1/(2 var), log w - log(var)/2 - log(2 pi)/2."""
    const = torch.log(weight) - 0.5 * torch.log(var) - HALF_LOG_2PI
    return torch.stack((mean, -0.5 / var, const), dim=1)


def _em_steps(x: Tensor, valid_weight: Tensor, params: Tensor, prev_bound: Tensor, active: Tensor,
              num_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Run `num_steps` EM iterations; rows that are inactive (converged, or never fitted) do not change.

    x `[G, K, 1]` (shifted losses, 0 where padded), valid_weight `[G, K, 1]` (1 on real entries), params
    `[G, 3, 2]`, prev_bound `[G]` (mean log-likelihood of the previous iteration), active `[G]` bool.
    """
    count = valid_weight.sum(dim=(1, 2))
    for _ in range(num_steps):
        # E-step: responsibilities and the mean log-likelihood, under the current parameters.
        log_prob = _log_prob(x, params)
        log_norm = torch.logsumexp(log_prob, dim=-1, keepdim=True)
        resp = torch.exp(log_prob - log_norm) * valid_weight
        bound = (log_norm * valid_weight).sum(dim=(1, 2)) / count
        # M-step, with moments about the previous means: diff = x - old mean.
        diff = x - params[:, 0:1]
        resp_diff = resp * diff
        nk = resp.sum(dim=1) + NK_EPS
        shift = resp_diff.sum(dim=1) / nk
        var = ((resp_diff * diff).sum(dim=1) / nk - shift * shift).clamp_min(0.0) + REG_COVAR
        new_params = _pack(params[:, 0] + shift, var, nk / nk.sum(dim=1, keepdim=True))
        params = torch.where(active[:, None, None], new_params, params)
        # Stopping rule: a row that moved less than TOL keeps this M-step and freezes.
        active = active & ((bound - prev_bound).abs() >= TOL)
        prev_bound = torch.where(active, bound, prev_bound)
    return params, prev_bound, active


_compiled_em_steps = None


def _em_runner(compile_em: bool):
    """The EM chunk, compiled with torch.compile when asked and possible, else eager."""
    global _compiled_em_steps
    if not compile_em:
        return _em_steps
    if _compiled_em_steps is None:
        try:
            _compiled_em_steps = torch.compile(_em_steps, dynamic=True, fullgraph=True)
        except Exception:  # no compiler backend on this platform
            _compiled_em_steps = _em_steps
    return _compiled_em_steps


def _default_compile() -> bool:
    return os.environ.get("LAD_GMM_COMPILE", "0") not in ("0", "", "false", "False")


def fit_predict_1d(losses: Tensor, valid: Tensor, *, check_every: int = 8, max_iter: int = MAX_ITER,
                   compile_em: bool | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Fit one 2-component GMM per row of `losses` `[G, K]` (entries where `valid`), as scikit-learn would.

    Returns `component` `[G, K]` long (0 = the component initialised at the row's minimum) and `score` `[G, K]`
    (log-likelihood of each entry under its row's mixture); both are meaningless where not `valid` and for rows
    with fewer than two valid entries (those are not fitted). Runs on the device of `losses`; the host reads the
    convergence flags once every `check_every` iterations. `compile_em` (default: env `LAD_GMM_COMPILE`) fuses the
    iterations with torch.compile; if compiling fails the eager code runs.
    """
    num_rows, width = losses.shape
    device = losses.device
    if num_rows == 0 or width == 0:
        return (torch.zeros(num_rows, width, dtype=torch.long, device=device),
                torch.zeros(num_rows, width, dtype=dtype, device=device))
    valid = valid.to(torch.bool)
    values = losses.to(dtype)
    low = torch.where(valid, values, torch.full_like(values, math.inf)).amin(dim=1, keepdim=True)
    high = torch.where(valid, values, torch.full_like(values, -math.inf)).amax(dim=1, keepdim=True)
    fitted = valid.sum(dim=1) >= 2
    low = torch.where(fitted[:, None], low, torch.zeros_like(low))
    high = torch.where(fitted[:, None], high, torch.zeros_like(high))
    x = torch.where(valid, values - low, torch.zeros_like(values)).unsqueeze(-1)
    valid_weight = valid.to(dtype).unsqueeze(-1)

    ones = torch.ones(num_rows, 2, dtype=dtype, device=device)
    init_mean = torch.cat((torch.zeros_like(high), high - low), dim=1)
    params = _pack(init_mean, ones, 0.5 * ones)
    prev_bound = torch.full((num_rows,), -math.inf, dtype=dtype, device=device)
    active = fitted.clone()

    run = _em_runner(_default_compile() if compile_em is None else compile_em)
    done = 0  # every row starts together, so a row still active has run exactly `done` iterations
    while done < max_iter and bool(active.any()):
        steps = min(check_every, max_iter - done)
        params, prev_bound, active = run(x, valid_weight, params, prev_bound, active, steps)
        done += steps

    log_prob = _log_prob(x, params)
    component = (log_prob[..., 1] > log_prob[..., 0]).long()
    score = torch.logsumexp(log_prob, dim=-1)
    return component, score
