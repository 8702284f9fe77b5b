"""H-JEPA contracts on real masks from chapter 01, over several seeds: I-JEPA equality with one level,
gradient routing, the EMA step, and state_dict round trips (what the notebook shows once, checked broadly)."""
import io

import pytest
import torch
import torch.nn.functional as F

from hjepa.masking import HierarchicalMaskGenerator, MultiBlockMaskGenerator, apply_masks
from hjepa.masking import level_to_patches
from hjepa.model import HJEPA, default_level_weights, pool_grid

GEN3 = dict(grid=(8, 8), num_levels=3, npred=[3, 1, 1], pred_scale=[(0.1, 0.15), (0.125, 0.125), (0.25, 0.25)],
            min_keep=4)


def _model(levels=3, head='linear', seed=0, **kw):
    torch.manual_seed(seed)
    return HJEPA.from_preset('nano', in_chans=1, num_levels=levels, head=head, depth=2, **kw)


def _batch(B=4, seed=0):
    return torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ijepa_loss_by_hand(model, x, masks_ctx, masks_tgt):
    "I-JEPA's step as in its reference code: LN(target(x)) at the target blocks vs predictor(context(x_ctx))."
    with torch.no_grad():
        h = model.target_encoder(x)
        h = F.layer_norm(h, (h.size(-1),))
        B, M, K = masks_tgt.shape
        h = torch.stack([apply_masks(h, masks_tgt[:, m]) for m in range(M)], 1)     # block by block
    z = model.context_encoder(x, masks_ctx)
    z = model.predictor(z, masks_ctx, masks_tgt)
    return F.smooth_l1_loss(z, h)


@pytest.mark.parametrize('seed', [0, 1])
def test_one_level_identity_head_is_ijepa(seed):
    model = _model(levels=1, head='identity', seed=seed)
    x = _batch(seed=seed)
    mc, mt = MultiBlockMaskGenerator(grid=(8, 8), min_keep=4)(4, generator=torch.Generator().manual_seed(seed))
    out = model(x, mc, mt)
    loss = F.smooth_l1_loss(out.preds[0], out.targets[0])
    ref = _ijepa_loss_by_hand(model, x, mc, mt)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    # and the gradients agree too
    g1 = torch.autograd.grad(loss, list(model.predictor.parameters()))
    g2 = torch.autograd.grad(_ijepa_loss_by_hand(model, x, mc, mt), list(model.predictor.parameters()))
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_levels_change_the_targets_and_use_2d_cells():
    model = _model()
    x = _batch()
    mc, mt = HierarchicalMaskGenerator(**GEN3)(4, generator=torch.Generator().manual_seed(0))
    out = model(x, mc, mt)
    with torch.no_grad():
        z = model.target_encoder(x)
        for l in range(3):
            want = apply_masks(F.layer_norm(pool_grid(z, (8, 8), l), (96,)), mt[l])
            torch.testing.assert_close(out.targets[l], want)
    # a level-1 cell covers a 2x2 square of patches
    assert sorted(level_to_patches(torch.tensor([5]), (8, 8), 1).tolist()) == [18, 19, 26, 27]


@pytest.mark.parametrize('seed', [0, 1])
def test_gradients_reach_trainable_parts_and_never_the_target(seed):
    model = _model(seed=seed)
    mc, mt = HierarchicalMaskGenerator(**GEN3)(4, generator=torch.Generator().manual_seed(seed))
    out = model(_batch(seed=seed), mc, mt)
    sum(F.smooth_l1_loss(p, t) for p, t in zip(out.preds, out.targets)).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    for name, part in [('context_encoder', model.context_encoder), ('predictor', model.predictor),
                       *[(f'heads.{l}', h) for l, h in enumerate(model.heads)]]:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), f"a parameter of {name} got no gradient"
        assert sum(g.abs().sum() for g in grads) > 0, f"{name}: all gradients are zero"


def test_target_starts_equal_and_ema_step_is_exact():
    model = _model()
    for a, b in zip(model.context_encoder.state_dict().values(), model.target_encoder.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in model.context_encoder.parameters(): p.add_(torch.randn_like(p) * 0.1)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.target_encoder.parameters(), before))
    for m in (0.996, 0.5, 0.0):
        before = [p.clone() for p in model.target_encoder.parameters()]
        model.update_target(m)
        for p, b, c in zip(model.target_encoder.parameters(), before, model.context_encoder.parameters()):
            torch.testing.assert_close(p, m * b + (1 - m) * c.detach(), atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\]'): model.update_target(-0.1)


def test_state_dict_round_trip_keeps_target_and_outputs():
    model = _model()
    with torch.no_grad():
        for p in model.context_encoder.parameters(): p.add_(0.05)
    model.update_target(0.9)
    buf = io.BytesIO(); torch.save(model.state_dict(), buf); buf.seek(0)
    other = _model(seed=123)
    other.load_state_dict(torch.load(buf, weights_only=True))
    mc, mt = HierarchicalMaskGenerator(**GEN3)(4, generator=torch.Generator().manual_seed(0))
    x = _batch(4)
    with torch.no_grad():
        a, b = model(x, mc, mt), other(x, mc, mt)
    for p, q in zip(a.preds + a.targets, b.preds + b.targets): torch.testing.assert_close(p, q)


def test_bf16_autocast_step_is_finite():
    model = _model()
    mc, mt = HierarchicalMaskGenerator(**GEN3)(8, generator=torch.Generator().manual_seed(0))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(_batch(8), mc, mt)
        loss = sum(F.smooth_l1_loss(p.float(), t.float()) for p, t in zip(out.preds, out.targets))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.predictor.parameters())


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match='num_levels'): _model(levels=0)
    with pytest.raises(ValueError, match='too small for level'): _model(levels=5)
    with pytest.raises(ValueError, match='level_weights'): _model(level_weights=[1.0])
    with pytest.raises(ValueError, match="head must be"): _model(head='conv')
    model = _model()
    mc, mt = HierarchicalMaskGenerator(**GEN3)(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='num_levels=3'): model(_batch(2), mc, mt[:1])


@pytest.mark.parametrize('L', [1, 2, 3])
def test_default_level_weights_are_the_models_defaults(L):
    "The model takes its default per-level weights from default_level_weights (the one place they are defined)."
    assert _model(levels=L).level_weights == default_level_weights(L)


def test_default_level_weights_decay():
    w = default_level_weights(7)
    assert w[:3] == [1.0, 0.7, 0.5] and all(abs(b - 0.7 * a) < 1e-12 for a, b in zip(w[2:], w[3:]))
