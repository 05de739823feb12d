"""L2-regularised multinomial logistic regression for many small problems at once (the activation probes).

The objective is scikit-learn's `LogisticRegression(penalty="l2", C)` with a multinomial loss (its
`LinearModelLoss`): the mean cross-entropy over the n training rows of the full K-class softmax, plus
||W||^2 / (2 C n), with an unpenalised intercept. It is strictly convex in W, so its minimiser is unique
(the intercept up to a shift shared by all classes, which changes no prediction), and any solver that reaches it
gives scikit-learn's probe. scikit-learn's lbfgs stops once the largest gradient entry is below its `tol`,
which can leave a few test predictions off the optimum; this solver goes further (see `fit_multinomial`).

Method: Newton's method with the Newton step from conjugate gradients on the Hessian-vector product
(truncated Newton), preconditioned with the Hessian's diagonal, and a backtracking (Armijo) line search.
Every problem of a batch has its own step sizes and stopping test; the arithmetic is batched in numpy:
`B` feature matrices, each shared by `L` labelings (a probe and its control), so one matrix product serves
`L * K` columns. The gradient, the objective and the line search are in float64, so the point where a problem
stops is float64-exact; the Hessian-vector products inside conjugate gradients only shape the search
direction and run in float32 (twice the BLAS throughput on half the memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_HALVINGS = 40


@dataclass(frozen=True)
class MultinomialFit:
    coef: np.ndarray  # [B, L, K, r]
    intercept: np.ndarray  # [B, L, K]
    converged: np.ndarray  # [B, L] bool: the largest gradient entry reached tol within max_iter Newton steps
    n_iter: int  # Newton steps of the slowest problem

    def decision(self, b: int, features: np.ndarray) -> np.ndarray:
        """Logits [L, K, m] of the m rows `features` [m, r] under problem `b`'s L fits."""
        r = features.shape[1]
        return self.coef[b, :, :, :r] @ features.T + self.intercept[b, :, :, None]


