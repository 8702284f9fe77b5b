"""Property tests for hjepa.masking over thousands of sampled masks, DataLoader workers and the small-grid cases."""
import math, threading, warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from hjepa.masking import (HierarchicalMaskGenerator, MaskCollator, MultiBlockMaskGenerator, apply_masks, block_corners,
                           block_indices, block_size, level_to_patches, preset_8x8)

# masks are made in DataLoader workers, which use one thread; also faster on a busy CPU
torch.set_num_threads(1)
G = lambda s: torch.Generator().manual_seed(s)


def block_shape(idx, W):
    "Rows/cols spanned by a set of raster indices, and whether they form a full rectangle."
    r, c = idx // W, idx % W
    h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
    return h, w, len(set(idx.tolist())) == h * w == len(idx)


def check_masks(gen, B, masks_ctx, masks_tgt):
    "Every invariant a batch of masks must satisfy; returns the full-grid target union [B, N]."
    H, W = gen.grid
    N = H * W
    tgts = masks_tgt if isinstance(masks_tgt, list) else [masks_tgt]
    assert len(tgts) == gen.num_levels
    assert masks_ctx.dtype == torch.long and masks_ctx.shape[0] == B
    ctx = masks_ctx if masks_ctx.dim() == 3 else masks_ctx[:, None]            # [B, nenc, K]
    K = ctx.shape[-1]
    assert K >= 1 and 0 <= ctx.min() and ctx.max() < N
    assert (ctx.diff(dim=-1) > 0).all(), "context indices must be sorted and unique"
    covered = torch.zeros(B, N, dtype=torch.bool)
    for l, (t, (Hl, Wl), (h, w), M) in enumerate(zip(tgts, gen.levels, gen.last_stats['tgt_sizes'], gen.npred)):
        assert t.dtype == torch.long and t.shape == (B, M, h * w)
        assert 0 <= t.min() and t.max() < Hl * Wl, f"level {l} indices must index the {Hl}x{Wl} pooled grid"
        # every block is a full h×w rectangle on the level grid
        r, c = t // Wl, t % Wl
        assert ((r.amax(-1) - r.amin(-1) + 1) == h).all() and ((c.amax(-1) - c.amin(-1) + 1) == w).all()
        assert (t.sort(-1).values.diff(dim=-1) > 0).all()
        covered.scatter_(1, level_to_patches(t, gen.grid, l).flatten(1), True)
    if not gen.allow_overlap:
        assert not covered.gather(1, ctx.flatten(1)).any(), "context overlaps a target"
    if gen.last_stats['relaxed'] == 0:
        assert K >= gen.min_keep
    # the context lies inside one he×we block
    he, we = gen.last_stats['ctx_size']
    r, c = ctx // W, ctx % W
    assert ((r.amax(-1) - r.amin(-1)) < he).all() and ((c.amax(-1) - c.amin(-1)) < we).all()
    return covered


# --------------------------------------------------------------------------- block sampling

def test_block_size_distribution():
    "Area uniform in the scale range, log-aspect uniform, scale and aspect independent (large grid: rounding is small)."
    g = G(0)
    s = torch.tensor([block_size((100, 100), (0.15, 0.2), (0.75, 1.5), g) for _ in range(4000)]).double()
    area, la = s.prod(1) / 1e4, (s[:, 0] / s[:, 1]).log()
    assert 0.145 < area.min() and area.max() < 0.205
    assert abs(area.mean() - 0.175) < 0.002
    assert abs(la.mean() - (math.log(0.75) + math.log(1.5)) / 2) < 0.01          # log-uniform: mean of the log-bounds
    assert abs(np.corrcoef(area, la)[0, 1]) < 0.06                                # the reference's correlation is ~1
    # log-uniform, not uniform: as many blocks wider than tall as... the log-midpoint splits them in half
    mid = (math.log(0.75) + math.log(1.5)) / 2
    assert abs((la < mid).double().mean() - 0.5) < 0.03


