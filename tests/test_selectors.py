"""[4b] Token selectors on small hand-built TokenStats where the right answer is known.

The generic properties (counts, masks, keep = 1, ranking) run over every selector in the registry, so a
new selector is covered by adding it. Run: python -m pytest tests/test_selectors.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from tipdistill.config import SelectorConfig
from tipdistill.selectors import SELECTORS, Selector, take_top
from conftest import stats_of
from tipdistill.types import TokenStats

NAMES = sorted(SELECTORS)
SUBSET = [n for n in NAMES if not SELECTORS.get(n).ignores_keep]  # the ones that honour `keep`
TOP_K = [n for n in NAMES if type(SELECTORS.get(n)).select is Selector.select]  # ranked by their own score
GRANULARITIES = ["per_sequence", "per_batch"]


def random_stats(seed, B, T, p_valid=0.7, garbage=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < p_valid
    if B > 1:
        mask[0] = False  # an empty rollout
    h, rkl, fkl = (torch.rand(B, T, generator=g) for _ in range(3))
    rkl, fkl = 3 * rkl**2, 3 * fkl**2
    if garbage:  # huge scores outside the mask: the mask must still win
        h, rkl, fkl = (torch.where(mask, x, 1e6) for x in (h, rkl, fkl))
    else:
        h, rkl, fkl = (x * mask for x in (h, rkl, fkl))
    return TokenStats(h_B_T=h, rkl_B_T=rkl, fkl_B_T=fkl, mask_B_T=mask)


def select(name, stats, keep, granularity="per_sequence", seed=0, **cfg):
    gen = torch.Generator().manual_seed(seed)
    return SELECTORS.get(name).select(stats, keep, SelectorConfig(name=name, granularity=granularity, **cfg), gen)


def score_B_T(name, stats, cfg):
    return SELECTORS.get(name).score_B_T(stats, cfg)


def expected_k(m, keep):
    return 0 if m == 0 else min(m, max(1, math.floor(keep * m + 1e-9)))


def test_every_selector_has_its_yaml_and_every_yaml_a_selector():
    conf = Path(__file__).resolve().parents[1] / "conf" / "selector"
    named = {yaml.safe_load(f.read_text())["name"]: f.stem for f in conf.glob("*.yaml")}
    assert named == {n: n for n in SELECTORS}  # conf/selector/<name>.yaml sets name: <name>
    assert {"full", "type_aware"} <= set(SELECTORS)
    for name in NAMES:
        assert SELECTORS.get(name).name == name
    with pytest.raises(LookupError, match="selector.name"):
        SELECTORS.get("soft_or")


# --- hand-built cases -----------------------------------------------------------------------------------

# Token 2 is confident but wrong: low entropy, tiny rkl (the student puts little mass where the
# teacher disagrees), large fkl (the teacher's own mass sits where the student has almost none).
CONFIDENT_WRONG = dict(
    h=[[0.9, 0.8, 0.05, 0.7, 0.1]],
    rkl=[[0.30, 0.20, 0.02, 0.10, 0.01]],
    fkl=[[0.10, 0.20, 3.00, 0.10, 0.05]],
)


def test_q3_picks_the_confident_wrong_token_entropy_misses_it():
    st = stats_of(**CONFIDENT_WRONG)
    assert select("q3", st, keep=0.2).tolist() == [[False, False, True, False, False]]
    assert not select("entropy_topk", st, keep=0.4)[0, 2]  # top 2 by entropy: tokens 0 and 1
    assert select("entropy_topk", st, keep=0.4).tolist() == [[True, True, False, False, False]]
    assert not select("divergence", st, keep=0.4)[0, 2]
    assert select("divergence", st, keep=0.4).tolist() == [[True, True, False, False, False]]


def test_type_aware_with_constant_rkl_orders_like_entropy_topk():
    for seed in range(5):
        st = random_stats(seed, 4, 23)
        st.rkl_B_T = st.mask_B_T.float() * 0.7  # constant -> rkl_hat = 0 -> Soft-OR = h_hat
        for keep in (0.1, 0.3, 0.5, 0.8):
            for gran in GRANULARITIES:
                assert torch.equal(select("type_aware", st, keep, gran), select("entropy_topk", st, keep, gran))


def test_type_aware_soft_or_by_hand():
    # h_hat = (0, 1/2, 1), rkl_hat = (1, 0, 1/2) -> s = (1, 1/2, 1); ties -> earlier position
    st = stats_of([[0.1, 0.2, 0.3]], [[4.0, 2.0, 3.0]])
    torch.testing.assert_close(score_B_T("type_aware", st, SelectorConfig(entropy_clip_quantile=1.0)), torch.tensor([[1.0, 0.5, 1.0]]))
    assert select("type_aware", st, keep=0.34, entropy_clip_quantile=1.0).tolist() == [[True, False, False]]
    assert select("type_aware_bottom", st, keep=0.34, entropy_clip_quantile=1.0).tolist() == [[False, True, False]]


def test_bottom_is_the_complement_of_top_at_half():
    st = random_stats(7, 3, 20, p_valid=1.0)  # continuous scores: no ties; every row m = 20
    top, bottom = select("type_aware", st, 0.5), select("type_aware_bottom", st, 0.5)
    assert torch.equal(bottom, st.mask_B_T & ~top)


def test_tie_break_by_position():
    st = stats_of([[0.5] * 6, [0.5] * 6], [[1.0] * 6, [1.0] * 6], [[1.0] * 6, [1.0] * 6])
    for name in ("entropy_topk", "divergence", "q3", "type_aware", "type_aware_bottom"):
        assert select(name, st, 0.5).tolist() == [[True] * 3 + [False] * 3] * 2, name
        # per batch: the first 6 positions in row-major order
        assert select(name, st, 0.5, "per_batch").tolist() == [[True] * 6, [False] * 6], name


def test_score_for_dumps():
    st = stats_of(**CONFIDENT_WRONG, mask=[[True, True, True, True, False]])
    cfg = SelectorConfig()
    for name in ("full", "random"):
        s = score_B_T(name, st, cfg)
        assert torch.isnan(s[0, :4]).all() and s[0, 4] == 0
    torch.testing.assert_close(score_B_T("entropy", st, cfg), st.h_B_T)
    torch.testing.assert_close(score_B_T("divergence", st, cfg), st.rkl_B_T)
    assert score_B_T("q3", st, cfg)[0].argmax().item() == 2
    for name in NAMES:
        s = score_B_T(name, st, cfg)
        assert s.shape == (1, 5) and s[0, 4] == 0


# --- counts and masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_kept_counts_exact(granularity):
    for seed, (B, T) in enumerate([(1, 1), (3, 7), (5, 40), (8, 64)]):
        st = random_stats(seed, B, T)
        m_B = st.mask_B_T.sum(1).tolist()
        for keep in (0.01, 0.1, 0.2, 0.29, 0.5, 0.77, 0.99):
            for name in SUBSET:
                kept = select(name, st, keep, granularity, seed=seed)
                if granularity == "per_sequence":
                    assert kept.sum(1).tolist() == [expected_k(m, keep) for m in m_B], (name, keep)
                else:
                    assert int(kept.sum()) == expected_k(sum(m_B), keep), (name, keep)


def test_never_keeps_a_masked_position():
    for seed in range(30):
        g = torch.Generator().manual_seed(1000 + seed)
        B, T = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 50, (1,), generator=g))
        st = random_stats(seed, B, T, p_valid=float(torch.rand(1, generator=g)), garbage=seed % 2 == 0)
        keep = float(torch.rand(1, generator=g).clamp(min=0.01))
        for name in NAMES:
            for gran in GRANULARITIES:
                kept = select(name, st, keep, gran, seed=seed)
                assert kept.dtype == torch.bool and kept.shape == st.mask_B_T.shape
                assert not (kept & ~st.mask_B_T).any(), (name, gran, seed)


def test_keep_one_keeps_everything():
    st = random_stats(3, 4, 17)
    for name in NAMES:
        for gran in GRANULARITIES:
            assert torch.equal(select(name, st, 1.0, gran), st.mask_B_T), (name, gran)


def test_only_the_selectors_that_say_so_ignore_keep():
    st = random_stats(2, 3, 30, p_valid=1.0)
    assert SELECTORS.get("full").ignores_keep
    for name in NAMES:
        everything = torch.equal(select(name, st, 0.1), st.mask_B_T)
        assert everything == SELECTORS.get(name).ignores_keep, name


def test_kept_tokens_are_the_highest_scored():
    st = random_stats(11, 6, 30)
    cfg = SelectorConfig()
    assert {"entropy_topk", "divergence", "q3", "type_aware", "type_aware_bottom"} <= set(TOP_K)
    for name in TOP_K:
        kept = select(name, st, 0.3)
        score = score_B_T(name, st, cfg)
        if SELECTORS.get(name).bottom:
            score = -score
        for b in range(6):
            if kept[b].any():
                dropped = st.mask_B_T[b] & ~kept[b]
                if dropped.any():
                    assert score[b][kept[b]].min() >= score[b][dropped].max(), name


# --- randomness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "entropy"])
def test_seeded_determinism(name):
    st = random_stats(5, 4, 40)
    for gran in GRANULARITIES:
        a, b = select(name, st, 0.3, gran, seed=123), select(name, st, 0.3, gran, seed=123)
        assert torch.equal(a, b)
        others = [select(name, st, 0.3, gran, seed=s) for s in range(124, 130)]
        assert any(not torch.equal(a, o) for o in others)


def test_entropy_sampling_is_proportional_to_h():
    # One pick per row (k = floor(0.25 * 4) = 1): P(pick t) = h_t / sum h, and h = 0 is never picked.
    draws = 4000
    st = stats_of([[0.0, 0.1, 0.2, 0.7]] * draws, [[0.0] * 4] * draws)
    picks = select("entropy", st, 0.25, seed=0).sum(0).double() / draws
    assert picks[0] == 0
    torch.testing.assert_close(picks, torch.tensor([0.0, 0.1, 0.2, 0.7], dtype=torch.float64), atol=0.03, rtol=0)
    # Two picks out of three positive-h tokens: the zero-entropy token is still never taken.
    st = stats_of([[0.3, 0.0, 0.3, 0.4]] * 500, [[0.0] * 4] * 500)
    kept = select("entropy", st, 0.5, seed=1)
    assert not kept[:, 1].any() and (kept.sum(1) == 2).all()


def test_entropy_all_zero_row_falls_back_to_uniform():
    draws = 4000
    st = stats_of([[0.0] * 4] * draws, [[0.0] * 4] * draws)
    picks = select("entropy", st, 0.25, seed=2).sum(0).double() / draws
    torch.testing.assert_close(picks, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)
    # and once positive mass runs out, the zero-h tokens fill the remaining slots
    st = stats_of([[0.0, 0.5, 0.0, 0.0]], [[0.0] * 4])
    kept = select("entropy", st, 0.5)
    assert kept[0, 1] and int(kept.sum()) == 2


def test_take_top_nan_and_inf_scores_stay_inside_the_mask():
    mask = torch.tensor([[True, True, False, True]])
    key = torch.tensor([[math.nan, -math.inf, 5.0, 1.0]])
    # k = 2: the finite 1.0, then NaN (ranked as -inf) ties with -inf and the earlier position wins;
    # the masked 5.0 is never taken.
    assert take_top([key], mask, 0.67, "per_sequence").tolist() == [[True, False, False, True]]
    assert take_top([-key], mask, 0.34, "per_sequence").tolist() == [[False, True, False, False]]


# --- numerical edges of the paper's definitions -------------------------------------------------------


def test_soft_or_is_exactly_one_when_an_axis_is_one_so_ties_go_to_the_earlier_token():
    # h^ = (1, 1, 0) (no clipping), rkl^ = (0.3, 0, 1): every Soft-OR score is exactly 1. With
    # h^ + rkl^ - h^ * rkl^ in fp32 the first is 1 - 6e-8 and the tie rule picked the second token.
    st = stats_of([[0.9, 0.9, 0.1]], [[0.3, 0.0, 1.0]])
    cfg = SelectorConfig(entropy_clip_quantile=1.0)
    assert score_B_T("type_aware", st, cfg).tolist() == [[1.0, 1.0, 1.0]]
    assert select("type_aware", st, keep=0.34, entropy_clip_quantile=1.0).tolist() == [[True, False, False]]
    assert select("type_aware", st, keep=0.34, entropy_clip_quantile=1.0, granularity="per_batch").tolist() == [[True, False, False]]


def test_an_infinite_reverse_kl_ranks_first_for_type_aware_as_for_divergence():
    # KL(S||T) = inf where the teacher gives -inf to an id the student samples with mass.
    st = stats_of([[0.5, 0.5, 0.5, 0.5]], [[0.2, math.inf, 0.8, 0.0]])
    assert select("divergence", st, keep=0.25).tolist() == [[False, True, False, False]]
    score = score_B_T("type_aware", st, SelectorConfig())
    assert not torch.isnan(score).any() and score[0, 1] == 1.0 == score[0].max()
    # the two top scores (inf -> 1 and the largest finite -> 1) are kept, before the rest
    assert select("type_aware", st, keep=0.5).tolist() == [[False, True, True, False]]
    assert select("type_aware_bottom", st, keep=0.5).tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("name", list(SELECTORS))
def test_each_selector_reads_only_the_statistics_it_declares(name):
    """The statistics pass computes scoring.METRIC_STATS plus a selector's `reads`; anything else is None, so a
    selector that read an undeclared statistic would fail here instead of ranking by a missing value."""
    from tipdistill.scoring import METRIC_STATS

    full = random_stats(3, 4, 9)
    declared = METRIC_STATS | SELECTORS.get(name).reads
    assert declared <= {"h", "rkl", "fkl"}
    stats = TokenStats(h_B_T=full.h_B_T, rkl_B_T=full.rkl_B_T, mask_B_T=full.mask_B_T,
                       fkl_B_T=full.fkl_B_T if "fkl" in declared else None)
    keep = SELECTORS.get(name).select(stats, 0.5, SelectorConfig(name=name), torch.Generator().manual_seed(0))
    assert torch.equal(keep, SELECTORS.get(name).select(full, 0.5, SelectorConfig(name=name), torch.Generator().manual_seed(0)))
