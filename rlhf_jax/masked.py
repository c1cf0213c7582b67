"""The base of the math: shape checks, masks, and masked reductions, whitening and statistics.

``losses.py`` and ``rl.py`` are both built on this module and never import each other.

Conventions: a ``mask`` is True/nonzero on real entries and False/zero on padding. Every reduction
over tokens is masked, and a fully masked input reduces to 0, never NaN. Shapes are checked: an
array of the wrong rank (e.g. values ``[B, T, 1]`` against a ``[B, T]`` mask) raises ``ValueError``
instead of broadcasting.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "check_shapes",
    "check_same_shape",
    "as_bool",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
]


# --------------------------------------------------------------------------------------------
# Shape checks
# --------------------------------------------------------------------------------------------
def check_shapes(fn: str, specs: Sequence[tuple[str, Any, str]]) -> dict[str, int]:
    """Checks ranks and named dimensions of arrays at a public boundary.

    Each spec is ``(argument_name, array, dims)`` where ``dims`` is a string with one letter per
    axis (``"BT"``, ``"BTV"``, ``""`` for a scalar); ``_`` matches any size. A letter seen twice
    must have the same size everywhere.

    Args:
      fn: name of the calling function, used in the error message.
      specs: the arrays to check, in the order their dimensions are bound.

    Returns:
      The bound dimension sizes, e.g. ``{"B": 4, "T": 16}``.

    Raises:
      ValueError: naming the argument, its shape and the expected shape.
    """
    dims: dict[str, int] = {}
    origin: dict[str, str] = {}
    for name, x, spec in specs:
        shape = tuple(jnp.shape(x))
        expected = "[" + ", ".join(spec) + "]"
        if len(shape) != len(spec):
            bound = tuple(dims.get(d, d) for d in spec)
            raise ValueError(f"{fn}: `{name}` has shape {shape} (rank {len(shape)}); expected "
                             f"{expected} (rank {len(spec)}) = {bound}")
        for d, n in zip(spec, shape):
            if d == "_":
                continue
            if d in dims and dims[d] != n:
                bound = tuple(dims.get(e, e) for e in spec)
                raise ValueError(f"{fn}: `{name}` has shape {shape}; expected {expected} = {bound} "
                                 f"({d}={dims[d]} from `{origin[d]}`)")
            if d not in dims:
                dims[d] = n
                origin[d] = name
    return dims


def as_bool(mask: Array) -> Array:
    """A mask as booleans (nonzero = real entry)."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------
def masked_sum(x: Array, mask: Array, axis: int | Sequence[int] | None = None) -> Array:
    """``Σ_i x_i·m_i``; padded entries are excluded with ``where`` (so inf/NaN there cannot leak).

    Args:
      x: array of any shape.
      mask: same shape as ``x``; True/nonzero marks real entries.
      axis: axes to reduce (default all).
    """
    check_same_shape("masked_sum", x, mask)
    return jnp.sum(jnp.where(as_bool(mask), x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | Sequence[int] | None = None) -> Array:
    """Masked mean ``Σ x·m / max(Σ m, 1)``: a fully masked input gives 0, not NaN.

    Args:
      x: array of any shape (e.g. ``[B, T]``).
      mask: same shape as ``x``; True/nonzero marks real entries.
      axis: axes to reduce (default all).
    """
    check_same_shape("masked_mean", x, mask)
    m = as_bool(mask)
    n = jnp.sum(m, axis=axis)
    total = jnp.sum(jnp.where(m, x, 0), axis=axis)
    return total / jnp.maximum(n, 1).astype(total.dtype)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Masked variance over all entries: ``Σ m·(x − μ)² / (n − 1)`` (unbiased) or ``/ n``.

    Fewer than two real entries give 0 (the Bessel factor ``n/(n−1)`` is skipped, the biased
    variance of ≤1 value is 0), so the result is never NaN.

    Args:
      x: array of any shape.
      mask: same shape as ``x``.
      unbiased: apply Bessel's correction.
    """
    check_same_shape("masked_var", x, mask)
    # Zero the padding first: `where` alone would still give NaN gradients for NaN padding.
    x = jnp.where(as_bool(mask), x, 0)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(as_bool(mask)).astype(var.dtype)
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening ``(x − μ) / sqrt(σ² + eps)`` with μ, σ² (unbiased) over real entries only.

    lm-human-preferences whitens advantages over the padded batch; here padding is excluded from the
    statistics and set to 0 in the output. With ``shift_mean=False`` the mean is added back (used
    for rewards: rescale without recentring).

    Args:
      x: array, e.g. advantages ``[B, T]``.
      mask: same shape as ``x``.
      shift_mean: subtract the mean (True) or only rescale (False).
      eps: added to the variance.

    Returns:
      Array shaped like ``x``; 0 on padding (and everywhere if fully masked).
    """
    check_same_shape("masked_whiten", x, mask)
    x = jnp.where(as_bool(mask), x, 0)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(as_bool(mask), out, 0)


def explained_variance(pred: Array, target: Array, mask: Array) -> Array:
    """Explained variance ``1 − Var[target − pred] / Var[target]`` over real entries.

    1 is a perfect value function, 0 no better than a constant, negative worse. When the target has
    zero variance the statistic is undefined and 0 is returned.

    Args:
      pred: predictions, e.g. values ``[B, T]``.
      target: e.g. returns ``[B, T]``.
      mask: ``[B, T]``.
    """
    check_same_shape("explained_variance", pred, mask, "pred")
    check_same_shape("explained_variance", target, mask, "target")
    var_t = masked_var(target, mask, unbiased=False)
    var_e = masked_var(target - pred, mask, unbiased=False)
    return jnp.where(var_t > 0, 1.0 - var_e / jnp.where(var_t > 0, var_t, 1.0), 0.0)


def check_same_shape(fn: str, x: Array, mask: Array, xname: str = "x",
                     mname: str = "mask") -> None:
    """Raises ``ValueError`` unless ``mask`` has exactly the shape of ``x`` (no broadcasting)."""
    if tuple(jnp.shape(x)) != tuple(jnp.shape(mask)):
        raise ValueError(f"{fn}: `{mname}` has shape {tuple(jnp.shape(mask))}; expected the shape "
                         f"of `{xname}` {tuple(jnp.shape(x))} (no broadcasting)")
