"""A party's model delta as an aggregation input, and the aggregate back as a server update.

Both aggregation paths sum the same per-party vector of length ``d + 1 + e``::

    [ w_i * clip_C(delta_i),  w_i,  b_i,  w_i * min(loss_i, L) / L,  c_i,  v_i ]

* ``clip_C`` bounds the L2 norm by C: at the party, before secure aggregation (the
  sensitivity that differential privacy needs, and the range that quantisation needs).
  Clipping is never silent: the caller counts it.
* ``w_i``: without privacy, FedAvg's example weight ``min(n_i, W) / W`` with the public cap
  ``W`` (default: the largest party's count, which makes the weighting exact); with
  user-level DP every party weighs 1 and the server divides by the *expected* number of
  parties (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models", the fixed-denominator estimator), so one party changes the sum by at most C.
* ``b_i`` (only with adaptive clipping): +1/2 if ``||delta_i|| <= C`` else -1/2 (Andrew et
  al. 2021, "Differentially Private Learning with Adaptive Clipping").
* host statistics (only with ``stats``, i.e. without DP): the party's training loss weighted
  by ``w_i`` and clamped to the public bound ``L`` (:data:`LOSS_BOUND`), divided by ``L`` so
  the coordinate lies in [0, 1]; and ``c_i`` = 1 if its delta was clipped, else 0. Their sums
  give the round's training loss (``L * sum / sum w_i``: FedAvg's example-weighted mean when
  ``W`` is the largest party's count) and the number of clipped parties, so the
  coordinator and driver see only totals, never one party's (or one host's) loss, example
  count or clip flag. The example count needs no coordinate of its own: ``W * sum w_i``.
  Under DP they are not appended: released unnoised they would be exact statistics of party
  data outside the accountant, and noised they would enlarge the sensitivity.
* ``v_i`` (only with ``eval_classes``: federated evaluation, never under DP, which the
  config refuses for the same reason): the party's evaluation vector of the global model on
  its held-out rows (:mod:`lepton_ray.learning.fed_eval`, zeros for a party that does not
  evaluate this round): ``[min(loss_sum_i, E L) / (E L), correct_i, examples_i, TP_i (C),
  FP_i (C), FN_i (C)]`` with ``E`` the public bound on a party's held-out rows. The loss sum
  is scaled into [0, 1] and quantised like the other coordinates; the counts are *integers
  carried as ring units* (not multiplied by the scale, not rounded), so the ring sum of the
  counts is exact (:func:`encode_ring_batch`, :func:`ring_to_float`), and they need their
  own overflow check (:meth:`UpdateRule.check_count_room`) instead of a share of the norm.

Secure aggregation only reveals sums, so this is what makes FedAvg, DP-FedAvg and adaptive
clipping work through SecAgg+. The vector's norm, counts aside, is at most
``sqrt(C^2 + 1 + b/4 + 2s + v)`` (``b``: the clip bit, ``s``: the two statistics, ``v``: the
evaluation loss), the bound the quantiser's overflow check uses: every extra coordinate that
is scaled lies in [-1/2, 1/2] or [0, 1].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from lepton_ray.errors import DataError
from lepton_ray.secagg.quantize import (
    ClipResult,
    QuantizationSpec,
    clip_l2,
    dequantize,
    require_no_overflow,
)


LOSS_BOUND = 64.0
"""Public bound L (nats) a party's training loss is clamped to before it enters the sum: it
keeps the loss coordinate in [0, 1], so the quantiser's norm bound holds whatever the data.
Cross-entropy at a random start is log(classes) (< 10 for any realistic task); a loss above
64 nats means training diverged, and the clamp only biases the reported mean of such a round."""


@dataclass(frozen=True)
class UpdateRule:
    clip_norm: float | None  # None: no clipping (plaintext path without privacy only)
    weight_cap: float | None = None  # None: every party weighs 1 (user-level DP)
    clip_bit: bool = False  # append the adaptive-clipping bit
    stats: bool = False  # append the loss and clip-flag coordinates (never under DP)
    loss_bound: float = LOSS_BOUND
    eval_classes: int = 0  # > 0: append a federated-evaluation block for this many classes
    eval_rows: int = 0  # public bound E on one party's held-out rows (scales the loss sum)

    @property
    def eval_width(self) -> int:
        from lepton_ray.learning.fed_eval import stats_width

        return stats_width(self.eval_classes) if self.eval_classes else 0

    @property
    def extras(self) -> int:
        return (1 if self.clip_bit else 0) + (2 if self.stats else 0) + self.eval_width

    def stats_at(self, dim: int) -> int:
        """Index of the loss coordinate (the clip flag follows it)."""
        return dim + 1 + (1 if self.clip_bit else 0)

    def eval_at(self, dim: int) -> int:
        """Index of the evaluation block's first (loss) coordinate."""
        return self.stats_at(dim) + (2 if self.stats else 0)

    def count_columns(self, dim: int) -> slice:
        """The evaluation counts: integers carried as ring units (exact sums)."""
        a = self.eval_at(dim)
        return slice(a + 1, a + self.eval_width) if self.eval_classes else slice(a, a)

    @property
    def norm_bound(self) -> float:
        if self.clip_norm is None:
            raise ValueError("an unclipped update has no norm bound (secure aggregation needs one)")
        return math.sqrt(self.clip_norm**2 + 1.0 + (0.25 if self.clip_bit else 0.0)
                         + (2.0 if self.stats else 0.0) + (1.0 if self.eval_classes else 0.0))

    def check_count_room(self, n_parties: int, modulus_bits: int) -> None:
        """The evaluation counts of ``n_parties`` (each at most ``eval_rows``) must sum below
        2^(b-1) (``ConfigError`` otherwise): they are exact integers in the ring."""
        from lepton_ray.errors import ConfigError

        if self.eval_classes and n_parties * max(self.eval_rows, 1) >= 2 ** (modulus_bits - 1):
            raise ConfigError([f"evaluation.federated: {n_parties} parties x {self.eval_rows} "
                               f"held-out rows overflow the {modulus_bits}-bit ring's counts; "
                               "use secure_aggregation.modulus_bits 64"])

    def eval_coordinates(self, evals) -> np.ndarray:
        """The parties' evaluation vectors ``(k, 3 + 3C)`` as coordinates: the loss sum
        clamped to [0, E L] (non-finite: E L) and divided by E L; the counts as they are."""
        v = np.array(evals, dtype=np.float64, ndmin=2)
        if v.shape[1] != self.eval_width:
            raise ValueError(f"evaluation vectors have {v.shape[1]} entries, the rule needs "
                             f"{self.eval_width}")
        top = self.loss_bound * max(self.eval_rows, 1)
        loss = np.nan_to_num(v[:, 0], nan=top, posinf=top, neginf=0.0)
        v[:, 0] = np.clip(loss, 0.0, top) / top
        return v

    def _need_evals(self, evals):
        if self.eval_classes and evals is None:
            raise ValueError("an UpdateRule with eval_classes needs the parties' evaluation vectors")

    def loss_coordinate(self, losses, weights) -> np.ndarray:
        """``w_i * clamp(loss_i, 0, L) / L`` (a non-finite loss counts as L)."""
        v = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=self.loss_bound,
                          posinf=self.loss_bound, neginf=0.0)
        return np.asarray(weights, dtype=np.float64) * np.clip(v, 0.0, self.loss_bound) / self.loss_bound

    def _need_losses(self, losses):
        if self.stats and losses is None:
            raise ValueError("an UpdateRule with stats needs the parties' losses")

    def width(self, dim: int) -> int:
        return dim + 1 + self.extras