@settings(max_examples=200, deadline=None)
@given(H=st.integers(1, 30), W=st.integers(1, 30), s0=st.floats(0.01, 1.0), ds=st.floats(0, 0.5),
       a0=st.floats(0.2, 3.0), da=st.floats(0, 3.0), seed=st.integers(0, 2**31))
def test_block_size_in_range(H, W, s0, ds, a0, da, seed):
    "Sizes are clipped to the grid, at least 1, and match round(sqrt(sNa)) when not clipped."
    s1, a1 = min(s0 + ds, 1.0), a0 + da
    h, w = block_size((H, W), (s0, s1), (a0, a1), G(seed))
    assert 1 <= h <= H and 1 <= w <= W
    N = H * W
    if 1 < h < H and 1 < w < W:                                      # not clipped: area/aspect up to rounding
        lo = (math.sqrt(N * s0 * a0) - 0.5) * (math.sqrt(N * s0 / a1) - 0.5)
        hi = (math.sqrt(N * s1 * a1) + 0.5) * (math.sqrt(N * s1 / a0) + 0.5)
        assert lo - 1e-9 <= h * w <= hi + 1e-9
        # h = round(sqrt(N s a)) and w = round(sqrt(N s / a)) for one draw (s, a): rounding moves each by <= 0.5
        assert (h - 0.5) / (w + 0.5) <= a1 * (1 + 1e-9) + 1e-9
        assert (h + 0.5) / (w - 0.5) >= a0 * (1 - 1e-9) - 1e-9
        assert (math.sqrt(N * s0 * a0) - 0.5 - 1e-9 <= h <= math.sqrt(N * s1 * a1) + 0.5 + 1e-9)


def test_corners_reach_every_position():
    "randint's exclusive upper bound must include H-h: the last row and column are reachable, uniformly."
    top, left = block_corners((20000,), (8, 10), 3, 4, G(1))
    cnt = torch.bincount(top * 7 + left, minlength=6 * 7).double()
    assert (top.max(), left.max()) == (5, 6) and cnt.numel() == 42 and (cnt > 0).all()
    expected = 20000 / 42
    assert ((cnt - expected).abs() / expected).max() < 0.25
    idx = block_indices(top, left, 3, 4, 10)
    assert idx.max() == 79 and torch.bincount(idx.flatten(), minlength=80).gt(0).all()


# --------------------------------------------------------------------------- generators: properties over many configs

configs = st.fixed_dictionaries(dict(
    H=st.integers(4, 16), W=st.integers(4, 16), num_levels=st.integers(1, 3),
    e0=st.floats(0.5, 1.0), p0=st.floats(0.05, 0.3), dp=st.floats(0, 0.1),
    a0=st.floats(0.4, 1.0), a1=st.floats(1.0, 2.5),
    npred=st.integers(1, 5), min_keep=st.integers(0, 12), allow_overlap=st.booleans(), nenc=st.integers(1, 2),
    B=st.integers(1, 64), seed=st.integers(0, 2**31)))


def build(c):
    return HierarchicalMaskGenerator(grid=(c['H'], c['W']), num_levels=c['num_levels'], enc_scale=(c['e0'], 1.0),
                                     pred_scale=(c['p0'], min(c['p0'] + c['dp'], 1.0)), aspect=(c['a0'], c['a1']),
                                     nenc=c['nenc'], npred=c['npred'], min_keep=c['min_keep'],
                                     allow_overlap=c['allow_overlap'])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(c=configs)
