"""Binary codes: tanh outputs -> bits (`>= 0`) -> packed uint8 rows.

`sign(0) = 0` would corrupt Hamming distances, so a code bit is 1 exactly when the tanh
output is >= 0. Packing is numpy's big-endian `packbits`: bit j of a code is bit 7 - j % 8
of byte j // 8. K must be a positive multiple of 8 so that no code is silently padded.
"""

from __future__ import annotations

import numpy as np

from adalabelhash.errors import UserError


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise UserError(f"code length must be a positive multiple of 8 bits, got {bits!r}")
    return int(bits)


def binarize(codes) -> np.ndarray:
    """Real-valued codes (n, K) (numpy or torch) -> {0, 1} uint8 bits (n, K)."""
    if hasattr(codes, "detach"):
        codes = codes.detach().float().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise UserError(f"codes must be a 2-D array (n, bits), got shape {codes.shape}")
    return (codes >= 0).astype(np.uint8)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """{0, 1} bits (n, K) -> packed uint8 (n, K / 8)."""
    bits = np.asarray(bits)
    check_bits(bits.shape[1])
    return np.packbits(bits.astype(np.uint8, copy=False), axis=1)


def unpack_bits(packed: np.ndarray) -> np.ndarray:
    """Packed uint8 (n, K / 8) -> {0, 1} uint8 bits (n, K)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1)


def pack_codes(codes) -> np.ndarray:
    """Real-valued codes (n, K) -> packed uint8 (n, K / 8)."""
    return pack_bits(binarize(codes))


def asymmetric_distances(real_codes, packed) -> np.ndarray:
    """Distance of real-valued codes (nq, K) in [-1, 1] (tanh outputs) to packed bit codes (n, K/8):
    sum_j |q_j - s_j| / 2 with s = +-1 the bits, i.e. (K - q.s) / 2 -> float32 (nq, n).

    It equals the Hamming distance when q is itself +-1 and splits Hamming ties by how sure the
    query is of each bit, without a float database (asymmetric: only the query is real-valued)."""
    real = np.asarray(real_codes, dtype=np.float32)
    signs = unpack_bits(packed).astype(np.float32) * 2 - 1
    if real.ndim != 2 or real.shape[1] != signs.shape[1]:
        raise UserError(f"real codes of shape {real.shape} do not fit {signs.shape[1]}-bit codes")
    return (np.float32(signs.shape[1]) - real @ signs.T) / 2
