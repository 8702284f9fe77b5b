"""Properties of hjepa.eval that a notebook does not show: invariances of the probes, determinism, chunking,
and probing the encoder inside a real Trainer checkpoint."""
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import TensorDataset

from hjepa.encoders import ViT
from hjepa.eval import (evaluate_checkpoint, extract_features, knn_predict, linear_probe, load_eval_encoder,
                        pixel_features, probe, standardize)


def _blobs(seed, n=240, D=6, C=3, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=g) * 2
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, D, generator=g), y


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), log_scale=st.lists(st.floats(-3, 3), min_size=6, max_size=6))
def test_linear_probe_invariant_to_feature_scaling(seed, log_scale):
    "Standardising makes the probe blind to per-feature affine rescaling (a probe without it is not)."
    X, y = _blobs(seed)
    a = linear_probe(X[:160], y[:160], X[160:], y[160:])
    s, shift = torch.tensor(log_scale).exp(), torch.randn(6) * 50
    b = linear_probe(X[:160] * s + shift, y[:160], X[160:] * s + shift, y[160:])
    assert abs(a['acc'] - b['acc']) <= 1 / 80 + 1e-9, (a, b)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 30), chunk=st.integers(1, 50))
def test_knn_cosine_scale_free_and_chunking_exact(seed, k, chunk):
    X, y = _blobs(seed, n=150)
    Xtr, ytr, Xte = X[:100], y[:100], X[100:]
    ref = knn_predict(Xtr, ytr, Xte, k=k)
    scale = torch.rand(50, 1, generator=torch.Generator().manual_seed(seed)) * 100 + 0.01
    assert torch.equal(knn_predict(Xtr, ytr, Xte * scale, k=k), ref)           # cosine ignores each vector's norm
    assert torch.equal(knn_predict(Xtr, ytr, Xte, k=k, chunk=chunk), ref)      # chunking changes nothing


def test_standardize_uses_train_statistics_only():
    tr, te = torch.randn(100, 4) * 5 + 2, torch.randn(30, 4) + 100
    a, b = standardize(tr, te)
    torch.testing.assert_close(a.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert b.mean() > 10                                                       # the shifted test split stays shifted


def test_probe_deterministic_and_better_than_chance():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    imgs = torch.rand(96, 1, 32, 32, generator=g) * 0.2
    # a bright band whose row depends on the class
    for c in range(3): imgs[y == c, :, 8 * c:8 * c + 10, :] += 0.8
    ds_tr, ds_te = TensorDataset(imgs[:64], y[:64]), TensorDataset(imgs[64:], y[64:])
    enc = ViT.from_preset('nano', in_chans=1)
    r1, r2 = probe(enc, ds_tr, ds_te), probe(enc, ds_tr, ds_te)
    assert (r1['linear'], r1['knn']) == (r2['linear'], r2['knn'])
    assert r1['linear'] > 0.6 and r1['knn'] > 0.6, r1
    assert pixel_features(ds_tr, size=16)[0].shape == (64, 256)


def test_evaluate_a_real_trainer_checkpoint(tmp_path):
    "The file the Trainer writes -> the EMA target encoder inside it, rebuilt from the weights' shapes alone."
    from hjepa.data import build_loader, load_dataset
    from hjepa.masking import HierarchicalMaskGenerator, MaskCollator, preset_8x8
    from hjepa.model import HJEPA
    from hjepa.trainer import Trainer
    torch.manual_seed(0)
    ds = load_dataset('synthetic', 'train', n=16)
    gen = HierarchicalMaskGenerator(num_levels=2, **preset_8x8(2))
    model = HJEPA.from_preset('nano', num_levels=2)
    tr = Trainer(model, build_loader(ds, batch_size=8, collate_fn=MaskCollator(gen)), max_steps=2, amp='off',
                 out_dir=tmp_path, ckpt_every=2, log_every=1)
    tr.fit()
    path = tmp_path / 'checkpoints' / 'latest.pt'
    enc = load_eval_encoder(path)
    x = torch.stack([ds[i][0] for i in range(4)]), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(extract_features(enc, x)[0], extract_features(model.target_encoder, x)[0])
    ctx = load_eval_encoder(path, key='context_encoder')
    assert not torch.allclose(extract_features(ctx, x)[0], extract_features(enc, x)[0])   # 2 steps moved them apart
    r = evaluate_checkpoint(path, ds, load_dataset('synthetic', 'test', n=16))
    assert r['n_train'] == 16 and r['n_test'] == 16 and 0 <= r['linear'] <= 1 and r['dim'] == 96


def test_eval_uses_cores_one_thread():
    "One copy of one_thread (hjepa.core); the probe restores the caller's thread count."
    import hjepa.core, hjepa.eval
    assert hjepa.eval.one_thread is hjepa.core.one_thread
    n = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.arange(40) % 2
    linear_probe(X, y, X, y, max_iter=5)
    assert torch.get_num_threads() == n