def test_generator_invariants(c):
    "For any valid configuration: shapes, ranges, rectangles, disjointness, min_keep, determinism."
    try: gen = build(c)
    # rejected at construction, with a message naming a parameter
    except ValueError as e:
        assert any(k in str(e) for k in ('grid', 'min_keep', 'pred_scale', 'num_levels')), str(e)
        assume(False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mc, mt = gen(c['B'], G(c['seed']))
        check_masks(gen, c['B'], mc, mt)
        mc2, mt2 = gen(c['B'], G(c['seed']))
    assert torch.equal(mc, mc2) and all(torch.equal(a, b) for a, b in zip(mt, mt2))
    if c['nenc'] > 1: assert mc.shape[1] == c['nenc']


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(c=configs)
def test_one_level_is_ijepa(c):
    "HierarchicalMaskGenerator(num_levels=1) gives exactly MultiBlockMaskGenerator's masks for the same random state."
    kw = dict(grid=(c['H'], c['W']), enc_scale=(c['e0'], 1.0), pred_scale=(c['p0'], min(c['p0'] + c['dp'], 1.0)),
              aspect=(c['a0'], c['a1']), nenc=c['nenc'], npred=c['npred'], min_keep=c['min_keep'],
              allow_overlap=c['allow_overlap'])
    try: mb = MultiBlockMaskGenerator(**kw)
    except ValueError: assume(False)
    hg = HierarchicalMaskGenerator(num_levels=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        c1, t1 = mb(c['B'], G(c['seed'])); c2, t2 = hg(c['B'], G(c['seed']))
    assert torch.equal(c1, c2) and len(t2) == 1 and torch.equal(t1, t2[0])


def test_thousands_of_samples_paper_defaults():
    "4096 samples, 14×14 grid, paper defaults: every invariant, area distribution, edge reachability, seeds."
    gen = MultiBlockMaskGenerator(grid=(14, 14))
    g, areas, keeps = G(0), [], []
    seen = torch.zeros(196, dtype=torch.bool)
    for _ in range(16):
        mc, mt = gen(256, g)
        check_masks(gen, 256, mc, mt)
        areas.append(mt.shape[-1] / 196); keeps.append(gen.last_stats['ctx_keep'])
        seen[mt.flatten()] = True
        h, w = gen.last_stats['tgt_sizes'][0]
        assert 0.15 - 0.05 <= h * w / 196 <= 0.2 + 0.05                     # inside the scale range up to rounding
        assert 0.75 * 0.8 <= h / w <= 1.5 * 1.25                             # inside the aspect range up to rounding
        assert gen.last_stats['ctx_size'][0] == gen.last_stats['ctx_size'][1]   # the context block is square (aspect 1)
    assert seen.all(), "some patch (e.g. the last row/column) is never a target"
    assert 0.15 <= np.mean(areas) <= 0.2, f"mean target area {np.mean(areas):.3f} outside the configured (0.15, 0.2)"
    a = gen(64, G(1)); b = gen(64, G(2))
    assert not torch.equal(a[1], b[1]), "different seeds must give different masks"
    print(f"14x14 paper defaults: context keeps {np.mean(keeps):.1%} of the grid after trimming")


def test_global_rng_when_no_generator():
    "generator=None uses torch's global RNG, so torch.manual_seed makes it reproducible."
    gen = MultiBlockMaskGenerator(grid=(14, 14))
    torch.manual_seed(5); a = gen(8)
    torch.manual_seed(5); b = gen(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_trimming_drops_random_patches():
    "Trimming to the batch minimum must not always drop the last patches in raster order (I-JEPA keeps the first K)."
    gen = MultiBlockMaskGenerator(grid=(14, 14))
    last_kept = []
    for s in range(20):
        mc, _ = gen(64, G(s))
        last_kept.append(mc[:, -1].float().mean().item())
    assert max(last_kept) > 150, "the context's last index is always small: patches are trimmed from the end"


def test_hierarchical_targets_index_pooled_grids():
    "Level ℓ's indices index the ⌊H/2^ℓ⌋×⌊W/2^ℓ⌋ grid; the context avoids every level's full-grid patches."
    gen = HierarchicalMaskGenerator(grid=(14, 14), num_levels=3)
    assert gen.levels == [(14, 14), (7, 7), (3, 3)] and gen.npred == [4, 1, 1]
    for s in range(8):
        mc, mt = gen(128, G(s))
        cov = check_masks(gen, 128, mc, mt)
        assert mt[2].max() < 9
        assert (cov.sum(1) >= 16).all()                                 # a level-2 target alone covers ≥ 4×4 patches


# --------------------------------------------------------------------------- small grids, relaxations, bad input

def run_with_timeout(f, seconds):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault('v', f()), daemon=True)
    t.start(); t.join(seconds)
    assert not t.is_alive(), f"did not return within {seconds}s (hang)"
    return out['v']


def test_8x8_min_keep_10_never_hangs():
    "The reference loops forever here; ours returns at once, keeps ≥ min_keep, and reports the keep ratio."
    def go():
        gen = MultiBlockMaskGenerator(grid=(8, 8), min_keep=10)
        res = [gen(256, G(s)) + (dict(gen.last_stats),) for s in range(10)]
        return gen, res
    gen, res = run_with_timeout(go, 20)
    keeps = []
    for mc, mt, st_ in res:
        gen.last_stats = st_
        check_masks(gen, 256, mc, mt)
        assert mc.shape[1] >= 10
        keeps.append(st_['ctx_keep'])
    print(f"8x8, min_keep=10: context keeps {np.mean(keeps):.1%} of 64 patches (min {min(keeps):.1%})")


@pytest.mark.parametrize('L', [1, 2, 3])
def test_preset_8x8(L):
    gen = HierarchicalMaskGenerator(num_levels=L, **preset_8x8(L))
    for s in range(20):
        mc, mt = gen(128, G(s))
        check_masks(gen, 128, mc, mt)
        assert gen.last_stats['relaxed'] == 0 and mc.shape[1] >= 16


def test_relaxation_is_bounded_and_reported():
    "With no redraws allowed, infeasible samples keep their best context, a warning says so, and nothing hangs."
    gen = MultiBlockMaskGenerator(grid=(8, 8), min_keep=20, max_tries=0)
    with pytest.warns(UserWarning, match='could not keep min_keep=20'):
        relaxed = 0
        for s in range(20):
            mc, mt = gen(256, G(s)); relaxed += gen.last_stats['relaxed']
            check_masks(gen, 256, mc, mt)
    assert relaxed > 0
    gen20 = MultiBlockMaskGenerator(grid=(8, 8), min_keep=20)            # with redraws the same settings meet min_keep
    for s in range(20):
        mc, _ = gen20(256, G(s))
        assert gen20.last_stats['relaxed'] == 0 and mc.shape[1] >= 20


@pytest.mark.parametrize('kw,msg', [
    (dict(grid=(8,)), 'grid must be (h, w)'),
    (dict(grid=(8, 0)), 'grid must be (h, w)'),
    (dict(pred_scale=(0.3, 0.2)), 'pred_scale = (0.3, 0.2) has min > max'),
    (dict(enc_scale=(0.5, 1.2)), 'enc_scale = (0.5, 1.2) must lie in (0.0, 1.0]'),
    (dict(pred_scale=(-0.1, 0.2)), 'pred_scale = (-0.1, 0.2) must lie in (0.0, 1.0]'),
    (dict(aspect=(2.0, 1.0)), 'aspect = (2.0, 1.0) has min > max'),
    (dict(aspect=(0.0, 1.0)), 'aspect = (0.0, 1.0) must lie in (0.0, inf)'),
    (dict(grid=(4, 4), min_keep=17), 'larger than the grid'),
    (dict(grid=(8, 8), min_keep=40), 'min_keep=40'),
    (dict(grid=(3, 3), pred_scale=(0.02, 0.05), min_keep=1), 'grid too small'),
    (dict(npred=0), 'npred must be an int in [1, inf], got 0'),
    (dict(nenc=0), 'nenc must be an int in [1, inf], got 0'),
    (dict(min_keep=-1), 'min_keep must be an int in [0, inf], got -1'),
    (dict(pred_scale=0.2), 'pred_scale must be a (min, max) pair'),
])
def test_bad_input_raises_at_construction(kw, msg):
    with pytest.raises((ValueError, TypeError), match=None) as e:
        MultiBlockMaskGenerator(**kw)
    assert msg in str(e.value), str(e.value)


def test_bad_hierarchical_input():
    with pytest.raises(ValueError, match='too small for num_levels=4'):
        HierarchicalMaskGenerator(grid=(4, 4), num_levels=4)
    with pytest.raises(ValueError, match='per-level values'): HierarchicalMaskGenerator(num_levels=2, npred=(4, 1, 1))
    with pytest.raises(ValueError, match='batch_size'): MultiBlockMaskGenerator()(0)


# --------------------------------------------------------------------------- apply_masks, nenc, allow_overlap

def test_apply_masks_matches_loop():
    x = torch.randn(5, 30, 7)
    idx2 = torch.randint(0, 30, (5, 9)); idx3 = torch.randint(0, 30, (5, 3, 4))
    assert torch.equal(apply_masks(x, idx2), torch.stack([x[b, idx2[b]] for b in range(5)]))
    assert torch.equal(apply_masks(x, idx3), torch.stack([torch.stack([x[b, i] for i in idx3[b]]) for b in range(5)]))
    with pytest.raises(ValueError, match=r'\[B, N, D\]'): apply_masks(x[0], idx2)
    with pytest.raises(ValueError, match='batch sizes differ'): apply_masks(x, idx2[:2])


def test_allow_overlap_gives_full_context_block():
    gen = MultiBlockMaskGenerator(grid=(14, 14), allow_overlap=True)
    mc, mt = gen(32, G(0))
    he, we = gen.last_stats['ctx_size']
    assert mc.shape[1] == he * we                                             # nothing removed, nothing trimmed


def test_nenc_two_contexts():
    gen = MultiBlockMaskGenerator(grid=(14, 14), nenc=2)
    mc, mt = gen(16, G(0))
    assert mc.shape[:2] == (16, 2)
    check_masks(gen, 16, mc, mt)


# --------------------------------------------------------------------------- DataLoader workers

class _DS(torch.utils.data.Dataset):
    def __len__(self): return 48
    def __getitem__(self, i): return torch.full((3,), float(i)), i


def _epoch(seed, workers, gen_seed=0):
    gen = MultiBlockMaskGenerator(**preset_8x8())
    dl = torch.utils.data.DataLoader(_DS(), batch_size=8, shuffle=True, num_workers=workers,
                                     generator=torch.Generator().manual_seed(seed),
                                     collate_fn=MaskCollator(gen, seed=gen_seed))
    return [(x, y, mc, mt) for x, y, mc, mt in dl]


def test_collator_two_workers_reproducible():
    a, b = _epoch(0, 2), _epoch(0, 2)
    assert len(a) == 6
    for (x1, y1, c1, t1), (x2, y2, c2, t2) in zip(a, b):
        assert torch.equal(y1, y2) and torch.equal(c1, c2) and torch.equal(t1, t2)
    # the two workers do not repeat each other's masks, and another loader seed changes them
    assert not torch.equal(a[0][3], a[1][3])
    c = _epoch(1, 2)
    assert any(not torch.equal(p[3], q[3]) for p, q in zip(a, c))
    d = _epoch(0, 2, gen_seed=1)
    assert any(not torch.equal(p[3], q[3]) for p, q in zip(a, d))


def test_collator_main_process_reproducible():
    a, b = _epoch(0, 0), _epoch(0, 0)
    assert all(torch.equal(p[2], q[2]) and torch.equal(p[3], q[3]) for p, q in zip(a, b))
    assert a[0][0].shape == (8, 3) and a[0][2].shape[0] == 8


def test_collator_rejects_non_callable():
    with pytest.raises(TypeError, match='mask_gen'): MaskCollator(3)


def test_explorer_static_outside_a_kernel():
    import matplotlib; matplotlib.use('Agg')
    from hjepa.masking import mask_explorer, _has_widget_frontend
    assert not _has_widget_frontend()
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    fig = mask_explorer(img, grid=(8, 8), num_levels=2, npred=3, min_keep=8)
    assert len(fig.axes) == 2


def test_explorer_widgets_update_in_a_shell():
    "Widgets forced on in an IPython shell: a figure, then sliders; moving one redraws, a bad value shows the error."
    from execnb.shell import CaptureShell
    sh = CaptureShell()
    out = sh.run('''
import numpy as np, IPython.display as D
shown, orig = [], D.display
D.display = lambda *a, **k: (shown.append(a[0]), orig(*a, **k))[1]
from hjepa.masking import mask_explorer
img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
mask_explorer(img, grid=(8, 8), interactive=True, npred=3, min_keep=8)
box = [x for x in shown if type(x).__name__ == 'VBox'][0]
sliders = {c.description: c for c in box.children[:-1]}
sliders['seed'].value = 5
ok_msg = box.children[-1].value
sliders['min_keep'].value = 60
bad_msg = box.children[-1].value
''')
    assert sh.exc is None, sh.exc
    kinds = [k for o in out for k in o.get('data', {})]
    assert kinds.count('image/png') >= 2 and 'application/vnd.jupyter.widget-view+json' in kinds
    assert set(sh.user_ns['sliders']) == {'pred_scale', 'aspect', 'npred', 'num_levels', 'min_keep', 'seed'}
    assert sh.user_ns['ok_msg'] == '' and 'min_keep=60' in sh.user_ns['bad_msg']


def test_shared_helpers_come_from_core():
    "masking uses core's one_thread and checks (one copy of each); the old import path still works."
    import hjepa.core as core, hjepa.masking as masking
    assert masking.one_thread is core.one_thread
    assert not hasattr(masking, '_pair') and not hasattr(masking, '_count')


def test_level_to_patches_stays_on_the_indices_device():
    "The model calls level_to_patches on GPU indices: offsets must be built on idx's device (meta stands in for cuda)."
    out = level_to_patches(torch.tensor([[5]], device='meta'), (8, 8), 1)
    assert out.device.type == 'meta' and out.shape == (1, 4)



# hjepa.masking.__all__ before chapter 01_blocks took the block geometry out of it, and the names that moved
OLD_MASKING_ALL = ['block_size', 'block_indices', 'block_corners', 'apply_masks', 'level_to_patches',
                   'HierarchicalMaskGenerator', 'MultiBlockMaskGenerator', 'preset_8x8', 'MaskCollator', 'show_masks',
                   'mask_explorer']
MOVED_TO_BLOCKS = ['block_size', 'block_indices', 'block_corners', 'apply_masks', 'level_to_patches']


def test_every_old_name_still_imports_from_masking():
    "Every name hjepa.masking exported before the split still imports from it; a moved name is blocks' own object."
    import hjepa.blocks as blocks, hjepa.masking as masking
    assert sorted(blocks.__all__) == sorted(MOVED_TO_BLOCKS), f"hjepa.blocks exports {blocks.__all__}"
    for name in OLD_MASKING_ALL:
        assert name in masking.__all__, f"{name} fell out of hjepa.masking.__all__"
        ns = {}
        exec(f"from hjepa.masking import {name}", ns)
        assert ns[name] is getattr(masking, name)
        if name in MOVED_TO_BLOCKS:
            assert ns[name] is getattr(blocks, name), f"hjepa.masking.{name} is a copy, not hjepa.blocks.{name}"
            assert ns[name].__module__ == 'hjepa.blocks'
        else: assert not hasattr(blocks, name), f"{name} belongs to hjepa.masking, found in hjepa.blocks"
    assert masking._box_sums is blocks._box_sums                          # the generators use blocks' box sums
