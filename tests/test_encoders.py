"""Encoder properties over many sizes and index sets (hypothesis), and what a notebook cannot show:
state_dict portability across image sizes, deepcopy, bf16 autocast, and that the masking test catches a cheat."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hjepa.encoders import ViT, Predictor, TimmViT, sincos_2d

SETTINGS = dict(max_examples=8, deadline=None)


def _small_vit(img, patch, chans=1):
    torch.manual_seed(0)
    return ViT(img_size=img, patch_size=patch, in_chans=chans, embed_dim=32, depth=2, num_heads=4).eval()


def _rand_idx(B, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])


@settings(**SETTINGS)
@given(h=st.integers(1, 6), w=st.integers(1, 6), patch=st.sampled_from([2, 4, 8]), seed=st.integers(0, 10_000))
def test_vit_masking_properties(h, w, patch, seed):
    "Shapes for many image/patch sizes; all indices == no mask; index order only permutes the output."
    vit = _small_vit((h * patch, w * patch), patch)
    N = h * w
    x = torch.randn(2, 1, h * patch, w * patch, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = vit(x)
        assert full.shape == (2, N, 32)
        torch.testing.assert_close(vit(x, torch.arange(N).expand(2, N)), full, atol=1e-5, rtol=1e-5)
        K = max(1, N // 2)
        idx = _rand_idx(2, N, K, seed)
        out = vit(x, idx)
        assert out.shape == (2, K, 32)
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed + 1))
        torch.testing.assert_close(vit(x, idx[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)


class _IgnoresMask(ViT):
    "A cheat: encodes every token, then gathers (the masked tokens still take part in attention)."
    def forward(self, x, masks=None):
        out = super().forward(x)
        if masks is None: return out
        return torch.gather(out, 1, masks[..., None].expand(-1, -1, out.shape[-1]))


def _kept_tokens_are_isolated(vit, x, idx):
    with torch.no_grad():
        return (vit(x, idx[:, :4]) - vit(x, idx)[:, :4]).abs().max().item() > 1e-3


def test_masking_property_rejects_a_model_that_ignores_the_mask():
    x, idx = torch.randn(2, 1, 16, 16), _rand_idx(2, 16, 8, 0)
    good = _small_vit(16, 4)
    cheat = _IgnoresMask(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4).eval()
    cheat.load_state_dict(good.state_dict())
    assert _kept_tokens_are_isolated(good, x, idx)
    assert not _kept_tokens_are_isolated(cheat, x, idx)
    # and the cheat agrees with the real model on the full image, so only the masking test tells them apart
    with torch.no_grad(): torch.testing.assert_close(cheat(x), good(x))


def test_state_dict_has_no_position_table_and_ports_across_image_sizes():
    a, b = _small_vit(32, 4), _small_vit(16, 4)
    assert not any('pos' in k for k in a.state_dict())          # fixed sin-cos: nothing to save or interpolate
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(a(x), b(x))


def test_deepcopy_is_independent():
    a = _small_vit(16, 4)
    b = copy.deepcopy(a)
    with torch.no_grad(): next(b.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))


def test_bf16_autocast_close_to_fp32():
    vit = _small_vit(32, 4)
    x, idx = torch.randn(4, 1, 32, 32), _rand_idx(4, 64, 16, 0)
    with torch.no_grad():
        ref = vit(x, idx)
        with torch.autocast('cpu', dtype=torch.bfloat16): out = vit(x, idx)
    assert torch.isfinite(out).all()   # (the final LayerNorm runs in fp32 under autocast)
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


@settings(**SETTINGS)
@given(M=st.integers(1, 4), K=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_predictor_blocks_are_independent(M, K, seed):
    "Block m's prediction does not depend on the other blocks listed with it."
    torch.manual_seed(0)
    pred = Predictor(grid=(4, 4), embed_dim=32, predictor_embed_dim=16, depth=2, num_heads=2).eval()
    z, mc = torch.randn(2, 5, 32), _rand_idx(2, 16, 5, seed)
    mt = torch.randint(0, 16, (2, M, K), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = pred(z, mc, mt)
        assert out.shape == (2, M, K, 32)
        for m in range(M): torch.testing.assert_close(pred(z, mc, mt[:, m]), out[:, m:m + 1], atol=1e-5, rtol=1e-5)


def test_sincos_nearby_positions_are_more_similar():
    e = sincos_2d(64, (8, 8))
    sim = e @ e[3 * 8 + 3]
    assert sim.argmax() == 3 * 8 + 3
    assert sim[3 * 8 + 4] > sim[3 * 8 + 7] and sim[4 * 8 + 3] > sim[7 * 8 + 3]


def test_timm_adapter_with_class_token_and_errors():
    tv = TimmViT.create('vit_tiny_patch16_224', img_size=32, patch_size=8, in_chans=3, depth=1).eval()
    assert tv.model.num_prefix_tokens >= 1 and tv.grid == (4, 4)
    x, idx = torch.randn(2, 3, 32, 32), _rand_idx(2, 16, 6, 0)
    with torch.no_grad():
        torch.testing.assert_close(tv(x, torch.arange(16).expand(2, 16)), tv(x), atol=1e-4, rtol=1e-4)
        assert tv(x, torch.stack([idx, idx], 1)).shape == (2, 2, 6, 192)
    with pytest.raises(ValueError, match='patch grid has 16 tokens'): tv(x, idx + 16)
