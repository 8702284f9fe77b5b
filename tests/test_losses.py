"""Property tests of hjepa.losses a notebook cannot show: randomised (hypothesis) runs and DINO's center under DDP."""
import math, os, socket
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from hjepa.losses import (JEPALoss, VICRegLoss, DINOLoss, InfoNCELoss, CombinedLoss, SIGRegLoss, variance_term,
                          covariance_term, whiten, epps_pulley)

SET = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def _levels(seed, num_levels, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 1 + l, d, generator=g) for l in range(num_levels)]


@SET
@given(seeds, st.integers(1, 4), st.sampled_from(['smooth_l1', 'mse']), st.data())
def test_jepa_zero_iff_equal(seed, L, loss_type, data):
    tg = _levels(seed, L)
    w = data.draw(st.lists(st.floats(0.01, 10), min_size=L, max_size=L))
    crit = JEPALoss(loss_type)
    assert crit([t.clone() for t in tg], tg, w)[0].item() == 0.0
    lvl = data.draw(st.integers(0, L - 1))
    pr = [t.clone() for t in tg]
    pr[lvl] = pr[lvl] + data.draw(st.sampled_from([1e-2, 0.5, 5.0]))
    assert crit(pr, tg, w)[0].item() > 0          # every level with weight > 0 counts


@SET
@given(seeds, st.integers(2, 4), st.data())
def test_jepa_weights_act_as_stated(seed, L, data):
    tg = _levels(seed, L); pr = [t + 0.3 * torch.randn_like(t) for t in tg]
    w = data.draw(st.lists(st.floats(0.0, 5), min_size=L, max_size=L).filter(lambda v: sum(v) > 0.1))
    c = data.draw(st.floats(0.1, 100))
    crit = JEPALoss()
    tot = crit(pr, tg, w)[0]
    want = sum(wi / sum(w) * F.smooth_l1_loss(p, t) for wi, p, t in zip(w, pr, tg))
    assert torch.allclose(tot, want, atol=1e-6)
    assert torch.allclose(crit(pr, tg, [c * x for x in w])[0], tot, atol=1e-6)      # scale-free
    # a zero-weight level: no value, no gradient
    w0 = list(w); w0[0] = 0.0
    if sum(w0) > 0:
        pr_g = [p.clone().requires_grad_() for p in pr]
        crit(pr_g, tg, w0)[0].backward()
        assert pr_g[0].grad.abs().sum().item() == 0.0


def test_jepa_default_weights_and_bad_input():
    tg = _levels(0, 3); pr = [t + 1 for t in tg]
    crit = JEPALoss(level_weights=[1, 0.7, 0.5])
    _, parts = crit(pr, tg)
    assert math.isclose(sum(parts[f'w_l{l}'].item() for l in range(3)), 1.0, rel_tol=1e-6)
    assert math.isclose(parts['w_l0'].item(), 1 / 2.2, rel_tol=1e-6)
    _, parts = crit(pr, tg, [0, 0, 1])          # call-time weights override the defaults
    assert parts['w_l2'].item() == 1.0
    with pytest.raises(ValueError, match='loss_type'): JEPALoss('l1')
    with pytest.raises(ValueError, match='levels'): crit(pr, tg[:2])


@SET
@given(seeds, st.floats(1.0, 10.0), st.integers(2, 16))
def test_vicreg_variance_zero_when_std_at_least_one(seed, scale, d):
    z = torch.randn(512, d, generator=torch.Generator().manual_seed(seed))
    z = z / z.std(0) * scale                 # every dimension's std is exactly `scale` >= 1
    assert variance_term(z).item() == 0.0


@SET
@given(seeds, st.floats(-5, 5), st.integers(2, 16))
def test_vicreg_collapsed_is_penalised(seed, value, d):
    z = torch.full((64, d), value) + 1e-4 * torch.randn(64, d, generator=torch.Generator().manual_seed(seed))
    assert variance_term(z).item() > 0.98
    tot, parts = VICRegLoss()(z, z)
    assert tot.item() > 24.5 and parts['vicreg_inv'].item() == 0.0