def _softmax_and_logsumexp(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = z.max(axis=2, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(axis=2, keepdims=True)
    return e / total, np.log(total[:, :, 0]) + top[:, :, 0]


def fit_multinomial(
    features: np.ndarray, onehot: np.ndarray, rows: np.ndarray, C: float, tol: float, max_iter: int
) -> MultinomialFit:
    """Minimise, for every b < B and l < L, the mean over the rows with rows[b] = 1 of the cross-entropy of
    softmax(features[b] W + c) against onehot[b, l], plus ||W||^2 / (2 C n_b).

    features [B, n, r] float64 (padding rows and columns zero); onehot [B, L, K, n] (zero on padding rows);
    rows [B, n] 1 for a training row, 0 for padding. A problem stops when the largest entry of its gradient
    (of that mean objective, as scikit-learn's `tol`) is <= tol.
    """
    B, n, r = features.shape
    L, K = onehot.shape[1:3]
    counts = rows.sum(axis=1)[:, None]
    X = np.ascontiguousarray(features, dtype=np.float64)
    XT = np.ascontiguousarray(X.transpose(0, 2, 1))
    X32, XT32 = X.astype(np.float32), XT.astype(np.float32)
    X32_sq = X32 * X32
    weight = rows[:, None, None, :].astype(np.float64)
    weight32 = weight.astype(np.float32)
    W = np.zeros((B, L, K, r))
    c = np.zeros((B, L, K))

    def logits(W: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (W.reshape(B, L * K, r) @ XT).reshape(B, L, K, n) + c[..., None]

    def objective(z: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P, lse = _softmax_and_logsumexp(z)
        loss = ((lse - (z * onehot).sum(axis=2)) * rows[:, None, :]).sum(axis=2)
        return loss + (W * W).sum(axis=(2, 3)) / (2 * C), P

    z = logits(W, c)
    f, P = objective(z, W)
    converged = np.zeros((B, L), dtype=bool)
    for step in range(max_iter + 1):
        residual = (P - onehot) * weight
        gW = (residual.reshape(B, L * K, n) @ X).reshape(B, L, K, r) + W / C
        gc = residual.sum(axis=3)
        largest = np.maximum(np.abs(gW).max(axis=(2, 3)), np.abs(gc).max(axis=2)) / counts
        converged = largest <= tol
        if converged.all() or step == max_iter:
            break
        dW, dc = _newton_direction(X32, XT32, X32_sq, weight32, P, gW, gc, ~converged, C)
        W, c, f, z, P = _line_search(W, c, f, z, P, dW, dc, gW, gc, ~converged, logits, objective)
    return MultinomialFit(W, c, converged, step)


def _newton_direction(X32, XT32, X32_sq, weight32, P, gW, gc, active, C):
    """Approximate solution of H d = -g per active problem by Jacobi-preconditioned conjugate gradients,
    stopped at the forcing tolerance min(0.5, sqrt|g|) |g| (superlinear convergence of the Newton steps)."""
    B, L, K, r = gW.shape
    n = P.shape[3]
    P32 = P.astype(np.float32)
    Pw = P32 * weight32
    curvature = Pw * (1 - P32)
    diag_W = (curvature.reshape(B, L * K, n) @ X32_sq).reshape(B, L, K, r) + np.float32(1 / C)
    diag_c = curvature.sum(axis=3) + np.float32(np.finfo(np.float32).tiny)
    on = active.copy()
    rW = (-gW * on[..., None, None]).astype(np.float32)
    rc = (-gc * on[..., None]).astype(np.float32)
    xW, xc = np.zeros_like(rW), np.zeros_like(rc)
    zW, zc = rW / diag_W, rc / diag_c
    pW, pc = zW, zc
    rz = (rW * zW).sum(axis=(2, 3)) + (rc * zc).sum(axis=2)
    norm_g = np.sqrt((gW**2).sum(axis=(2, 3)) + (gc**2).sum(axis=2))
    target = (np.minimum(0.5, np.sqrt(norm_g)) * norm_g).astype(np.float32)
    for _ in range(K * (r + 1)):  # conjugate gradients ends within the dimension in exact arithmetic
        dz = (pW.reshape(B, L * K, r) @ XT32).reshape(B, L, K, n) + pc[..., None]
        Hz = dz - (P32 * dz).sum(axis=2, keepdims=True)
        Hz *= Pw
        HW = (Hz.reshape(B, L * K, n) @ X32).reshape(B, L, K, r) + pW / np.float32(C)
        Hc = Hz.sum(axis=3)
        curv = (pW * HW).sum(axis=(2, 3)) + (pc * Hc).sum(axis=2)
        alpha = np.where(on, rz / np.where(on, curv, 1), 0).astype(np.float32)
        xW += alpha[..., None, None] * pW
        xc += alpha[..., None] * pc
        rW -= alpha[..., None, None] * HW
        rc -= alpha[..., None] * Hc
        on &= np.sqrt((rW * rW).sum(axis=(2, 3)) + (rc * rc).sum(axis=2)) > target
        if not on.any():
            break
        zW, zc = rW / diag_W, rc / diag_c
        rz_next = (rW * zW).sum(axis=(2, 3)) + (rc * zc).sum(axis=2)
        beta = np.where(on, rz_next / np.where(on, rz, 1), 0).astype(np.float32)
        rz = rz_next
        pW = zW + beta[..., None, None] * pW
        pc = zc + beta[..., None] * pc
    return xW.astype(np.float64), xc.astype(np.float64)


def _line_search(W, c, f, z, P, dW, dc, gW, gc, active, logits, objective):
    """Per problem, the first of the steps 1, 1/2, 1/4, ... along (dW, dc) with sufficient decrease."""
    slope = (gW * dW).sum(axis=(2, 3)) + (gc * dc).sum(axis=2)
    t = np.ones(slope.shape)
    pending = active.copy()
    W, c, f, z, P = W.copy(), c.copy(), f.copy(), z.copy(), P.copy()
    W0, c0, f0 = W.copy(), c.copy(), f.copy()
    for _ in range(MAX_HALVINGS):
        tW = W0 + t[..., None, None] * dW
        tc = c0 + t[..., None] * dc
        tz = logits(tW, tc)
        tf, tP = objective(tz, tW)
        ok = pending & (tf <= f0 + ARMIJO * t * slope)
        W[ok], c[ok], f[ok], z[ok], P[ok] = tW[ok], tc[ok], tf[ok], tz[ok], tP[ok]
        pending &= ~ok
        if not pending.any():
            break
        t = np.where(pending, t / 2, t)
    return W, c, f, z, P
