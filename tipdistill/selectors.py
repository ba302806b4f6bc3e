"""[4b] Token selectors: map per-token stats to a keep mask over the response positions.

A selector is one registered object (`SELECTORS[name]`, a `Selector`) that owns its score rule
(`score_B_T`, also written to the token dumps) and its selection (`select`), so adding one is one class
here plus one YAML file in conf/selector/. `select(stats, keep, cfg, generator) -> keep_mask_B_T` (bool
[B, T]) never keeps a position outside `stats.mask_B_T`. Counts: with `cfg.granularity == "per_sequence"`
each rollout with m > 0 valid tokens keeps k = max(1, floor(keep * m)); with "per_batch" the whole batch
keeps max(1, floor(keep * M)), ranked jointly. Ties go to the earlier position (row-major for per_batch),
via stable sorts, so runs reproduce. Randomness comes only from `generator` (the caller seeds it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tipdistill.registry import Registry
from tipdistill.scoring import normalise
from tipdistill.types import TokenStats

if TYPE_CHECKING:  # annotations only: config.py imports this module to check selector names
    from tipdistill.config import SelectorConfig

SELECTORS = Registry("selector", "selector.name")


# --- counting and ranking ---------------------------------------------------------------------------------


def keep_counts(mask_R_C: torch.Tensor, keep: float) -> torch.Tensor:
    """k per row, long [R]: max(1, floor(keep * m)) for rows with m > 0 valid entries, else 0.

    The 1e-9 guards floor() against binary representation (0.29 * 100 = 28.999...): keep is a decimal
    with few digits, so a true fractional part is far larger than that.
    """
    m_R = mask_R_C.sum(1)
    k_R = torch.floor(keep * m_R.double() + 1e-9).long().clamp(min=1)
    return torch.where(m_R > 0, torch.minimum(k_R, m_R), 0)


def _rows(x_B_T: torch.Tensor, granularity: str) -> torch.Tensor:
    """View as the rows selection runs over: [B, T] per sequence, [1, B*T] per batch."""
    if granularity == "per_sequence":
        return x_B_T
    if granularity == "per_batch":
        return x_B_T.reshape(1, -1)
    raise ValueError(f"unknown selector granularity '{granularity}' (per_sequence | per_batch)")


def take_top(keys: list[torch.Tensor], mask_B_T: torch.Tensor, keep: float, granularity: str) -> torch.Tensor:
    """Keep the first k valid positions of each row in descending lexicographic order of `keys`.

    `keys` are [B, T] tensors, least significant first; position (earlier first) breaks remaining ties.
    This is an LSD sort: stable-sort by each key in turn, then by validity, so a valid token whose
    key is -inf or NaN still ranks above every masked position. Returns bool [B, T].
    """
    mask_R_C = _rows(mask_B_T, granularity)
    R, C = mask_R_C.shape
    order_R_C = torch.arange(C, device=mask_B_T.device).expand(R, C)
    for key_B_T in [*keys, mask_B_T.float()]:
        key_R_C = _rows(key_B_T, granularity).float()
        key_R_C = torch.where(torch.isnan(key_R_C), -math.inf, key_R_C)  # NaN ranks last, not first
        perm_R_C = torch.sort(key_R_C.gather(1, order_R_C), dim=1, descending=True, stable=True).indices
        order_R_C = order_R_C.gather(1, perm_R_C)
    rank_R_C = torch.arange(C, device=mask_B_T.device).expand(R, C)
    take_R_C = rank_R_C < keep_counts(mask_R_C, keep)[:, None]  # the first k in sorted order
    keep_R_C = torch.zeros_like(mask_R_C, dtype=torch.bool).scatter(1, order_R_C, take_R_C)
    return keep_R_C.reshape(mask_B_T.shape) & mask_B_T


def _uniform_B_T(stats: TokenStats, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) per position drawn from `generator` (on its own device, then moved to the stats')."""
    u_B_T = torch.rand(stats.mask_B_T.shape, generator=generator, device=generator.device)
    return u_B_T.to(stats.mask_B_T.device).clamp(min=torch.finfo(torch.float32).tiny)


# --- the selectors ----------------------------------------------------------------------------------------


