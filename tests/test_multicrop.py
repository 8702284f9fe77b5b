"Tests for hjepa.multicrop that a notebook cannot show: real DataLoader workers, many seeds, property checks."

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader

from hjepa.data import make_shapes, ArrayImageDataset
from hjepa.multicrop import (MultiCropTransform, AdaptiveMultiCropTransform, EvalTransform, MultiCropDataset,
                             MultiCropCollate, MultiCropMaskGenerator, STRATEGIES, sample_crop_boxes, normalise_boxes,
                             box_to_patch_indices, crop_patch_centers, to_crop_grid, local_positions)

SMALL = dict(global_size=16, local_size=8, num_local=3, patch_size=4)


def coord_image(H=60, W=90):
    "An RGB image whose red channel is x/W and green channel is y/H: crops reveal where they came from."
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([(x + 0.5) / W, (y + 0.5) / H, np.zeros_like(x, float)], -1)
    return (a * 255).round().astype(np.uint8)


def shapes_ds(n=12, size=32):
    imgs, labs = make_shapes(n, size, seed=0)
    return ArrayImageDataset(imgs, labs, name='shapes')


# ---------------------------------------------------------------- boxes
@settings(max_examples=60, deadline=None)
@given(H=st.integers(8, 300), W=st.integers(8, 300), lo=st.floats(0.02, 1.0), span=st.floats(0, 1),
       seed=st.integers(0, 2**31))
