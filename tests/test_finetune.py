"""Fine-tuning (chapter 14): the losses against closed forms, the mixing weights against pixel counts, TTA, the EMA
swap, best-weights early stopping, the run folder (written once, never clobbered), the timm round trip, bad paths."""
import json, math, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hjepa.config import Config, ConfigError, FinetuneConfig, load_finetune_config, to_dict
from hjepa.checkpoint import export_encoder
from hjepa.encoders import ViT
from hjepa.eval import encoder_kwargs
from hjepa.finetune import (Classifier, ModelEMA, RestoreBest, cutmix, cutmix_box, box_lam, export_timm, focal_loss,
                            finetune_run, layer_decay_groups, load_pretrained, load_timm, mixup, soft_targets,
                            timm_state_dict, tta_logits)

ROOT = Path(__file__).resolve().parent.parent


def _vit(seed=0):
    torch.manual_seed(seed)
    return ViT(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    "A 'pretrained' run folder: an encoder.pt with the encoder's kwargs and the default config, as hjepa train writes."
    d = tmp_path_factory.mktemp('pre')
    enc = _vit()
    export_encoder(enc, d / 'encoder.pt', meta={'encoder': encoder_kwargs(enc), 'config': to_dict(Config())})
    return d


def test_focal_is_cross_entropy_at_gamma_0_and_downweights_easy_examples():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 10, generator=g) * 2, torch.randint(0, 10, (64,), generator=g)
    assert torch.allclose(focal_loss(z, y, gamma=0), F.cross_entropy(z, y), atol=1e-6)
    easy, hard = torch.tensor([[8.0, 0, 0]]), torch.tensor([[0.0, 2, 2]])
    t = torch.tensor([0])
    r_easy = focal_loss(easy, t, 2) / focal_loss(easy, t, 0)
    r_hard = focal_loss(hard, t, 2) / focal_loss(hard, t, 0)
    p = F.softmax(easy, -1)[0, 0]
    assert torch.isclose(r_easy, (1 - p) ** 2, rtol=1e-4)           # exactly the (1-p)^γ factor
    assert r_easy < 1e-6 < 0.5 < r_hard
    # alpha weights the classes: one weight for the true class scales its loss exactly
    a = torch.ones(10); a[3] = 4.0
    y3 = torch.full((64,), 3)
    assert torch.allclose(focal_loss(z, y3, 2, alpha=a), 4 * focal_loss(z, y3, 2), rtol=1e-6)


def test_label_smoothing_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    z, y, eps, C = torch.randn(32, 7, generator=g), torch.randint(0, 7, (32,), generator=g), 0.2, 7
    logp = F.log_softmax(z, -1)
    want = -((1 - eps) * logp.gather(1, y[:, None])[:, 0] + eps / C * logp.sum(1)).mean()
    assert torch.allclose(focal_loss(z, y, 0, smoothing=eps), want, atol=1e-6)
    q = soft_targets(y, C, eps)
    assert torch.allclose(q.sum(1), torch.ones(32))
    assert torch.allclose(q.max(1).values, torch.full((32,), 1 - eps + eps / C))
    with pytest.raises(ValueError, match='label smoothing'): soft_targets(y, C, 1.0)


def test_mixup_and_cutmix_weights_equal_the_mixed_area():
    x, q, perm = torch.zeros(2, 1, 20, 24), torch.eye(2), torch.tensor([1, 0])
    x[1] = 1.0
    xm, qm = mixup(x, q, 0.25, perm)
    assert torch.allclose(qm[0], torch.tensor([0.25, 0.75])) and math.isclose(xm[0].mean().item(), 0.75, rel_tol=1e-6)
    clipped = 0
    for seed in range(60):
        xm, qm, lam, box = cutmix(x, q, 0.2, perm, torch.Generator().manual_seed(seed))
        share = xm[0].mean().item()                            # pixels of image 1 pasted into image 0
        assert math.isclose(qm[0, 1].item(), share, abs_tol=1e-6) and math.isclose(lam, 1 - share, abs_tol=1e-6)
        clipped += share < 0.8 - 0.05
    assert clipped > 0, "some boxes near the border must have been clipped (smaller than asked)"
    assert box_lam((0, 20, 0, 24), 20, 24) == 0 and box_lam(cutmix_box(20, 24, 1.0), 20, 24) == 1


def test_tta_of_identical_views_is_one_forward():
    m = Classifier(_vit(), 10).eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad(): one = m(x)
    assert torch.allclose(tta_logits(m, x, [lambda v: v] * 3), one, atol=1e-6)
    assert not torch.allclose(tta_logits(m, x, ['identity', 'shift']), one, atol=1e-6)   # other views do change it


