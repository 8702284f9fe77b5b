"""Randomised (hypothesis) property tests for hjepa.schedulers: landmarks, bounds, monotonicity, exact resume."""
import math, pickle
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hjepa.schedulers import (warmup_cosine, linear, polynomial, cosine_restarts, Schedule, lr_schedule,
                              momentum_schedule, wd_schedule, LevelWeightSchedule, ParamScheduler)

SET = settings(max_examples=60, deadline=None)
vals = st.floats(0.0, 10.0)


@st.composite
def plan(draw):
    T = draw(st.integers(1, 500)); W = draw(st.integers(0, T))
    return T, W, draw(vals), draw(vals), draw(vals)      # total, warm-up, base, final, start


@SET
@given(plan(), st.sampled_from(['cosine', 'linear', 'poly1', 'poly3']))
def test_landmarks_bounds_and_monotone(p, kind):
    T, W, base, final, start = p
    f = {'cosine': lambda s: warmup_cosine(s, T, base, final, W, start),
         'linear': lambda s: linear(s, T, base, final, W, start),
         'poly1': lambda s: polynomial(s, T, base, final, 1.0, W, start),
         'poly3': lambda s: polynomial(s, T, base, final, 3.0, W, start)}[kind]
    if W > 0: assert f(0) == start
    assert f(W) == base                       # the peak, exactly, at the end of warm-up
    if T > W: assert f(T) == final            # the floor, exactly, at the end
    assert f(T + 7) == final                  # and after it
    v = [f(s) for s in range(T + 3)]
    lo, hi = min(start, base, final), max(start, base, final)
    assert all(lo - 1e-9 <= x <= hi + 1e-9 for x in v)
    dec = [b - a for a, b in zip(v[W:], v[W + 1:])]
    assert all(d <= 1e-12 for d in dec) if base >= final else all(d >= -1e-12 for d in dec)
    war = [b - a for a, b in zip(v[:W], v[1:W + 1])]
    assert all(d >= -1e-12 for d in war) if base >= start else all(d <= 1e-12 for d in war)


@SET
@given(st.integers(1, 50), st.floats(1.0, 3.0), st.floats(0.1, 1.0), st.integers(0, 20), st.floats(0, 0.5))
def test_restarts_peaks_and_bounds(cycle, mult, decay, W, final):
    base = 1.0
    starts, s = [W], W
    for k in range(4):
        s += max(1, round(cycle * mult ** k)); starts.append(s)
    for k, s0 in enumerate(starts):
        assert math.isclose(cosine_restarts(s0, cycle, base, final, W, mult, decay),
                            final + (base - final) * decay ** k, rel_tol=1e-9)
    v = [cosine_restarts(t, cycle, base, final, W, mult, decay) for t in range(W, starts[-1])]
    assert all(final - 1e-12 <= x <= base + 1e-12 for x in v)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match='total_steps'): warmup_cosine(0, 0, 1.0)
    with pytest.raises(ValueError, match='warmup_steps'): linear(0, 10, 1.0, warmup_steps=11)
    with pytest.raises(ValueError, match='decay'): cosine_restarts(0, 10, 1.0, decay=0)
    with pytest.raises(ValueError, match='warmup_frac'): lr_schedule(10, warmup_frac=1.5)
    with pytest.raises(ValueError, match='ramp_frac'): LevelWeightSchedule(3, 10, ramp_frac=2)


@SET
@given(st.integers(1, 1000), st.floats(0.9, 0.999))
def test_momentum_and_wd(T, m0):
    m = momentum_schedule(T, start=m0)
    v = m.values(T + 5)
    assert v[0] == m0 and v[T] == 1.0 and all(a <= b for a, b in zip(v, v[1:])) and max(v) <= 1.0
    w = wd_schedule(T).values(T + 1)
    assert w[0] == 0.04 and math.isclose(w[T], 0.4) and all(a <= b + 1e-15 for a, b in zip(w, w[1:]))


@SET
@given(st.integers(1, 5), st.integers(1, 2000), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_level_weights_coarse_first(L, T, ramp, mn):
    lw = LevelWeightSchedule(L, T, ramp_frac=ramp, min_weight=mn)
    steps = sorted({0, T // 4, T // 2, T, T + 1} | set(range(0, T + 1, max(1, T // 50))))
    rows = [lw(s) for s in steps]
    assert all(len(r) == L and r[-1] > 0 for r in rows)                 # the coarsest is always trained
    for col in zip(*rows): assert all(a <= b + 1e-12 for a, b in zip(col, col[1:]))   # never decrease
    assert lw(T) == lw.final_weights                                     # full weights after the ramp
    if L > 1 and ramp * T >= L - 1 and mn < 1:
        r0 = lw(0)
        assert all(r0[l] < lw.final_weights[l] for l in range(L - 1))   # finer levels start below their final weight
        # coarse before fine: a coarser level reaches its final weight no later than a finer one
        done = [min(s for s in range(T + 1) if abs(lw(s)[l] - lw.final_weights[l]) < 1e-12) for l in range(L)]
        assert all(done[l] >= done[l + 1] for l in range(L - 1))


def _lrs(total, split, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    def build(net):
        opt = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=0.04)
        return opt, ParamScheduler(opt, lr=lr_schedule(total, base=0.05, warmup_frac=0.2), wd=wd_schedule(total))
    opt, sch = build(net)
    x = torch.linspace(-1, 1, 12).view(4, 3); out = []
    for s in range(total):
        if s == split:
            state = (net.state_dict(), opt.state_dict(), sch.state_dict())
            torch.manual_seed(seed + 1); net = torch.nn.Linear(3, 2); opt, sch = build(net)
            net.load_state_dict(state[0]); opt.load_state_dict(state[1]); sch.load_state_dict(state[2])
        out.append((sch.get_last_lr()[0], opt.param_groups[0]['weight_decay']))
        opt.zero_grad(); net(x).pow(2).mean().backward(); opt.step(); sch.step()
    return out, net.weight.detach().clone()


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 25), st.data())
def test_resume_is_exact(total, data):
    split = data.draw(st.integers(1, total - 1))
    full, w_full = _lrs(total, None)
    part, w_part = _lrs(total, split)
    assert full == part and torch.equal(w_full, w_part)


def test_schedules_pickle():
    for s in (lr_schedule(100), momentum_schedule(100), LevelWeightSchedule(3, 100),
              Schedule('restarts', cycle_steps=7, base=1.0, cycle_mult=2)):
        s2 = pickle.loads(pickle.dumps(s))
        assert [s2(t) for t in range(0, 120, 7)] == [s(t) for t in range(0, 120, 7)]


@pytest.mark.parametrize('L', [1, 2, 3, 4, 5, 6])
def test_level_weight_schedule_defaults_are_the_models(L):
    "Default final weights come from hjepa.model.default_level_weights: one place, so schedule and model agree."
    from hjepa.model import default_level_weights
    assert LevelWeightSchedule(L, 50).final_weights == default_level_weights(L)
    with pytest.raises(ValueError, match='num_levels must be an int'): LevelWeightSchedule(0, 50)
