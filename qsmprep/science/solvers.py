"""Iterative solvers shared by the stages."""
import numpy as np


def conjugate_gradient(apply_operator, rhs, iterations, tolerance, precondition=None, start=None):
    """Solve A x = rhs for a symmetric positive (semi-)definite A given as ``apply_operator``.

    ``precondition`` applies an approximate inverse of A. Stops after ``iterations`` or when
    the residual falls below ``tolerance`` times the norm of ``rhs``; starts from ``start``
    (0 when not given).
    """
    precondition = precondition or (lambda r: r)
    if start is None:
        x = np.zeros_like(rhs)
        residual = rhs.astype(np.float32)
    else:
        x = start.astype(np.float32)
        residual = (rhs - apply_operator(x)).astype(np.float32)
    preconditioned = precondition(residual)
    direction = preconditioned.copy()
    rz = float(np.vdot(residual, preconditioned))
    rhs_norm = max(float(np.linalg.norm(rhs)), 1e-30)
    for _ in range(iterations):
        a_direction = apply_operator(direction)
        step = rz / max(float(np.vdot(direction, a_direction)), 1e-30)
        x += step * direction
        residual -= step * a_direction
        if np.linalg.norm(residual) / rhs_norm < tolerance:
            break
        preconditioned = precondition(residual)
        rz_next = float(np.vdot(residual, preconditioned))
        direction = preconditioned + (rz_next / rz) * direction
        rz = rz_next
    return x