class Selector:
    """Base: no score (NaN at valid tokens) and top-k by score. Subclasses override `rule`, `select`, or both."""

    name = ""
    bottom = False  # keep the lowest-scored tokens instead of the highest
    ignores_keep = False  # True: trains on every valid token whatever `keep` says
    reads: frozenset = frozenset()  # the statistics `rule`/`select` read (h, rkl, fkl): the statistics pass computes only
    # these and what the metrics need (scoring.METRIC_STATS), so fkl is computed only for a selector that reads it

    def rule(self, stats: TokenStats, cfg: SelectorConfig) -> torch.Tensor:
        """The raw per-token score, fp32 [B, T] (values outside the mask are discarded)."""
        return torch.full_like(stats.h_B_T, math.nan)

    def score_B_T(self, stats: TokenStats, cfg: SelectorConfig) -> torch.Tensor:
        """The score this selector ranks by, fp32 [B, T], 0 outside the mask (for ranking and token dumps)."""
        return torch.where(stats.mask_B_T, self.rule(stats, cfg), 0.0)

    def select(self, stats: TokenStats, keep: float, cfg: SelectorConfig, generator: torch.Generator) -> torch.Tensor:
        score_B_T = self.score_B_T(stats, cfg)
        return take_top([-score_B_T if self.bottom else score_B_T], stats.mask_B_T, keep, cfg.granularity)


def _registered(cls: type[Selector]) -> type[Selector]:
    SELECTORS.register(cls.name)(cls())
    return cls


@_registered
class Full(Selector):
    """Every valid response token (the OPD baseline); `keep` is ignored."""

    name, ignores_keep = "full", True

    def select(self, stats, keep, cfg, generator):
        return stats.mask_B_T.clone()


@_registered
class Random(Selector):
    """Uniform sample without replacement, same count as the scored rules (the control the paper lacks)."""

    name = "random"

    def select(self, stats, keep, cfg, generator):
        return take_top([_uniform_B_T(stats, generator)], stats.mask_B_T, keep, cfg.granularity)


@_registered
class Entropy(Selector):
    """The paper's entropy-only rule: sample k tokens without replacement with p_t proportional to h_t.

    Gumbel-top-k: the k largest log h_t + Gumbel_t are distributed exactly as k sequential draws without
    replacement. Tokens with h = 0 rank below all others and are ordered uniformly among themselves, so
    they are only taken once positive mass is exhausted (a row of zeros falls back to uniform). Its score
    (for dumps) is the sampling weight h.
    """

    name, reads = "entropy", frozenset({"h"})

    def rule(self, stats, cfg):
        return stats.h_B_T

    def select(self, stats, keep, cfg, generator):
        gumbel_B_T = -torch.log(-torch.log(_uniform_B_T(stats, generator)))
        h_B_T = stats.h_B_T.float()
        positive_B_T = h_B_T > 0
        key_B_T = torch.where(positive_B_T, torch.log(h_B_T.clamp(min=1e-30)) + gumbel_B_T, gumbel_B_T)
        return take_top([key_B_T, positive_B_T.float()], stats.mask_B_T, keep, cfg.granularity)


@_registered
class EntropyTopK(Selector):
    """Deterministic top-k by h^ (clipped, min-max normalised entropy): a variant of the paper's rule."""

    name, reads = "entropy_topk", frozenset({"h"})

    def rule(self, stats, cfg):
        return normalise(stats, cfg.entropy_clip_quantile, cfg.rkl_clip_quantile)[0]


@_registered
class Divergence(Selector):
    """Top-k by rkl = KL(S||T), delta_t in TIP."""

    name, reads = "divergence", frozenset({"rkl"})

    def rule(self, stats, cfg):
        return stats.rkl_B_T


@_registered
class Q3(Selector):
    """Top-k by fkl * (1 - h^): overconfident tokens (Q3), confident and far from the teacher in the
    teacher's own view, invisible to entropy rules. The loss stays rkl."""

    name, reads = "q3", frozenset({"h", "fkl"})

    def rule(self, stats, cfg):
        h_hat_B_T, _ = normalise(stats, cfg.entropy_clip_quantile, cfg.rkl_clip_quantile)
        return stats.fkl_B_T * (1.0 - h_hat_B_T)


@_registered
class TypeAware(Selector):
    """TIP's Soft-OR: top-k by s = h^ + rkl^ - h^ * rkl^ (high when either axis is high).

    Computed as 1 - (1 - h^)(1 - rkl^), the same number but exactly 1 whenever either axis is 1: in
    fp32, h^ = 1 and rkl^ = 0.3 give 1 - 6e-8 by the other form, so among the tokens whose score is
    1 (every clipped top-2% entropy token) rounding noise, not the earlier position, broke the tie.
    """

    name, reads = "type_aware", frozenset({"h", "rkl"})

    def rule(self, stats, cfg):
        h_hat_B_T, rkl_hat_B_T = normalise(stats, cfg.entropy_clip_quantile, cfg.rkl_clip_quantile)
        return 1.0 - (1.0 - h_hat_B_T) * (1.0 - rkl_hat_B_T)


@_registered
class TypeAwareBottom(TypeAware):
    """Control: bottom-k by the Soft-OR score (the paper's "bottom half"); ties still go to the earlier
    position. Its dumped score is the Soft-OR score it ranks by."""

    name, bottom = "type_aware_bottom", True