def test_boxes_fit_and_keep_their_scale(H, W, lo, span, seed):
    hi = min(1.0, lo + span)
    bx = sample_crop_boxes((H, W), 200, (lo, hi), generator=torch.Generator().manual_seed(seed))
    t, l, h, w = bx.T
    assert (t >= 0).all() and (l >= 0).all() and (t + h <= H).all() and (l + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    frac = (h * w).double() / (H * W)
    tol = (h + w + 1).double() / (H * W)                 # rounding h and w to whole pixels (and at least 1 px)
    assert (frac >= lo - tol).all() and (frac <= hi + tol).all(), (frac.min(), frac.max(), lo, hi)
    nb = normalise_boxes(bx, (H, W))
    assert (nb >= 0).all() and (nb <= 1).all() and (nb[:, 2] > nb[:, 0]).all() and (nb[:, 3] > nb[:, 1]).all()


def test_boxes_reach_every_position_and_honour_the_ratio():
    g = torch.Generator().manual_seed(0)
    bx = sample_crop_boxes((100, 100), 20000, (0.05, 0.1), ratio=(0.5, 2.0), generator=g)
    t, l, h, w = bx.T
    assert t.min() == 0 and l.min() == 0 and (t + h).max() == 100 and (l + w).max() == 100
    r = w.double() / h.double()                          # small boxes always fit: the ratio must stay in range
    assert r.min() > 0.5 * 0.8 and r.max() < 2.0 * 1.25
    assert r.min() < 0.6 and r.max() > 1.7                # and the whole range is used
    assert abs(torch.log(r).mean()) < 0.03                 # log-uniform ratio is centred on 1


def test_area_fraction_is_uniform_over_the_scale_range():
    bx = sample_crop_boxes((400, 400), 20000, (0.05, 0.4), generator=torch.Generator().manual_seed(1))
    frac = (bx[:, 2] * bx[:, 3]).double() / 160000
    assert abs(frac.mean() - 0.225) < 0.005
    q = torch.quantile(frac, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert abs(q[0] - 0.1375) < 0.01 and abs(q[1] - 0.3125) < 0.01


# ---------------------------------------------------------------- transform
@pytest.mark.parametrize('G,L,sg,sl', [(2, 0, 16, 8), (1, 5, 12, 4), (3, 2, 20, 10)])
def test_crop_sizes_and_counts(G, L, sg, sl):
    t = MultiCropTransform(global_size=sg, local_size=sl, num_global=G, num_local=L, seed=0)
    out = t(coord_image())
    assert out['global'].shape == (G, 3, sg, sg) and out['local'].shape == (L, 3, sl, sl)
    assert out['global_boxes'].shape == (G, 4) and out['local_boxes'].shape == (L, 4)
    assert out['global_flips'].shape == (G,) and out['local_flips'].shape == (L,)
    assert out['global_flips'].dtype == torch.bool


def test_grey_and_tensor_inputs():
    t = MultiCropTransform(**SMALL, seed=0)
    grey = make_shapes(1, 32)[0][0][:, :, 0]
    assert t(grey)['global'].shape == (2, 1, 16, 16)
    assert t(torch.rand(3, 32, 32))['local'].shape == (3, 3, 8, 8)


def test_boxes_say_where_the_pixels_came_from():
    "A crop of the coordinate image has mean red = box centre x and mean green = box centre y; flips reverse red."
    img = coord_image(120, 180)
    t = MultiCropTransform(global_size=32, local_size=16, num_local=6, normalize=False, jitter_p=0, global_blur_p=0,
                           seed=3)
    for _ in range(5):
        out = t(img)
        for grp in ('global', 'local'):
            x, b, f = out[grp], out[grp + '_boxes'], out[grp + '_flips']
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            assert torch.allclose(x[:, 0].mean((1, 2)), cx, atol=0.02), (grp, x[:, 0].mean((1, 2)), cx)
            assert torch.allclose(x[:, 1].mean((1, 2)), cy, atol=0.02)
            slope = x[:, 0, :, -1].mean(-1) - x[:, 0, :, 0].mean(-1)        # right edge minus left edge
            assert ((slope < 0) == f).all(), (slope, f)


def test_box_scales_match_each_group():
    t = MultiCropTransform(**SMALL, global_scale=(0.5, 0.9), local_scale=(0.05, 0.2), seed=1)
    img = coord_image(200, 300)
    for _ in range(20):
        out = t(img)
        for grp, (lo, hi) in (('global', (0.5, 0.9)), ('local', (0.05, 0.2))):
            b = out[grp + '_boxes']
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            assert ((area > lo - 0.01) & (area < hi + 0.01)).all(), (grp, area)


def test_determinism_under_a_seed_or_generator():
    img = coord_image()
    a, b = MultiCropTransform(**SMALL, seed=5)(img), MultiCropTransform(**SMALL, seed=5)(img)
    c = MultiCropTransform(**SMALL, seed=6)(img)
    for k in a: assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a['local_boxes'], c['local_boxes'])
    t = MultiCropTransform(**SMALL)
    d = t(img, generator=torch.Generator().manual_seed(9)); e = t(img, generator=torch.Generator().manual_seed(9))
    for k in d: assert torch.equal(d[k], e[k]), k


@pytest.mark.parametrize('kw,msg', [(dict(num_local=-1), 'num_local'), (dict(global_size=0), 'global_size'),
                                    (dict(global_scale=(0.9, 0.4)), r'global_scale = \(0.9, 0.4\) has min > max'),
                                    (dict(local_scale=(0, 0.4)), r'local_scale = \(0, 0.4\) must lie in \(0.0, 1.0\]'),
                                    (dict(ratio=(0, 2)), r'ratio = \(0, 2\) must lie in \(0.0, inf\)'),
                                    (dict(flip_p=2), 'flip_p'),
                                    (dict(local_size=10, patch_size=4), 'local_size: .*divisible'),
                                    (dict(jitter=(0.2, 1.5, 0.2)), 'jitter')])
def test_bad_arguments_name_the_parameter(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg): MultiCropTransform(**kw)


def test_eval_transform():
    ev = EvalTransform(24)
    x = ev(coord_image(60, 90))
    assert x.shape == (3, 24, 24) and torch.equal(x, ev(coord_image(60, 90)))
    raw = EvalTransform(24, normalize=False)(coord_image(60, 90))
    assert abs(raw[0].mean() - 0.5) < 0.02 and abs(raw[1].mean() - 0.5) < 0.02      # centred crop
    assert EvalTransform(16)(torch.rand(1, 28, 28)).shape == (1, 16, 16)


def test_adaptive_schedule_monotone_and_bounded():
    ad = AdaptiveMultiCropTransform(num_local=(2, 8), warmup_epochs=10, global_size=16, local_size=8)
    counts = [ad.locals_at(e)[0] for e in range(15)]
    assert counts[0] == 2 and counts[10:] == [8] * 5 and all(a <= b for a, b in zip(counts, counts[1:]))
    lows = [ad.locals_at(e)[1][0] for e in range(15)]
    assert lows[0] == 0.2 and abs(lows[-1] - 0.05) < 1e-9 and all(a >= b for a, b in zip(lows, lows[1:]))
    with pytest.raises(ValueError, match='warmup_epochs'): AdaptiveMultiCropTransform(warmup_epochs=0)


# ---------------------------------------------------------------- geometry
def test_patch_centres_round_trip_and_indices():
    g = torch.Generator().manual_seed(0)
    boxes = normalise_boxes(sample_crop_boxes((50, 70), 30, (0.1, 1.0), generator=g), (50, 70))
    flips = torch.rand(30, generator=g) < 0.5
    pts = crop_patch_centers(boxes, flips, (3, 5))                       # [30, 15, 2]
    rc = to_crop_grid(pts, boxes, flips, (3, 5))
    want = torch.stack(torch.meshgrid(torch.arange(3.), torch.arange(5.), indexing='ij'), -1).view(15, 2)
    assert torch.allclose(rc, want.expand(30, -1, -1), atol=1e-4)
    assert ((pts >= 0) & (pts <= 1)).all()
    # a box's patch indices are exactly the full-grid patches whose centre lies in it
    for b in boxes[:10]:
        idx = box_to_patch_indices(b, (10, 14))
        cy, cx = (idx // 14 + 0.5) / 10, (idx % 14 + 0.5) / 14
        assert ((cx >= b[0]) & (cx < b[2]) & (cy >= b[1]) & (cy < b[3])).all()
        n = int((((torch.arange(10) + .5) / 10 >= b[1]) & ((torch.arange(10) + .5) / 10 < b[3])).sum() *
                (((torch.arange(14) + .5) / 14 >= b[0]) & ((torch.arange(14) + .5) / 14 < b[2])).sum())
        assert len(idx) == n


def test_local_positions_land_inside_a_containing_global_crop():
    gb = torch.tensor([[[0., 0., 1., 1.], [0.5, 0.5, 1., 1.]]]); gf = torch.tensor([[False, True]])
    lb = torch.tensor([[[0.5, 0.5, 0.75, 0.75]]]); lf = torch.tensor([[False]])
    pos = local_positions(gb, gf, lb, lf, (2, 2), (8, 8))                # [1, G=2, L=1, 4, 2]
    assert pos.shape == (1, 2, 1, 4, 2)
    # in the whole-image crop the local quarter [0.5, 0.75] holds patch centres 4.5 and 5.5 of an 8-grid, minus 0.5
    assert torch.allclose(pos[0, 0, 0], torch.tensor([[4.5, 4.5], [4.5, 5.5], [5.5, 4.5], [5.5, 5.5]]) - 0.5)
    # in the flipped bottom-right crop it is the top-left quarter, mirrored: columns 7 - c
    assert torch.allclose(pos[0, 1, 0, :, 0], torch.tensor([0.5, 0.5, 2.5, 2.5]))
    assert torch.allclose(pos[0, 1, 0, :, 1], torch.tensor([6.5, 4.5, 6.5, 4.5]))


# ---------------------------------------------------------------- strategies
def lift_targets(masks_tgt, grid):
    "Boolean [R, H*W] of full-grid patches covered by any level's target."
    H, W = grid; R = masks_tgt[0].shape[0]
    cov = torch.zeros(R, H, W, dtype=torch.bool)
    for l, t in enumerate(masks_tgt):
        Wl, k = W >> l, 2 ** l
        r, c = (t // Wl).flatten(1), (t % Wl).flatten(1)
        for dy in range(k):
            for dx in range(k): cov[torch.arange(R)[:, None], r * k + dy, c * k + dx] = True
    return cov.flatten(1)


@settings(max_examples=25, deadline=None)
@given(strategy=st.sampled_from(STRATEGIES), B=st.integers(1, 6), G=st.integers(1, 3), L=st.integers(2, 6),
       levels=st.integers(1, 2), T=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_strategy_index_sets(strategy, B, G, L, levels, T, seed):
    gg, lg = (8, 8), (4, 4)
    mg = MultiCropMaskGenerator(strategy, gg, lg, num_global=G, num_levels=levels, local_targets=T, min_keep=4)
    m = mg(B, num_local=L, generator=torch.Generator().manual_seed(seed))
    R = B * G
    assert m['strategy'] == strategy
    assert torch.equal(m['crop_sample'], torch.arange(R) // G) and torch.equal(m['crop_global'], torch.arange(R) % G)
    ctx = m['masks_ctx']
    assert ctx.shape[0] == R and ctx.min() >= 0 and ctx.max() < 64
    assert all(len(set(r)) == len(r) for r in ctx.tolist())                     # unique context indices
    assert len(m['masks_tgt']) == levels
    for l, t in enumerate(m['masks_tgt']):
        assert t.shape[0] == R and t.min() >= 0 and t.max() < (8 >> l) ** 2
    cmask = torch.zeros(R, 64, dtype=torch.bool).scatter_(1, ctx, True)
    assert not (cmask & lift_targets(m['masks_tgt'], gg)).any()                 # context ∩ targets = ∅
    if strategy == 'global_only':
        assert not any(k.startswith('local') for k in m)
    if strategy == 'global_with_local_context':
        assert m['local_ctx'].shape == (R, L, 16) and torch.equal(m['local_ctx'][R - 1, L - 1], torch.arange(16))
        assert torch.equal(m['local_ctx_crop'], torch.arange(L).expand(R, L))
        assert 'local_tgt' not in m
    if strategy == 'cross_crop_prediction':
        lt, lc = m['local_tgt'], m['local_tgt_crop']
        assert lt.shape[:2] == (R, T) and lc.shape == (R, T)
        assert lt.min() >= 0 and lt.max() < 16 and lc.min() >= 0 and lc.max() < L
        assert all(len(set(r)) == len(r) for r in lc.tolist())                   # distinct local crops per row
        assert all(len(set(b)) == len(b) for r in lt.tolist() for b in r)
        rows, cols = lt // 4, lt % 4                                             # each block is a rectangle
        h = rows.amax(-1) - rows.amin(-1) + 1; w = cols.amax(-1) - cols.amin(-1) + 1
        assert (h * w == lt.shape[-1]).all()
        assert 'local_ctx' not in m


def test_strategies_are_seeded_and_errors_are_clear():
    mg = MultiCropMaskGenerator('cross_crop_prediction', (8, 8), (4, 4), num_levels=2, min_keep=4)
    a = mg(3, 4, torch.Generator().manual_seed(0)); b = mg(3, 4, torch.Generator().manual_seed(0))
    c = mg(3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a['masks_ctx'], b['masks_ctx']) and torch.equal(a['local_tgt'], b['local_tgt'])
    assert not (torch.equal(a['local_tgt'], c['local_tgt']) and torch.equal(a['local_tgt_crop'], c['local_tgt_crop']))
    with pytest.raises(ValueError, match='choose one of'): MultiCropMaskGenerator('all_crops')
    with pytest.raises(ValueError, match='add local crops'): mg(2, num_local=0)
    with pytest.raises(ValueError, match='local_targets'): MultiCropMaskGenerator(local_targets=0)


# ---------------------------------------------------------------- loaders
def batches(num_workers, seed=0, epoch=0, persistent=False, n=3, strategy='cross_crop_prediction'):
    mds = MultiCropDataset(shapes_ds(), MultiCropTransform(**SMALL), seed=seed)
    mds.set_epoch(epoch)
    mg = MultiCropMaskGenerator(strategy, (4, 4), (2, 2), num_levels=1, min_keep=2, local_pred_scale=(0.25, 0.5))
    dl = DataLoader(mds, batch_size=4, shuffle=True, num_workers=num_workers, collate_fn=MultiCropCollate(mg),
                    generator=torch.Generator().manual_seed(seed), persistent_workers=persistent and num_workers > 0)
    return [b for _, b in zip(range(n), dl)]


def same(b1, b2):
    for k, v in b1.items():
        if torch.is_tensor(v): assert torch.equal(v, b2[k]), k
        elif isinstance(v, list): assert all(torch.equal(x, y) for x, y in zip(v, b2[k])), k


def test_two_workers_give_the_same_batches_as_the_main_process():
    w0, w2, w2b = batches(0), batches(2), batches(2)
    for a, b, c in zip(w0, w2, w2b): same(a, b); same(b, c)
    assert w0[0]['global'].shape == (4, 2, 3, 16, 16) and w0[0]['local_pos'].shape == (8, 3, 4, 2)
    other = batches(2, seed=1)
    assert not torch.equal(other[0]['local_boxes'], w0[0]['local_boxes'])
    # within a batch, samples differ (workers do not replay one copied generator)
    lb = w2[0]['local_boxes']
    assert len({tuple(x.flatten().tolist()) for x in lb}) == len(lb)


def test_epoch_reaches_persistent_workers():
    mds = MultiCropDataset(shapes_ds(8), AdaptiveMultiCropTransform(num_local=(1, 4), warmup_epochs=2, global_size=16,
                                                                    local_size=8), seed=0)
    dl = DataLoader(mds, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=MultiCropCollate())
    seen = []
    for epoch in range(3):
        mds.set_epoch(epoch)
        seen.append([b['local'].shape[1] for b in dl])
    assert seen == [[1, 1], [3, 3], [4, 4]], seen          # floor(1 + t*3 + 0.5) with t = 0, 0.5, 1


def test_a_seeded_transform_in_workers_repeats_its_crops():
    "The pitfall MultiCropDataset fixes: a transform's own generator is copied into each worker."
    imgs, labs = make_shapes(8, 32, seed=0)
    ds = ArrayImageDataset(np.repeat(imgs[:1], 8, 0), labs, transform=MultiCropTransform(**SMALL, seed=0))
    dl = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b[0][0])
    boxes = [o['local_boxes'] for o in dl]
    assert torch.equal(boxes[0], boxes[1])          # worker 0's first sample == worker 1's first sample


def test_the_pitfall_warns_inside_a_worker(monkeypatch):
    "Warnings in workers do not reach the main process, so fake the worker context here."
    monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: object())
    with pytest.warns(UserWarning, match='MultiCropDataset'): MultiCropTransform(**SMALL, seed=0)(coord_image())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')              # a per-call generator (what MultiCropDataset passes) is fine
        MultiCropTransform(**SMALL, seed=0)(coord_image(), generator=torch.Generator().manual_seed(0))


# the public names of hjepa.multicrop before the crop functions moved to hjepa.crops (chapter 02_crops)
OLD_ALL = ['IMAGENET_MEAN', 'IMAGENET_STD', 'COURSE_CROPS', 'STRATEGIES', 'sample_crop_boxes', 'normalise_boxes',
           'gaussian_blur', 'augment', 'MultiCropTransform', 'denormalize', 'show_crops', 'box_to_patch_indices',
           'crop_patch_centers', 'to_crop_grid', 'local_positions', 'EvalTransform', 'AdaptiveMultiCropTransform',
           'sample_seed', 'MultiCropDataset', 'MultiCropMaskGenerator', 'MultiCropCollate', 'show_batch']


def test_every_public_name_still_imports_from_multicrop():
    """The split into hjepa.crops + hjepa.multicrop changes no import: each old name is in multicrop's __all__, and a
    function that moved is the very object of hjepa.crops (re-exported, not a copy)."""
    import hjepa.crops as crops, hjepa.multicrop as mc
    assert set(OLD_ALL) <= set(mc.__all__), sorted(set(OLD_ALL) - set(mc.__all__))
    ns = {}
    exec('from hjepa.multicrop import *', ns)
    assert set(OLD_ALL) <= set(ns)
    for name in crops.__all__: assert getattr(mc, name) is getattr(crops, name), name
    assert set(crops.__all__) <= set(mc.__all__)


def test_range_and_count_checks_come_from_core():
    "multicrop's argument checks are core's: a bool or a float is not a count, and the error names the argument."
    with pytest.raises(ValueError, match='num_local must be an integer'): MultiCropTransform(num_local=2.0)
    with pytest.raises(ValueError, match='local_npred must be an int in'): MultiCropMaskGenerator(local_npred=0)
    with pytest.raises(ValueError, match=r'local_pred_scale = \(0.4, 0.1\) has min > max'):
        MultiCropMaskGenerator(local_pred_scale=(0.4, 0.1))
    with pytest.raises(TypeError, match=r'scale must be a \(min, max\) pair'): sample_crop_boxes((8, 8), 1, scale=0.5)
