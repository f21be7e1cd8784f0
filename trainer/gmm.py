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
`MAX_ITER` iterations. `predict` = argmax of the weighted log-probabilities (ties to component 0),
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
LARGE_WORKING_SET = 32  # rows
NK_EPS = 10 * torch.finfo(torch.float64).eps  # scikit-learn pads nk with 10 eps of its (float64) resp dtype
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _coefficients(moments: Tensor, nk_eps: Tensor, reg_covar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """scikit-learn's M-step from the moments `[3, 2, G, 1]` (sum r, sum r x, sum r x^2 of each component), as
    the coefficients (a, b, p), each `[2, G, 1]`, of log(w N(x; mean, var)) + log(2 pi)/2 = a + b x - p x^2/2.

    Raw moments `E[x^2] - mean^2 + reg_covar`, nk padded by 10 float64 eps, weights nk / sum(nk), the precision
    squared from 1/sqrt(var) as scikit-learn derives it from its Cholesky factor. The constant -log(2 pi)/2, the
    same for both components, is added back to the final score only: it changes neither the posteriors nor the
    change of the mean log-likelihood. nk_eps and reg_covar are 0-d tensors (cheaper operands than floats).
    """
    nk = moments.select(0, 0) + nk_eps
    mean = moments.select(0, 1) / nk
    var = torch.addcmul(moments.select(0, 2) / nk, mean, mean, value=-1.0).add_(reg_covar)
    var.masked_fill_(var <= 0, reg_covar)  # where scikit-learn raises "ill-defined empirical covariance"
    inv_std = torch.rsqrt(var)
    precision = inv_std * inv_std
    linear = mean * precision
    const = torch.addcmul(torch.log(nk / nk.sum(dim=0) * inv_std), mean, linear, value=-0.5)
    return const, linear, precision


def _em_steps(x: Tensor, neg_half_x_sq: Tensor, moment_features: Tensor, valid_weight: Tensor, coef: tuple,
              moments: Tensor, prev_bound: Tensor, active: Tensor, constants: tuple, num_steps: int):
    """`num_steps` EM iterations over the working rows; rows no longer `active` keep their moments.

    Component first: x, neg_half_x_sq `[G, K]` (0 where padded); moment_features `[3, 1, G, K]` = (valid, x, x^2),
    0 where padded, so that the padding drops out of the moments; valid_weight `[G, K]` = valid / count; coef the
    (a, b, p) `[2, G, 1]` that the next E-step uses; moments `[3, 2, G, 1]`; prev_bound `[G, 1]` the previous
    mean log-likelihood; active `[G, 1]`; constants the 0-d tensors (nk_eps, reg_covar, tol).

    Written for few operations per iteration (about 30 elementwise ops and short reductions; a batched matmul of
    these shapes costs several times more): at these sizes the cost is per operation, not per element. A frozen
    row recomputes its parameters from its frozen moments, which gives the same values again.
    """
    const, linear, precision = coef
    nk_eps, reg_covar, tol = constants
    for _ in range(num_steps):
        # E-step: both components' log-densities, their log-sum, responsibilities (in place), mean log-likelihood.
        log_prob = torch.addcmul(const, linear, x).addcmul_(precision, neg_half_x_sq)  # [2, G, K]
        log_norm = torch.logaddexp(*log_prob.unbind(0))  # [G, K]
        resp = log_prob.sub_(log_norm).exp_()
        bound = (log_norm * valid_weight).sum(dim=1, keepdim=True)
        # M-step: rows that stopped keep the moments of the iteration they stopped at.
        moments = torch.where(active, (resp * moment_features).sum(dim=3, keepdim=True), moments)
        const, linear, precision = _coefficients(moments, nk_eps, reg_covar)
        # Stopping rule: rows whose bound moved less than TOL keep this M-step and freeze.
        active = ((bound - prev_bound).abs_() >= tol).logical_and_(active)
        prev_bound = bound
    return (const, linear, precision), moments, prev_bound, active


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


def fit_predict_1d(losses: Tensor, valid: Tensor, *, check_every: int | None = None,
                   compile_em: bool | None = None) -> tuple[Tensor, Tensor]:
    """Fit one 2-component GMM per row of `losses` `[G, K]` (entries where `valid`), as scikit-learn would.

    Returns `component` `[G, K]` long (0 = the component started at the row's minimum) and `score` `[G, K]`
    float64 (log-likelihood of each entry under its row's mixture). Both are meaningless where not `valid` and
    in rows with fewer than two valid entries (not fitted). Losses are taken as float32, as PAA hands them over.

    Runs on the device of `losses` (devices without float64, such as MPS, fit on the CPU). Every `check_every`
    iterations (default: 2 on the CPU, after every iteration while 32 rows or more iterate; 8 on an accelerator
    or compiled) the host reads which rows still iterate, and once a quarter of the working set has stopped the
    converged rows leave it: most GTs converge in 3 iterations, the slowest take dozens. `compile_em` (default:
    env `LAD_GMM_COMPILE=1`) runs the iterations through torch.compile, falling back to eager if compiling
    fails; the first call then compiles for tens of seconds.
    """
    if losses.device.type == "mps":
        component, score = fit_predict_1d(losses.cpu(), valid.cpu(), check_every=check_every, compile_em=compile_em)
        return component.to(losses.device), score.to(losses.device, torch.float32)
    with torch.inference_mode():  # no autograd bookkeeping: about a tenth less per operation
        component, score = _fit_predict(losses, valid, check_every, compile_em)
    return component.clone(), score.clone()  # ordinary tensors again, for callers that modify them


def _fit_predict(losses: Tensor, valid: Tensor, check_every: int | None,
                 compile_em: bool | None) -> tuple[Tensor, Tensor]:
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
    # one tensor, so that shrinking the working set is one indexing: (valid, x, x^2, -x^2/2, valid/count) `[5, G, K]`
    data = torch.stack((valid_f, x, x_sq, -0.5 * x_sq, valid_f / count.clamp_min(1).to(dtype)[:, None]))
    constants = tuple(torch.tensor(value, dtype=dtype, device=device) for value in (NK_EPS, REG_COVAR, TOL))

    fitted = count >= 2
    low = torch.where(valid, x, math.inf).amin(dim=1)
    high = torch.where(valid, x, -math.inf).amax(dim=1)
    # scikit-learn's start (weights 0.5, means at min and max, precisions 1) as _coefficients would write it
    init_mean = torch.where(fitted, torch.stack((low, high)), 0.0)[:, :, None]  # [2, G, 1]
    ones = torch.ones_like(init_mean)
    coef = (torch.addcmul(torch.log(0.5 * ones), init_mean, init_mean, value=-0.5), init_mean, ones)
    moments = torch.zeros(3, 2, num_rows, 1, dtype=dtype, device=device)  # rows not fitted stay at 0 (finite)

    if compile_em is None:
        compile_em = os.environ.get("LAD_GMM_COMPILE", "0").lower() not in ("0", "", "false", "no")
    # On the CPU an iteration costs in proportion to the working set, so check often and shrink it early; on an
    # accelerator, or compiled, an iteration costs a fixed launch overhead and a check is a synchronisation.
    shrink_early = device.type == "cpu" and not compile_em
    if check_every is None:
        check_every = 2 if shrink_early else 8
    rows = torch.nonzero(fitted).squeeze(1)  # the working set
    work = data[:, rows]
    coef_work = tuple(c[:, rows] for c in coef)
    moments_work = moments[:, :, rows]
    prev_bound = torch.full((rows.numel(), 1), -math.inf, dtype=dtype, device=device)
    active = torch.ones(rows.numel(), 1, dtype=torch.bool, device=device)
    done = 0  # all rows start together, so a row still active has run exactly `done` iterations
    while done < MAX_ITER and rows.numel():
        # a large working set is checked after every iteration: an iteration there costs more than a check
        steps = min(1 if shrink_early and rows.numel() >= LARGE_WORKING_SET else check_every, MAX_ITER - done)
        views = (work[1], work[3], work[0:3, None], work[4])
        coef_work, moments_work, prev_bound, active = _run_em_steps(compile_em, *views, coef_work, moments_work,
                                                                    prev_bound, active, constants, steps)
        done += steps
        still = torch.nonzero(active.view(-1)).squeeze(1)
        if still.numel() * 4 <= rows.numel() * 3:  # shrink the working set to the rows still iterating
            if 0 < still.numel() < 2:  # keep two rows (a frozen one is harmless): compiled code need not respecialise
                still = torch.cat((still, torch.nonzero(~active.view(-1)).squeeze(1)[:1]))
            moments[:, :, rows] = moments_work
            rows, work, moments_work, prev_bound, active = (rows[still], work[:, still], moments_work[:, :, still],
                                                            prev_bound[still], active[still])
            coef_work = tuple(c[:, still] for c in coef_work)
    moments[:, :, rows] = moments_work

    const, linear, precision = _coefficients(moments, *constants[:2])
    log_prob = torch.addcmul(const, linear, x).addcmul_(precision, -0.5 * x_sq)  # [2, G, K]
    component = (log_prob[1] > log_prob[0]).long()  # argmax over the two components, ties to component 0
    return component, torch.logaddexp(log_prob[0], log_prob[1]) - HALF_LOG_2PI
