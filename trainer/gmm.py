"""Batched two-component 1-D Gaussian mixtures: one EM for every GT of a batch at once.

PAA fits, per GT, scikit-learn's `GaussianMixture(2, covariance_type="diag")` (weights 0.5/0.5, means at the min
and max loss, precisions 1) and reads `predict` and `score_samples`. One GT at a time that costs about a
millisecond of Python each; here every GT is a row of a padded `[G, K]` matrix and all rows iterate together.

The arithmetic is scikit-learn's own, so the answers agree (see `docs/decisions.md`, "Batched GMM"). Given
float32 losses, scikit-learn works in float64 (its weights and precisions inits are float64) except for one
product: `X * X` is taken in float32, so second moments carry float32 rounding. Near-ties in `predict` and in
the argmax of `score_samples` are decided by exactly that rounding, so it is reproduced here: float64 state,
x^2 rounded to float32, raw moments `E[x^2] - mean^2 + reg_covar`, nk padded by 10 float64 eps, weights
`nk / sum(nk)`. Per row, as scikit-learn: an E-step then an M-step per iteration; stop after the iteration whose
mean log-likelihood (from that iteration's E-step) moved by less than `tol`, keeping that M-step; at most
`max_iter` iterations. `predict` = argmax of the weighted log-probabilities (ties to component 0),
`score_samples` = their logsumexp.

The one deliberate difference: where that arithmetic makes a variance <= 0 (a component collapsed on one loss,
whose float32 square rounded down), scikit-learn raises "ill-defined empirical covariance"; here the variance
becomes `reg_covar` (a needle component), deterministically.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

TOL = 1e-3
REG_COVAR = 1e-6
MAX_ITER = 100
NK_EPS = 10 * torch.finfo(torch.float64).eps  # scikit-learn pads nk with 10 eps of its (float64) resp dtype
LOG_2PI = math.log(2 * math.pi)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _coefficients(mean: Tensor, var: Tensor, weight: Tensor) -> Tensor:
    """`[G, 2, 3]`: per component c, (a, b, q) with log(w_c N(x; mean_c, var_c)) = a + b x + q x^2.

    The precision is squared from 1/sqrt(var), as scikit-learn derives it from its Cholesky factor.
    """
    inv_std = torch.rsqrt(var)
    precision = inv_std * inv_std
    linear = mean * precision
    const = torch.addcmul(torch.log(weight * inv_std) - HALF_LOG_2PI, mean, linear, value=-0.5)
    return torch.stack((const, linear, -0.5 * precision), dim=2)


def _em_steps(features: Tensor, features_t: Tensor, feature_means: Tensor, valid_weight: Tensor, coef: Tensor,
              prev_bound: Tensor, active: Tensor, num_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """`num_steps` EM iterations over all rows; inactive rows (converged or never fitted) do not change.

    features `[G, 3, K]` rows (valid, x, x^2), 0 where padded, so that coef @ features evaluates log-densities
    and resp @ features_t (its transpose, `[G, K, 3]`) gives both components' (nk, sum r x, sum r x^2);
    feature_means `[G, 3]` is features averaged over the valid entries; valid_weight `[G, K]` = valid / count;
    coef `[G, 2, 3]`; prev_bound `[G]` mean log-likelihood of the previous iteration; active `[G, 1, 1]` bool.

    With two components the posteriors are sigmoid(+-d) for the log-odds d = log(w0 N0) - log(w1 N1), and the
    mean log-likelihood of a row is coef[:, 1] . feature_means + mean(softplus(d)), with
    softplus(d) = max(d, 0) - log(max(r0, r1)) exact for any d. The loop is written for few kernel launches:
    at this size the cost is per operation, not per element.
    """
    for _ in range(num_steps):
        # E-step: log-odds and their negation for every entry, posteriors, mean log-likelihood.
        log_odds = torch.bmm(coef - coef.flip(1), features)  # [G, 2, K] = (d, -d)
        resp = torch.sigmoid(log_odds)
        softplus = log_odds[:, 0].clamp_min(0) - torch.log(resp.amax(dim=1))
        bound = torch.linalg.vecdot(coef[:, 1], feature_means) + torch.linalg.vecdot(softplus, valid_weight)
        # M-step, with scikit-learn's raw moments: var = E[x^2] - mean^2 + reg_covar.
        moments = torch.bmm(resp, features_t)  # [G, 2, 3] = (nk, sum r x, sum r x^2)
        nk = moments[:, :, :1] + NK_EPS
        _, mean, mean_sq = (moments / nk).unbind(-1)
        var = torch.addcmul(mean_sq, mean, mean, value=-1.0).add_(REG_COVAR)
        var.masked_fill_(var <= 0, REG_COVAR)  # where scikit-learn raises "ill-defined empirical covariance"
        inv_std = torch.rsqrt(var)  # scikit-learn's precision Cholesky factor; the precision is its square
        precision = inv_std * inv_std
        linear = mean * precision
        log_scale = torch.log((nk / nk.sum(dim=1, keepdim=True)).squeeze(-1) * inv_std)  # log(w / std)
        const = torch.addcmul(log_scale - HALF_LOG_2PI, mean, linear, value=-0.5)
        coef = torch.where(active, torch.stack((const, linear, precision * -0.5), dim=2), coef)
        # Stopping rule: rows whose bound moved less than TOL keep this M-step and freeze.
        active = active & ((bound - prev_bound).abs() >= TOL).view(-1, 1, 1)
        prev_bound = bound
    return coef, prev_bound, active


_compiled_em_steps = None
_compile_failed = False


def _run_em_steps(compile_em: bool, *args):
    """The EM chunk through torch.compile when asked (eager again if compiling fails), else eager."""
    global _compiled_em_steps, _compile_failed
    if compile_em and not _compile_failed:
        try:
            if _compiled_em_steps is None:
                _compiled_em_steps = torch.compile(_em_steps, dynamic=True)
            return _compiled_em_steps(*args)
        except Exception:  # no working compiler on this platform: the chunk is pure, so rerun it eagerly
            _compile_failed = True
    return _em_steps(*args)


def _default_compile() -> bool:
    return os.environ.get("LAD_GMM_COMPILE", "0").lower() not in ("0", "", "false", "no")


def fit_predict_1d(losses: Tensor, valid: Tensor, *, check_every: int = 2, max_iter: int = MAX_ITER,
                   compile_em: bool | None = None) -> tuple[Tensor, Tensor]:
    """Fit one 2-component GMM per row of `losses` `[G, K]` (entries where `valid`), as scikit-learn would.

    Returns `component` `[G, K]` long (0 = the component started at the row's minimum) and `score` `[G, K]`
    float64 (log-likelihood of each entry under its row's mixture). Both are meaningless where not `valid` and
    in rows with fewer than two valid entries (not fitted). Losses are taken as float32, as PAA hands them over.

    Runs on the device of `losses` (devices without float64, such as MPS, fit on the CPU). Every `check_every`
    iterations the host reads which rows still iterate; when a quarter of the working set has stopped, the
    converged rows leave it, since most GTs converge in a few iterations and the slowest take dozens.
    `compile_em` (default: env `LAD_GMM_COMPILE`) fuses iterations with torch.compile, falling back to eager.
    """
    if losses.device.type == "mps":
        component, score = fit_predict_1d(losses.cpu(), valid.cpu(), check_every=check_every, max_iter=max_iter,
                                          compile_em=compile_em)
        return component.to(losses.device), score.to(losses.device, torch.float32)
    num_rows, width = losses.shape
    device, dtype = losses.device, torch.float64
    if num_rows == 0 or width == 0:
        return (torch.zeros(num_rows, width, dtype=torch.long, device=device),
                torch.zeros(num_rows, width, dtype=dtype, device=device))
    valid = valid.to(torch.bool)
    losses32 = torch.where(valid, losses.to(torch.float32), 0.0)
    x = losses32.to(dtype)
    x_sq = (losses32 * losses32).to(dtype)  # the float32 product scikit-learn takes
    count = valid.sum(dim=1)
    valid_f = valid.to(dtype)
    features = torch.stack((valid_f, x, x_sq), dim=1)  # x, x_sq are 0 where padded
    valid_weight = valid_f / count.clamp_min(1).to(dtype)[:, None]
    feature_means = features.sum(dim=2) / count.clamp_min(1).to(dtype)[:, None]

    fitted = count >= 2
    low = torch.where(valid, x, math.inf).amin(dim=1)
    high = torch.where(valid, x, -math.inf).amax(dim=1)
    init_mean = torch.where(fitted[:, None], torch.stack((low, high), dim=1), 0.0)
    ones = torch.ones_like(init_mean)
    coef = _coefficients(init_mean, ones, 0.5 * ones)

    compile_em = _default_compile() if compile_em is None else compile_em
    rows = torch.nonzero(fitted).squeeze(1)  # the working set
    work = [features[rows], features.transpose(1, 2)[rows], feature_means[rows], valid_weight[rows]]
    coef_work = coef[rows]
    prev_bound = torch.full((rows.numel(),), -math.inf, dtype=dtype, device=device)
    active = torch.ones(rows.numel(), 1, 1, dtype=torch.bool, device=device)
    done = 0  # all rows start together, so a row still active has run exactly `done` iterations
    while done < max_iter and rows.numel():
        steps = min(check_every, max_iter - done)
        coef_work, prev_bound, active = _run_em_steps(compile_em, *work, coef_work, prev_bound, active, steps)
        done += steps
        still = torch.nonzero(active.view(-1)).squeeze(1)
        if still.numel() * 4 <= rows.numel() * 3:  # shrink the working set to the rows still iterating
            if 0 < still.numel() < 2:  # keep two rows (a frozen one is harmless): compiled code need not respecialise
                still = torch.cat((still, torch.nonzero(~active.view(-1)).squeeze(1)[:1]))
            coef[rows] = coef_work
            rows, coef_work, prev_bound, active = rows[still], coef_work[still], prev_bound[still], active[still]
            work = [tensor[still] for tensor in work]
    coef[rows] = coef_work

    log_prob = torch.bmm(coef, torch.stack((torch.ones_like(x), x, x_sq), dim=1))  # [G, 2, K]
    component = (log_prob[:, 1] > log_prob[:, 0]).long()  # argmax over the two components, ties to component 0
    return component, torch.logaddexp(log_prob[:, 0], log_prob[:, 1])