def encode_float(delta: np.ndarray, examples: int, rule: UpdateRule,
                 loss: float | None = None, evals: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """The party's vector (float64, length ``d + 1 + e``) and whether its delta was clipped.
    ``loss``: its training loss (needed when ``rule.stats``); ``evals``: its evaluation
    vector (needed when ``rule.eval_classes``; zeros when it does not evaluate)."""
    rule._need_losses(loss)
    rule._need_evals(evals)
    clipped = _clip(delta, rule.clip_norm)
    w = 1.0 if rule.weight_cap is None else min(float(examples), rule.weight_cap) / rule.weight_cap
    out = np.empty(rule.width(len(clipped.vector)), dtype=np.float64)
    d = len(clipped.vector)
    np.multiply(clipped.vector, w, out=out[:d])
    out[d] = w
    if rule.clip_bit:
        out[d + 1] = 0.5 if rule.clip_norm is None or clipped.norm <= rule.clip_norm else -0.5
    if rule.stats:
        out[rule.stats_at(d)] = rule.loss_coordinate([loss], [w])[0]
        out[rule.stats_at(d) + 1] = 1.0 if clipped.clipped else 0.0
    if rule.eval_classes:
        out[rule.eval_at(d):] = rule.eval_coordinates(evals)[0]
    return out, clipped.clipped


def _clip(delta: np.ndarray, clip_norm: float | None) -> ClipResult:
    if clip_norm is not None:
        return clip_l2(delta, clip_norm)
    v = np.asarray(delta, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise DataError(f"update has a non-finite value {v[bad]} at index {bad}")
    return ClipResult(v, float(np.linalg.norm(v)), False)


def fold(deltas: np.ndarray, examples: np.ndarray, rule: UpdateRule,
         losses: np.ndarray | None = None, evals: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Local accumulation on a host (plaintext path): the sum of the parties' vectors (the
    same as summing :func:`encode_float` of each, in one matrix product), and how many were
    clipped (for the host's own use: what leaves the host is the sum, in which the count
    travels as a coordinate when ``rule.stats``). ``evals``: the parties' evaluation vectors
    (``rule.eval_classes``)."""
    rule._need_losses(losses)
    rule._need_evals(evals)
    deltas = np.asarray(deltas)
    k, d = deltas.shape
    if not np.isfinite(deltas).all():
        row, col = map(int, np.argwhere(~np.isfinite(deltas))[0])
        raise DataError(f"update of party {row} (of {k}) has a non-finite value {deltas[row, col]} "
                        f"at index {col}")
    norms = np.sqrt(np.einsum("ij,ij->i", deltas, deltas, dtype=np.float64))
    if rule.clip_norm is None:
        factor, clipped = np.ones(k), np.zeros(k, dtype=bool)
    else:
        clipped = norms > rule.clip_norm
        factor = np.where(clipped, rule.clip_norm / np.maximum(norms, 1e-300), 1.0)
    n = np.asarray(examples, dtype=np.float64)
    w = np.ones(k) if rule.weight_cap is None else np.minimum(n, rule.weight_cap) / rule.weight_cap
    total = np.zeros(rule.width(d), dtype=np.float64)
    for b in range(0, k, 256):  # float64 accumulation without a (k, d) float64 copy
        total[:d] += (w[b : b + 256] * factor[b : b + 256]) @ deltas[b : b + 256].astype(np.float64)
    total[d] = w.sum()
    if rule.clip_bit:
        total[d + 1] = np.where(~clipped, 0.5, -0.5).sum()
    if rule.stats:
        total[rule.stats_at(d)] = rule.loss_coordinate(losses, w).sum()
        total[rule.stats_at(d) + 1] = float(clipped.sum())
    if rule.eval_classes and k:
        total[rule.eval_at(d):] = rule.eval_coordinates(evals).sum(axis=0)
    return total, int(clipped.sum())


@dataclass(frozen=True, eq=False)
class EncodedBatch:
    """A host's parties encoded for secure aggregation in one pass (:func:`encode_ring_batch`)."""

    rings: np.ndarray  # (k, width) ring elements; rows of parties in ``bad`` are zero
    clipped: np.ndarray  # (k,) bool: the delta's norm exceeded the clip norm
    bad: tuple[int, ...]  # rows whose delta had a non-finite value (training diverged)


_CHUNK = 1 << 16  # elements per fused pass: a few cache-resident float64 blocks


ROUNDING_BETA = math.exp(-8.0)
"""Per-attempt failure probability allowed by the conditional-rounding bound of the central
path (:func:`rounding_bound_sq`): the bound is only 4 (c + sqrt(d)/2) above KLS21's mean
c^2 + d/4 (c = C s, a relative increase of ~2/c), and a retry is needed about once in 10^5."""

MAX_ROUNDING_ATTEMPTS = 200


def rounding_bound_sq(rule: UpdateRule, quant: QuantizationSpec, dim: int) -> int:
    """floor(B^2): the squared L2 norm, in ring units, that conditional stochastic rounding
    guarantees for a party's delta block (Kairouz, Liu and Steinke 2021, "The Distributed
    Discrete Gaussian Mechanism", conditional randomized rounding; the same bound as
    :mod:`lepton_ray.privacy.skellam`, with c = C s and n = d, at :data:`ROUNDING_BETA`).
    Under DP this - not C s - is the sensitivity the noise is calibrated to."""
    from lepton_ray.privacy.skellam import rounded_norm_bound_sq

    if rule.clip_norm is None:
        raise ValueError("an unclipped update has no rounding bound")
    return rounded_norm_bound_sq(rule.clip_norm * quant.scale, dim, ROUNDING_BETA)


def encode_ring_batch(deltas: np.ndarray, examples: np.ndarray, rule: UpdateRule,
                      quant: QuantizationSpec, *, key: bytes | None = None,
                      out: np.ndarray | None = None, norm_bound_sq: int | None = None,
                      losses: np.ndarray | None = None,
                      evals: np.ndarray | None = None) -> EncodedBatch:
    """The rows of ``deltas`` as secure-aggregation inputs, all at once: each party's
    :func:`encode_float` vector ``[w_i clip_C(delta_i), w_i, b_i]`` scaled and stochastically
    rounded into Z_{2^b}.

    Rounding is ``round(x + u)`` with ``u = r / 2^32 in [-1/2, 1/2)``, ``r`` a uniform signed
    32-bit word from AES-256-CTR keyed by HKDF(key) (``key=None``: 32 OS bytes), which is
    ``floor(x + u + 1/2)``: P(round up) = frac(x) up to 2^-32 and the float resolution of x,
    so the rounding is unbiased (Gupta et al. 2015, "Deep Learning with Limited Numerical
    Precision", §3). round() is one float add of 1.5 * 2^52, after which the low word of the
    float's bits is the integer mod 2^32 (|x| < 2^31 in Z_2^32 by the overflow check; the
    64-bit ring, whose values may pass 2^51, takes floor and a cast instead).
    Work goes in cache-sized chunks (the rounding keystream too, read piece by piece): four
    passes over the vectors instead of a dozen passes over float64 copies per party.
    ``out``: a (k, width) ring array to write into (a host reuses one across rounds: a
    fresh 200 MB array costs ~50,000 page faults every round).

    ``norm_bound_sq`` (under DP: :func:`rounding_bound_sq`): *conditional* rounding. A row
    whose rounded delta block has squared norm above it is rounded again with fresh OS
    randomness until it fits (KLS21), so the bound holds deterministically and is the L2
    sensitivity of one party in ring units; without it the rounded norm may reach
    C s + sqrt(d) (+15 % at n = 5000, d = 1e7, C = 0.1). The check is one extra pass over
    the chunk (exact integers in float64; a sum within 1e-9 of the bound is redone in
    Python integers). A row that fails :data:`MAX_ROUNDING_ATTEMPTS` times (probability
    < 1e-700) is zeroed and reported in ``bad``: it sends nothing.

    ``losses``: the parties' training losses (needed when ``rule.stats``: the loss and
    clip-flag coordinates). ``evals``: the parties' evaluation vectors (needed when
    ``rule.eval_classes``): the loss coordinate is scaled and rounded like the others; the
    counts are written into the ring as the integers they are (exact, no rounding), after
    any re-rounding."""
    rule._need_losses(losses)
    rule._need_evals(evals)
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key
    from lepton_ray.crypto.prg import KeystreamReader, ring_dtype

    deltas = np.asarray(deltas)
    k, d = deltas.shape
    width = rule.width(d)
    norms = np.sqrt(np.einsum("ij,ij->i", deltas, deltas, dtype=np.float64))
    finite = np.isfinite(norms)  # a NaN/inf anywhere in a row makes its norm non-finite
    safe = np.where(finite, norms, 0.0)
    if rule.clip_norm is None:
        clipped, factor = np.zeros(k, dtype=bool), np.ones(k)
    else:
        clipped = safe > rule.clip_norm
        factor = np.where(clipped, rule.clip_norm / np.maximum(safe, 1e-300), 1.0)
    n = np.asarray(examples, dtype=np.float64)
    w = np.ones(k) if rule.weight_cap is None else np.minimum(n, rule.weight_cap) / rule.weight_cap
    coef = np.where(finite, w * factor * quant.scale, 0.0)
    tail = np.zeros((k, width - d))
    tail[:, 0] = w * quant.scale
    if rule.clip_bit:
        tail[:, 1] = np.where(clipped, -0.5, 0.5) * quant.scale
    if rule.stats:
        tail[:, rule.stats_at(d) - d] = rule.loss_coordinate(losses, w) * quant.scale
        tail[:, rule.stats_at(d) + 1 - d] = np.where(clipped, 1.0, 0.0) * quant.scale
    counts = None
    if rule.eval_classes:
        ev = rule.eval_coordinates(evals)
        tail[:, rule.eval_at(d) - d] = ev[:, 0] * quant.scale
        counts = ev[:, 1:]
        if not np.array_equal(counts, np.rint(counts)) or counts.min(initial=0) < 0:
            raise DataError("evaluation counts must be non-negative integers")
    tail[~finite] = 0.0
    wide = quant.modulus_bits == 64
    ring = ring_dtype(quant.modulus_bits)
    if out is None:
        rings = np.empty((k, width), dtype=ring)
    elif out.shape != (k, width) or out.dtype != ring or not out.flags.c_contiguous:
        raise DataError(f"out must be a contiguous {ring} array of shape ({k}, {width}), got "
                        f"{out.dtype} {out.shape}")
    else:
        rings = out
    rows = max(1, _CHUNK // width)
    stream = KeystreamReader(derive_key(os.urandom(32) if key is None else key,
                                        KeyPurpose.STOCHASTIC_ROUNDING), 4 * rows * width)
    x = np.empty((min(rows, k), width), dtype=np.float64)
    retry: list[int] = []
    for a in range(0, k, rows):
        b = min(k, a + rows)
        xs = x[: b - a]
        np.multiply(deltas[a:b], coef[a:b, None], out=xs[:, :d], casting="unsafe")
        xs[:, d:] = tail[a:b]
        bad = ~finite[a:b]
        if bad.any():  # 0 * inf is NaN: zero the whole row of a diverged party
            xs[bad] = 0.0
        words = stream.read(4 * (b - a) * width).view("<i4").reshape(b - a, width)
        xs += words * 2.0**-32
        _round_into(xs, rings[a:b], wide)
        if norm_bound_sq is not None:
            if not wide:
                xs -= _ROUND_MAGIC  # the rounded integers, exactly, as float64
            sq = np.einsum("ij,ij->i", xs[:, :d], xs[:, :d])
            over = sq > norm_bound_sq * (1 - 1e-9)
            for j in np.flatnonzero(over):
                if not _fits(xs[j, :d], norm_bound_sq):
                    retry.append(a + int(j))
    failed = []
    for i in retry:
        if not _reround(i, deltas, coef, tail, rings, d, wide, norm_bound_sq):
            rings[i] = 0
            failed.append(i)
    bad_rows = sorted(set(np.flatnonzero(~finite).tolist()) | set(failed))
    if counts is not None:  # exact integers as ring units (two's complement of a count >= 0)
        good = np.setdiff1d(np.arange(k), bad_rows)
        rings[good, rule.count_columns(d)] = counts[good].astype(np.int64).astype(ring)
    return EncodedBatch(rings=rings, clipped=clipped & finite,
                        bad=tuple(int(i) for i in bad_rows))


def _round_into(xs: np.ndarray, rings: np.ndarray, wide: bool) -> None:
    """round(xs) (xs already holds x + u) into ``rings``; xs is left holding floor(x + u + 1/2)
    (64-bit ring) or that plus :data:`_ROUND_MAGIC` (32-bit ring)."""
    if wide:  # |x| may exceed 2^51 here: floor and a checked cast instead of the magic add
        xs += 0.5
        np.floor(xs, out=xs)
        rings[:] = xs.astype(np.int64).view(np.uint64)
    else:
        xs += _ROUND_MAGIC
        rings[:] = xs.view("<u4")[..., ::2]  # the low word: the integer mod 2^32


def _fits(rounded: np.ndarray, norm_bound_sq: int) -> bool:
    """Exact ||rounded||^2 <= norm_bound_sq for a float64 vector of integers."""
    sq = float(np.dot(rounded, rounded))
    if sq <= norm_bound_sq * (1 - 1e-9):
        return True
    if sq > norm_bound_sq * (1 + 1e-9):
        return False
    return sum(int(v) * int(v) for v in rounded.tolist()) <= norm_bound_sq


def _reround(i: int, deltas, coef, tail, rings, d: int, wide: bool, norm_bound_sq: int) -> bool:
    """Conditional rounding of row ``i`` again, fresh OS randomness each attempt."""
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key
    from lepton_ray.crypto.prg import keystream

    width = rings.shape[1]
    base = np.empty((1, width), dtype=np.float64)
    np.multiply(deltas[i], coef[i], out=base[0, :d], casting="unsafe")
    base[0, d:] = tail[i]
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        words = np.frombuffer(keystream(derive_key(os.urandom(32), KeyPurpose.STOCHASTIC_ROUNDING),
                                        4 * width), dtype="<i4")
        xs = base + words * 2.0**-32
        _round_into(xs, rings[i : i + 1], wide)
        if not wide:
            xs -= _ROUND_MAGIC
        if _fits(xs[0, :d], norm_bound_sq):
            return True
    return False


_ROUND_MAGIC = 1.5 * 2.0**52  # x + this rounds x to an integer held in the low mantissa bits


def quantization_for(*, n_parties: int, rule: UpdateRule, modulus_bits: int, dim: int,
                     scale: float | None = None) -> QuantizationSpec:
    """The round's quantisation: the automatic scale for ``n_parties`` vectors of norm at most
    ``rule.norm_bound``, or ``scale`` checked against overflow (``ConfigError`` if n
    parties could overflow Z_{2^b})."""
    norm = rule.norm_bound
    if scale is None:
        return QuantizationSpec.automatic(n_parties=n_parties, clip_norm=norm, modulus_bits=modulus_bits)
    require_no_overflow(n_parties, norm, scale, modulus_bits, rule.width(dim))
    return QuantizationSpec(clip_norm=norm, scale=scale, modulus_bits=modulus_bits)


def ring_to_float(total: np.ndarray, quant: QuantizationSpec,
                  rule: UpdateRule | None = None) -> np.ndarray:
    """The float sum from a ring sum: every coordinate divided by the scale, except a
    ``rule``'s evaluation counts, which were summed as the integers they are."""
    out = dequantize(total, quant)
    if rule is not None and rule.eval_classes:
        from lepton_ray.secagg.quantize import centred_lift

        cols = rule.count_columns(len(total) - rule.extras - 1)
        out[cols] = centred_lift(total[cols], quant.modulus_bits).astype(np.float64)
    return out


@dataclass(frozen=True, eq=False)
class Aggregate:
    """A summed (and, with central DP, noised) vector split into its parts."""

    weighted: np.ndarray  # sum of w_i clip(delta_i)
    weight: float  # sum of w_i
    clip_bits: float | None  # sum of b_i (adaptive clipping)
    loss_sum: float | None = None  # sum of w_i * clamp(loss_i, 0, L) (rule.stats)
    clipped: float | None = None  # number of clipped parties (rule.stats)
    # the summed evaluation vector in fed_eval's layout (rule.eval_classes): loss sum, counts
    evaluation: np.ndarray | None = None

    @classmethod
    def split(cls, total: np.ndarray, dim: int, rule: UpdateRule) -> Aggregate:
        stats = {}
        if rule.stats:
            a = rule.stats_at(dim)
            stats = {"loss_sum": float(total[a]) * rule.loss_bound,
                     "clipped": float(total[a + 1])}
        if rule.eval_classes:
            a = rule.eval_at(dim)
            ev = np.array(total[a: a + rule.eval_width], dtype=np.float64)
            ev[0] *= rule.loss_bound * max(rule.eval_rows, 1)
            ev[1:] = np.rint(ev[1:])  # exact integers already (ring units); rint drops -0.0
            stats["evaluation"] = ev
        return cls(weighted=total[:dim], weight=float(total[dim]),
                   clip_bits=float(total[dim + 1]) if rule.clip_bit else None, **stats)

    @property
    def mean_loss(self) -> float:
        """The weighted mean training loss of the parties in the sum (NaN without stats)."""
        if self.loss_sum is None or self.weight <= 0:
            return float("nan")
        return self.loss_sum / self.weight

    @property
    def clipped_count(self) -> int | None:
        """The number of clipped parties, rounded (quantisation noise is far below 1/2)."""
        return None if self.clipped is None else int(round(self.clipped))


@dataclass(frozen=True)
class SecureRoundPlan:
    """What every host and the coordinator share about one secure round: the SecAgg+ round
    config (roster, graph, threshold, ring), the update rule and the quantisation."""

    config: object  # lepton_ray.secagg.RoundConfig
    rule: UpdateRule
    quantization: QuantizationSpec | None  # None with distributed DP (Skellam encodes)
    skellam: object = None  # lepton_ray.privacy.skellam.SkellamParams (distributed DP)
    rotation_seed: bytes = b""  # public per-round seed of the Skellam rotation
    rounding_bound_sq: int | None = None  # central DP: conditional rounding's bound (ring units)

    def rotation_signs(self):
        from lepton_ray.privacy.rotation import rotation_signs

        return rotation_signs(self.rotation_seed, self.skellam.dim, self.config.round)