@SET
@given(seeds, st.floats(-100, 100), st.integers(2, 10))
def test_vicreg_covariance_zero_for_decorrelated(seed, offset, d):
    g = torch.Generator().manual_seed(seed)
    z = whiten(torch.randn(400, d, generator=g, dtype=torch.float64)
               @ torch.randn(d, d, generator=g, dtype=torch.float64))
    z = z * torch.rand(d, generator=g, dtype=torch.float64) * 3 + offset    # rescaled, shifted: still decorrelated
    assert covariance_term(z).item() < 1e-12
    corr = torch.randn(400, 1, generator=g).repeat(1, d)
    assert covariance_term(corr).item() > 0.5


def _nt_xent_loop(za, zb, t):
    "NT-Xent written anchor by anchor, as in the SimCLR paper."
    z = F.normalize(torch.cat([za, zb]), dim=1); n = len(z); B = n // 2
    tot = 0.0
    for i in range(n):
        p = (i + B) % n
        num = math.exp(float(z[i] @ z[p]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        tot += -math.log(num / den)
    return tot / n


@SET
@given(seeds, st.integers(2, 6), st.integers(2, 8), st.sampled_from([0.1, 0.5, 1.0]))
def test_infonce_matches_loop_and_is_permutation_equivariant(seed, B, D, t):
    g = torch.Generator().manual_seed(seed)
    za, zb = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    loss = InfoNCELoss(t)(za, zb)[0].item()
    assert math.isclose(loss, _nt_xent_loop(za, zb, t), rel_tol=1e-9, abs_tol=1e-9)
    perm = torch.randperm(B, generator=g)
    assert math.isclose(InfoNCELoss(t)(za[perm], zb[perm])[0].item(), loss, rel_tol=1e-9)   # same pairs, other order
    assert math.isclose(InfoNCELoss(t)(zb, za)[0].item(), loss, rel_tol=1e-9)               # symmetric in the views


@SET
@given(seeds)
def test_infonce_aligned_below_shuffled(seed):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(32, 16, generator=g); zb = za + 0.2 * torch.randn(32, 16, generator=g)
    perm = torch.roll(torch.arange(32), 1)          # a derangement: every pair broken
    assert InfoNCELoss()(za, zb)[0] < InfoNCELoss()(za, zb[perm])[0]


def test_dino_center_momentum_and_state():
    d = DINOLoss(out_dim=8, center_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    c = torch.zeros(8)
    for _ in range(5):
        d(s, t); c = 0.9 * c + 0.1 * t.reshape(-1, 8).mean(0)
        assert torch.allclose(d.center[0], c, atol=1e-6)
    d2 = DINOLoss(out_dim=8); d2.load_state_dict(d.state_dict())            # resumable
    assert torch.equal(d2.center, d.center)
    assert torch.allclose(d2(s, t, epoch=3)[0], d(s, t, epoch=3)[0])
    # the teacher temperature warms up 0.04 -> 0.07 over 30 epochs
    assert math.isclose(d(s, t, epoch=0)[1]['teacher_temp'].item(), 0.04, rel_tol=1e-6)
    assert math.isclose(d(s, t, epoch=40)[1]['teacher_temp'].item(), 0.07, rel_tol=1e-6)


def test_dino_skips_same_view_pairs():
    # if the student equals the teacher on every view, only cross-view pairs may contribute:
    # make the two global views disagree and check the loss by hand over the 2 x (V-1) pairs
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 6, generator=g); s = torch.cat([t, torch.randn(1, 3, 6, generator=g)])
    d = DINOLoss(out_dim=6, n_global=2, warmup_teacher_temp_epochs=0, teacher_temp=0.07)
    pt, ls = F.softmax(t / 0.07, -1), F.log_softmax(s / 0.1, -1)
    want = torch.stack([-(pt[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(3) if j != i]).mean()
    assert torch.allclose(d(s, t)[0], want, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _ddp_worker(rank, world, port, t_full, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        d = DINOLoss(out_dim=t_full.shape[-1])
        shard = t_full.chunk(world, dim=1)[rank]           # each process sees its part of the batch
        d.update_center(shard)
        torch.save(d.center.clone(), os.path.join(out_dir, f'center{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_dino_center_is_averaged_over_processes(tmp_path):
    "Two gloo processes with half a batch each end with the center of the whole batch."
    import torch.multiprocessing as mp
    t_full = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0)) + torch.arange(5.)
    ref = DINOLoss(out_dim=5); ref.update_center(t_full)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), t_full, str(tmp_path)), nprocs=2, join=True,
                       start_method='fork')
    for r in range(2): assert torch.allclose(torch.load(tmp_path / f'center{r}.pt'), ref.center, atol=1e-6)


def test_combined_passes_level_weights_and_adds_vicreg():
    tg = _levels(3, 2); pr = [t + 0.5 for t in tg]
    feats = torch.randn(4, 7, 8)
    comb = CombinedLoss(JEPALoss('mse'), vicreg_coeff=0.5)
    tot, parts = comb(pr, tg, [0, 1], features=feats)
    want = JEPALoss('mse')(pr, tg, [0, 1])[0] + 0.5 * VICRegLoss()(feats)[0]
    assert torch.allclose(tot, want) and parts['loss'].item() == pytest.approx(want.item())
    assert {'jepa', 'jepa_l0', 'jepa_l1', 'vicreg_var', 'vicreg_cov'} <= set(parts)


# ---- SIGReg --------------------------------------------------------------------------------------------------------
NULL_MEAN = math.sqrt(2 * math.pi) * (1 - 1 / math.sqrt(3))      # E[T] for Gaussian samples, any N (~1.059)


def _gen(seed): return torch.Generator().manual_seed(seed)


def _reference_sigreg(z, a, num=4001, t_max=5.0):
    "Independent check: complex ECF in float64, a fine trapezoid grid, one direction at a time."
    z, a = z.double(), a.double()
    t = torch.linspace(-t_max, t_max, num, dtype=torch.float64)
    out = []
    for m in range(a.shape[1]):
        ecf = torch.exp(1j * t[None, :] * (z @ a[:, m])[:, None]).mean(0)
        f = (ecf - torch.exp(-t**2 / 2)).abs() ** 2 * torch.exp(-t**2 / 2)
        out.append(z.shape[0] * torch.trapezoid(f, t))
    return torch.stack(out).mean()


@pytest.mark.parametrize('seed', [0, 1])
def test_sigreg_matches_the_integral_definition(seed):
    z = torch.randn(200, 6, generator=_gen(seed)) * torch.tensor([1, 2, .5, 1, 1, 3.]) + 0.3
    crit = SIGRegLoss(num_slices=8)
    a = crit.directions(6, 'cpu', _gen(seed + 10))
    assert torch.allclose(a.norm(dim=0), torch.ones(8), atol=1e-6)      # unit directions
    got = crit(z, _gen(seed + 10))
    assert torch.allclose(got.double(), _reference_sigreg(z, a, num=17), rtol=1e-4)   # same grid: same number
    # near unit scale the 17-point rule is a good quadrature of the integral itself (wider data alias: see chapter)
    z1 = torch.randn(200, 6, generator=_gen(seed)) * torch.tensor([1, 1.5, .5, 1, 1, .8]) + 0.3
    assert torch.allclose(crit(z1, _gen(seed + 10)).double(), _reference_sigreg(z1, a), rtol=1e-3)


def test_sigreg_gaussian_floor_vs_collapse():
    "Gaussian samples sit at the noise floor (~1.06, independent of N); every kind of collapse is > 10x above it."
    g = _gen(0); crit = SIGRegLoss(seed=0)
    n, d = 1024, 32
    gauss = [crit(torch.randn(n, d, generator=g)).item() for _ in range(8)]
    assert 0.8 < sum(gauss) / 8 < 1.35 and max(gauss) < 2.0, gauss
    q = torch.linalg.qr(torch.randn(d, 2, generator=g))[0]
    bad = {'all equal': torch.full((n, d), 0.3), 'zero': torch.zeros(n, d),
           'rank 1': torch.randn(n, 1, generator=g) @ torch.randn(1, d, generator=g),
           'rank 2': torch.randn(n, 2, generator=g) @ q.T * math.sqrt(d / 2),
           'shifted': torch.randn(n, d, generator=g) + 1, 'std 3': 3 * torch.randn(n, d, generator=g),
           'std 0.3': 0.3 * torch.randn(n, d, generator=g)}
    for k, z in bad.items(): assert crit(z).item() > 10 * NULL_MEAN, k
    # the floor does not grow with N, a collapsed sample's statistic grows like N (0.409 N for all-zero projections)
    for n2 in (256, 4096):
        assert abs(epps_pulley(torch.randn(n2, 200, generator=g)).mean().item() - NULL_MEAN) < 0.2
        assert math.isclose(crit(torch.zeros(n2, 4)).item(), 0.4089 * n2, rel_tol=2e-3)


@SET
@given(seeds, st.integers(2, 64), st.integers(1, 16))
def test_sigreg_row_permutation_and_seed(seed, n, d):
    z = torch.randn(n, d, generator=_gen(seed)) * 2 + 0.5
    perm = torch.randperm(n, generator=_gen(seed + 1))
    crit = SIGRegLoss(num_slices=16)
    assert torch.allclose(crit(z, _gen(seed)), crit(z[perm], _gen(seed)), rtol=1e-4, atol=1e-5)
    assert SIGRegLoss(num_slices=16, seed=seed)(z).item() == SIGRegLoss(num_slices=16, seed=seed)(z).item()
    own = SIGRegLoss(num_slices=16, seed=seed)
    assert own(z).item() != own(z).item() or d == 1              # fresh directions at every call (d=1: only +-e1)


def test_sigreg_groups_and_bad_input():
    z = torch.randn(3, 50, 4, generator=_gen(0)) * torch.tensor([1., 2., 4.])[:, None, None]
    crit = SIGRegLoss(num_slices=32)
    per = torch.stack([crit(z[i], _gen(7)) for i in range(3)])
    assert torch.allclose(crit(z, _gen(7)), per.mean(), rtol=1e-5)          # leading dims: separate groups
    with pytest.raises(ValueError, match='N >= 2'): crit(torch.ones(1, 3))
    with pytest.raises(ValueError, match='N >= 2'): crit(torch.ones(5))
    with pytest.raises(ValueError, match='num_slices'): SIGRegLoss(num_slices=0)
    with pytest.raises(ValueError, match='num_points'): SIGRegLoss(num_points=2)
    with pytest.raises(ValueError, match='t_max'): SIGRegLoss(t_max=0)


@pytest.mark.parametrize('seed', [1, 3])
def test_sigreg_gradient_pushes_toward_isotropy(seed):
    def stats(z):
        c = torch.cov(z.T); e = torch.linalg.eigvalsh(c).clamp(min=1e-12); p = e / e.sum()
        return (c - torch.eye(z.shape[1])).norm().item(), e.min().item(), (-(p * p.log()).sum()).exp().item()
    g = _gen(seed)
    q = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    z = (3 * torch.randn(512, 2, generator=g) @ q.T + 0.01 * torch.randn(512, 16, generator=g)).requires_grad_()
    crit = SIGRegLoss(num_slices=64, seed=seed)
    opt = torch.optim.Adam([z], lr=0.1)
    before, s0 = crit(z, _gen(99)).item(), stats(z.detach())
    for _ in range(200): opt.zero_grad(); crit(z).backward(); opt.step()
    after, s1 = crit(z, _gen(99)).item(), stats(z.detach())
    assert after < before / 10 and after < 2 * NULL_MEAN
    assert s1[0] < s0[0] / 2 and s0[1] < 1e-3 < 0.5 < s1[1] and s0[2] < 2.1 and s1[2] > 12


def _sigreg_ddp_worker(rank, world, port, z_full, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        shard = z_full.chunk(world)[rank].clone().requires_grad_()
        # different seeds per rank: the broadcast must make the directions agree
        loss = SIGRegLoss(num_slices=16, seed=rank)(shard, _gen(5) if rank == 0 else _gen(6))
        loss.backward()
        torch.save((loss.detach(), shard.grad), os.path.join(out_dir, f'sig{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_sigreg_under_ddp_is_the_full_batch_loss(tmp_path):
    "Two gloo processes, half a batch each: the full-batch value, and world x the full-batch gradient of their rows."
    import torch.multiprocessing as mp
    z_full = torch.randn(40, 5, generator=_gen(0)) * 1.5 + 0.2
    zr = z_full.clone().requires_grad_()
    ref = SIGRegLoss(num_slices=16)(zr, _gen(5)); ref.backward()
    mp.start_processes(_sigreg_ddp_worker, args=(2, _free_port(), z_full, str(tmp_path)), nprocs=2, join=True,
                       start_method='fork')
    for r in range(2):
        val, grad = torch.load(tmp_path / f'sig{r}.pt')
        assert torch.allclose(val, ref.detach(), rtol=1e-5)
        assert torch.allclose(grad, 2 * zr.grad.chunk(2)[r], rtol=1e-4, atol=1e-6)


def test_combined_adds_sigreg_and_default_is_unchanged():
    tg = _levels(4, 2); pr = [t + 0.5 for t in tg]
    feats, feats_b = torch.randn(4, 7, 8, generator=_gen(1)), torch.randn(4, 7, 8, generator=_gen(2))
    jepa = JEPALoss()(pr, tg, [1, 1])[0]
    tot, parts = CombinedLoss(sigreg=SIGRegLoss(seed=0), sigreg_coeff=0.2)(pr, tg, [1, 1], features=feats)
    sr = SIGRegLoss(seed=0)(feats.reshape(-1, 8))
    assert torch.allclose(parts['sigreg'], sr) and torch.allclose(tot, jepa + 0.2 * sr)
    assert 'vicreg' not in parts
    both = CombinedLoss(vicreg_coeff=0.5, sigreg=SIGRegLoss(seed=0), sigreg_coeff=0.2)
    tot2, parts2 = both(pr, tg, [1, 1], features=feats, features_b=feats_b)
    s0 = SIGRegLoss(seed=0)
    sr2 = (s0(feats.reshape(-1, 8)) + s0(feats_b.reshape(-1, 8))) / 2      # two views: each tested, averaged
    want = jepa + 0.5 * VICRegLoss()(feats, feats_b)[0] + 0.2 * sr2
    assert torch.allclose(tot2, want) and torch.allclose(parts2['sigreg'], sr2)
    # default sigreg_coeff=0: exactly the old objective, no sigreg part, no RNG consumed
    torch.manual_seed(0); state = torch.get_rng_state()
    tot0, parts0 = CombinedLoss(vicreg_coeff=0.5)(pr, tg, [1, 1], features=feats)
    assert tot0.item() == (jepa + 0.5 * VICRegLoss()(feats)[0]).item() and 'sigreg' not in parts0
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match='pass features='): CombinedLoss(sigreg_coeff=1.0)(pr, tg)
    with pytest.raises(ValueError, match='sigreg_coeff must be >= 0'): CombinedLoss(sigreg_coeff=-1)