def test_ema_apply_restore_round_trips_exactly():
    m = Classifier(_vit(), 10)
    ema = ModelEMA(m, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in m.parameters(): p.add_(1.0)
    ema.update(m)
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    ema.apply(m)
    assert not torch.equal(m.head.bias, trained['head.bias'])
    assert torch.allclose(m.head.bias, trained['head.bias'] - 0.5)         # 0.5·old + 0.5·(old + 1)
    ema.restore(m)
    assert all(torch.equal(v, trained[k]) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError, match='apply'): ema.restore(m)


class _FakeTrainer:
    def __init__(self, module): self.module, self.step, self.stopped = module, 0, None
    def stop(self, reason): self.stopped = reason


def test_early_stopping_restores_the_best_weights():
    m = Classifier(_vit(), 3)
    t, cb = _FakeTrainer(m), RestoreBest('val/acc', patience=2)
    snaps = {}
    for step, acc in enumerate([0.2, 0.6, 0.5, 0.4], 1):
        with torch.no_grad(): m.head.bias.fill_(float(step))
        t.step = step
        snaps[step] = m.head.bias.clone()
        cb.after_validate(t, {'val/acc': acc})
    assert t.stopped and cb.best_step == 2
    cb.after_fit(t)
    assert torch.equal(m.head.bias, snaps[2])


def test_layer_decay_groups_scale_by_depth():
    m = Classifier(_vit(), 10)
    gs = layer_decay_groups(m, 0.05, 0.5)
    by_layer = {g['layer']: g['lr_scale'] for g in gs}
    assert by_layer == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    ids = [id(p) for g in gs for p in g['params']]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())


def test_finetune_run_writes_its_folder_and_refuses_to_clobber(pre, tmp_path):
    out = tmp_path / 'ft'
    res = finetune_run(pre, out, overrides=['data.label_frac=0.03', 'train.max_steps=4', 'train.val_every=2',
                                            'eval.tta=[identity]', 'log.console=false', 'log.tensorboard=false'],
                       verbose=False)
    names = {p.name for p in out.iterdir()}
    assert {'config.yaml', 'metrics.jsonl', 'checkpoints', 'encoder.pt', 'results.json'} <= names
    saved = json.loads((out / 'results.json').read_text())
    assert saved['steps'] == 4 and {'test_acc', 'test_acc_tta', 'test_acc_ema', 'test_acc_ema_tta'} <= set(saved)
    assert load_finetune_config(out / 'config.yaml').train.max_steps == 4
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match='already holds'): finetune_run(pre, out, verbose=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before       # untouched
    assert res['run_dir'] == str(out)


def test_finetune_refuses_a_foreign_folder_before_writing(pre, tmp_path):
    (tmp_path / 'mine.txt').write_text('keep me')
    with pytest.raises(ConfigError, match='mine.txt'): finetune_run(pre, tmp_path, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mine.txt']


def test_bad_paths_give_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'missing')): load_pretrained(tmp_path / 'missing')
    (tmp_path / 'run').mkdir()
    with pytest.raises(FileNotFoundError, match='holds no encoder.pt'): load_pretrained(tmp_path / 'run')
    with pytest.raises(FileNotFoundError, match='missing'): finetune_run(tmp_path / 'missing', tmp_path / 'o')
    assert not (tmp_path / 'o').exists()                                           # nothing written


def test_timm_round_trip_gives_the_same_features(pre, tmp_path):
    pytest.importorskip('timm'); pytest.importorskip('safetensors')
    enc = load_pretrained(pre)[0].eval()
    f = export_timm(pre, tmp_path / 'enc.safetensors')
    m = load_timm(f)
    assert set(m.state_dict()) == set(timm_state_dict(enc))                        # every timm weight is given
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): a, b = m(x), enc(x).mean(1)
    assert a.shape == (6, 32) and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    with pytest.raises(FileExistsError): export_timm(pre, f)
    with pytest.raises(ValueError, match='safetensors'): export_timm(pre, tmp_path / 'enc.pt')


def test_bundled_finetune_yaml_is_the_defaults():
    raw = yaml.safe_load((ROOT / 'configs' / 'finetune.yaml').read_text())
    assert raw == to_dict(FinetuneConfig())
    assert load_finetune_config(ROOT / 'configs' / 'finetune.yaml') == FinetuneConfig()


def test_finetune_subprocess_tiny_run(pre, tmp_path):
    "The library entry point as a separate process (the CLI's `hjepa finetune` calls this function)."
    code = ("import sys; from hjepa.finetune import finetune_run; "
            "finetune_run(sys.argv[1], sys.argv[2], overrides=['data.label_frac=0.03', 'train.max_steps=2', "
            "'eval.tta=[identity]', 'log.console=false', 'eval.ema_decay=null'], verbose=False)")
    env = {**__import__('os').environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-c', code, str(pre), str(tmp_path / 'ft')], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / 'ft' / 'results.json').read_text())['steps'] == 2
    r2 = subprocess.run([sys.executable, '-c', code, str(pre), str(tmp_path / 'ft')], capture_output=True, text=True,
                        env=env, timeout=300)
    assert r2.returncode != 0 and 'already holds' in r2.stderr
