"""L2-regularised multinomial logistic regression for many small problems at once (the activation probes).

The objective is scikit-learn's `LogisticRegression(penalty="l2", C)` with a multinomial loss (its
`LinearModelLoss`): the mean cross-entropy over the n training rows of the full K-class softmax, plus
||W||^2 / (2 C n), with an unpenalised intercept. It is strictly convex in W, so its minimiser is unique
(the intercept up to a shift shared by all classes, which changes no prediction), and any solver that reaches it
gives scikit-learn's probe. scikit-learn's lbfgs stops once the largest gradient entry is below its `tol`
(1e-4 by default), which can leave a few test predictions off the optimum's; the probes run this solver to a
smaller `tol` (`probes.ProbeSettings`), where Newton's steps are short.

Method: Newton's method with the Newton step from conjugate gradients on the Hessian-vector product
(truncated Newton) and a backtracking (Armijo) line search. Conjugate gradients is preconditioned with the
Hessian's diagonal where the rows are no more than the features (the probes' row-space coordinates), and with
the class blocks of the Hessian, their curvature averaged over the rows, where the rows outnumber the features
(`_Problem.preconditioner`): the weaker relative penalty of a large n would otherwise need ever more steps of
conjugate gradients on correlated features, so the cost grew faster than n.
Every problem of a batch has its own step sizes and stopping test; the arithmetic is batched in numpy:
`B` feature matrices, each shared by `L` labelings (a probe and its control), so one matrix product serves
`L * K` columns. The gradient, the objective and the line search are in float64, so the point where a problem
stops is float64-exact; the Hessian-vector products inside conjugate gradients only shape the search
direction and run in float32 (half the memory traffic, wider SIMD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARMIJO = 1e-4  # sufficient-decrease constant of the line search
FORCING = 0.3  # conjugate gradients stops at this fraction of the gradient's norm
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
    # the intercept is the coefficient of a last feature that is 1 on every training row, with no penalty
    X = np.concatenate([features, rows[:, :, None]], axis=2).astype(np.float64, copy=False)
    XT = np.ascontiguousarray(X.transpose(0, 2, 1))
    penalty = np.append(np.full(r, 1 / C), 0.0)
    weight = rows[:, None, None, :].astype(np.float64)
    problem = _Problem(X, XT, onehot, weight, penalty, covariance_preconditioner=n > r + 1)
    theta = np.zeros((B, L, K, r + 1))
    f, z, P = problem.evaluate(theta)
    converged = np.zeros((B, L), dtype=bool)
    for step in range(max_iter + 1):
        residual = (P - onehot) * weight
        gradient = (residual.reshape(B, L * K, n) @ X).reshape(B, L, K, r + 1) + theta * penalty
        converged = np.abs(gradient).max(axis=(2, 3)) / counts <= tol
        if converged.all() or step == max_iter:
            break
        direction = problem.newton_direction(P, gradient, ~converged)
        theta, f, z, P = problem.line_search(theta, f, z, P, direction, gradient, ~converged)
    return MultinomialFit(theta[..., :r], theta[..., r], converged, step)


class _Problem:
    """The batch's data: X [B, n, m] (features and the intercept's column), onehot, row weights, penalty [m]."""

    def __init__(self, X, XT, onehot, weight, penalty, covariance_preconditioner: bool = False):
        self.X, self.XT, self.onehot, self.weight, self.penalty = X, XT, onehot, weight, penalty
        self.X32, self.XT32 = X.astype(np.float32), XT.astype(np.float32)
        self.weight32, self.penalty32 = weight.astype(np.float32), penalty.astype(np.float32)
        self.eigen = None
        if covariance_preconditioner:
            values, vectors = np.linalg.eigh(XT @ X)  # [B, m], [B, m, m]
            self.eigen = (values.astype(np.float32), vectors.astype(np.float32))
        else:
            self.X32_sq = self.X32 * self.X32

    def preconditioner(self, P32: np.ndarray, Pw: np.ndarray):
        """The map r -> M^-1 r of the conjugate gradients. With fewer features than rows, M_k = a_k X^T X + I / C
        per class, a_k the class's mean curvature p (1 - p) over the training rows: the Hessian's diagonal
        blocks with the curvature averaged over the rows, applied in the eigenbasis of X^T X. It takes the
        correlations between features into account, which the diagonal (Jacobi) preconditioner used otherwise
        does not; those correlations, not the number of rows, then set how many steps conjugate gradients
        takes. Both are symmetric positive definite, as conjugate gradients needs."""
        B, L, K, n = P32.shape
        curvature = Pw * (1 - P32)
        if self.eigen is None:
            m = self.X32.shape[2]
            diagonal = (curvature.reshape(B, L * K, n) @ self.X32_sq).reshape(B, L, K, m) + self.penalty32
            diagonal = np.maximum(diagonal, np.finfo(np.float32).tiny)
            return lambda r: r / diagonal
        values, vectors = self.eigen
        m = values.shape[1]
        mean_curvature = curvature.sum(axis=3) / self.weight32[:, :, 0].sum(axis=2)[:, :, None]  # [B, L, K]
        scale = 1 / (mean_curvature[..., None] * values[:, None, None, :] + self.penalty32.max())
        vectors_t = vectors.transpose(0, 2, 1)

        def apply(r: np.ndarray) -> np.ndarray:
            rotated = (r.reshape(B, L * K, m) @ vectors).reshape(B, L, K, m) * scale
            return (rotated.reshape(B, L * K, m) @ vectors_t).reshape(B, L, K, m)

        return apply

    def evaluate(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Objective [B, L] (sum over rows, so n_b times the mean one), logits and softmax [B, L, K, n]."""
        B, L, K, m = theta.shape
        z = (theta.reshape(B, L * K, m) @ self.XT).reshape(B, L, K, -1)
        P, lse = _softmax_and_logsumexp(z)
        loss = ((lse - (z * self.onehot).sum(axis=2)) * self.weight[:, :, 0]).sum(axis=2)
        return loss + np.einsum("blkm,m->bl", theta * theta, self.penalty) / 2, z, P

    def newton_direction(self, P: np.ndarray, gradient: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Approximate solution of H d = -g per active problem by Jacobi-preconditioned conjugate gradients,
        stopped once the residual is FORCING |g|: Newton then converges linearly, in a few more steps that each
        cost fewer Hessian products than a superlinear forcing's (where it stops is decided on the gradient)."""
        B, L, K, m = gradient.shape
        n = P.shape[3]
        P32 = P.astype(np.float32)
        Pw = P32 * self.weight32
        precondition = self.preconditioner(P32, Pw)
        on = active.copy()
        residual = (-gradient * on[..., None, None]).astype(np.float32)
        x = np.zeros_like(residual)
        z = precondition(residual)
        p = z
        rz = np.einsum("blkm,blkm->bl", residual, z)
        target = FORCING * np.sqrt(np.einsum("blkm,blkm->bl", gradient, gradient))
        for _ in range(K * m):  # conjugate gradients ends within the dimension in exact arithmetic
            Hz = (p.reshape(B, L * K, m) @ self.XT32).reshape(B, L, K, n)
            Hz -= (P32 * Hz).sum(axis=2, keepdims=True)
            Hz *= Pw
            Hp = (Hz.reshape(B, L * K, n) @ self.X32).reshape(B, L, K, m)
            Hp += p * self.penalty32
            curv = np.einsum("blkm,blkm->bl", p, Hp)
            alpha = np.where(on, rz / np.where(on, curv, 1), 0).astype(np.float32)[..., None, None]
            x += alpha * p
            residual -= alpha * Hp
            on &= np.sqrt(np.einsum("blkm,blkm->bl", residual, residual)) > target
            if not on.any():
                break
            z = precondition(residual)
            rz_next = np.einsum("blkm,blkm->bl", residual, z)
            beta = np.where(on, rz_next / np.where(on, rz, 1), 0).astype(np.float32)[..., None, None]
            rz = rz_next
            p = z + beta * p
        return x.astype(np.float64)

    def line_search(self, theta, f, z, P, direction, gradient, active):
        """Per problem, the first of the steps 1, 1/2, 1/4, ... along `direction` with sufficient decrease."""
        slope = np.einsum("blkm,blkm->bl", gradient, direction)
        t = np.ones(slope.shape)
        pending = active.copy()
        new_theta, new_f, new_z, new_P = theta.copy(), f.copy(), z.copy(), P.copy()
        for _ in range(MAX_HALVINGS):
            trial = theta + t[..., None, None] * direction
            trial_f, trial_z, trial_P = self.evaluate(trial)
            ok = pending & (trial_f <= f + ARMIJO * t * slope)
            new_theta[ok], new_f[ok], new_z[ok], new_P[ok] = trial[ok], trial_f[ok], trial_z[ok], trial_P[ok]
            pending &= ~ok
            if not pending.any():
                break
            t = np.where(pending, t / 2, t)
        return new_theta, new_f, new_z, new_P
