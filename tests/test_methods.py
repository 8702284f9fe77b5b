"""Chapter 13: every method and crop-masking strategy trains through the one Trainer, from a config and the CLI."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hjepa.config import METHOD_NAMES, STRATEGY_NAMES, load_config, method_name
from hjepa.core import seed_everything
from hjepa.data import image_transform, load_dataset
from hjepa.encoders import ViT
from hjepa.losses import CombinedLoss, SIGRegLoss
from hjepa.masking import HierarchicalMaskGenerator, MaskCollator
from hjepa.methods import DINO, JEPA, METHODS, SIGReg, SimCLR, VICReg, Method
from hjepa.monitor import MultiLogger
from hjepa.multicrop import STRATEGIES, MultiCropCollate, MultiCropDataset, MultiCropMaskGenerator, MultiCropTransform
from hjepa.recipe import build_loaders, build_method, method_needs
from hjepa.trainer import Callback, Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
PRED = dict(predictor_embed_dim=16, depth=1, num_heads=2)


@pytest.fixture(scope='module')
def images():
    ds = load_dataset('digits', 'train', transform=image_transform(32, 'auto', 1))
    return [ds[i] for i in range(128)]


def crops(images, n=16, seed=0, strategy=None, num_local=2):
    tf = MultiCropTransform(global_size=32, local_size=16, num_local=num_local, flip_p=0.0, normalize=False,
                            patch_size=4)
    gen = None if strategy is None else MultiCropMaskGenerator(strategy, global_grid=(8, 8), local_grid=(4, 4),
                                                               num_levels=1, npred=[2], min_keep=16,
                                                               local_pred_scale=(0.25, 0.5))
    ds = MultiCropDataset(images, tf, seed=seed)
    return MultiCropCollate(gen, seed=seed)([ds[i] for i in range(n * seed, n * seed + n)])


def masked(images, levels=1, n=16, seed=0):
    gen = HierarchicalMaskGenerator(grid=(8, 8), num_levels=levels, npred=[2] * levels, min_keep=16)
    return MaskCollator(gen, seed=seed)(images[n * seed: n * seed + n])


class Record(Callback):
    "What a method can lower: its loss, or for DINO the KL to the teacher (the teacher's entropy is not the student's)."
    def __init__(self): self.values = []
    def after_step(self, trainer, metrics):
        self.values.append(float(metrics['loss']) - float(metrics.get('teacher_entropy', 0.0)))


def fit(method, batches, steps=16, lr=2e-3):
    rec = Record()
    tr = Trainer(method, batches, max_steps=steps, lr=lr, warmup_frac=0.0, weight_decay=0.0, weight_decay_end=None,
                 momentum=0.99, momentum_end=None, amp='off', logger=MultiLogger(), callbacks=[rec])
    tr.fit()
    return rec.values, tr


MAKERS = {
    'ijepa': lambda: JEPA(ViT(**TINY), num_levels=1, loss=CombinedLoss(vicreg_coeff=0.1), **PRED),
    'hjepa': lambda: JEPA(ViT(**TINY), num_levels=2, loss=CombinedLoss(vicreg_coeff=0.1), **PRED),
    'dino': lambda: DINO(ViT(**TINY), out_dim=32, hidden=32, bottleneck=8, warmup_teacher_epochs=0),
    'simclr': lambda: SimCLR(ViT(**TINY), proj_dim=16, hidden=32),
    'vicreg': lambda: VICReg(ViT(**TINY), proj_dim=32, hidden=32),
    'sigreg': lambda: SIGReg(ViT(**TINY), proj_dim=16, hidden=32),
}


@pytest.mark.parametrize('name', METHOD_NAMES)
def test_every_method_learns_a_few_batches(images, name):
    seed_everything(0)
    m = MAKERS[name]()
    assert m.name == name and isinstance(m, Method)
    batches = [masked(images, m.num_levels, seed=i) for i in range(4)] if m.needs == 'masks' else \
        [crops(images, seed=i) for i in range(4)]
    vals, _ = fit(m, batches)
    assert all(map(math.isfinite, vals)), vals
    assert sum(vals[-4:]) / 4 < sum(vals[:4]) / 4, f"{name}: the loss did not fall on average: {vals}"


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_every_crop_masking_strategy_trains_through_trainer(images, strategy):
    seed_everything(0)
    m = JEPA(ViT(**TINY), strategy=strategy, loss=CombinedLoss(vicreg_coeff=0.1), **PRED)
    assert m.needs == 'masked_crops'
    vals, tr = fit(m, [crops(images, seed=i, strategy=strategy) for i in range(4)])
    assert all(map(math.isfinite, vals)) and sum(vals[-4:]) < sum(vals[:4]), vals
    assert tr.step == 16


def test_method_registry_matches_the_config():
    assert tuple(METHODS) == METHOD_NAMES and STRATEGIES == STRATEGY_NAMES


def test_jepa_method_equals_hjepa_and_jepa_forward(images):
    from types import SimpleNamespace
    from hjepa.model import HJEPA
    from hjepa.trainer import jepa_forward
    seed_everything(0)
    m = JEPA(ViT(**TINY), num_levels=2, loss=CombinedLoss(vicreg_coeff=0.1), **PRED)
    b = masked(images, 2)
    fake = SimpleNamespace(model=lambda *a: HJEPA.forward(m, *a), loss_fn=m.loss, step=0,
                           level_weights_at=lambda s: None)
    assert torch.equal(m(b)[0], jepa_forward(fake, b)[0])
    m.level_schedule = lambda step: [1.0, 0.0]                      # the schedule is the method's: level 0 only
    loss, parts, _ = m(b, step=3)
    assert torch.allclose(parts['jepa'], parts['jepa_l0']) and float(parts['w_l1']) == 0.0


def test_dino_last_layer_frozen_in_epoch_0_then_trains(images):
    seed_everything(0)
    dino = DINO(ViT(**TINY), out_dim=32, hidden=32, bottleneck=8, freeze_last_layer=1)
    batches = [crops(images, seed=i) for i in range(2)]               # an epoch is two steps
    last, first = dino.student_head.last_layer.weight, dino.student_head.mlp[0].weight
    w0, m0 = last.detach().clone(), first.detach().clone()
    _, tr = fit(dino, batches, steps=2, lr=1e-3)
    assert tr.epoch == 0 and torch.equal(last.detach(), w0), "the last layer moved in epoch 0"
    assert not torch.equal(first.detach(), m0), "the rest of the head must train in epoch 0"
    teacher0 = dino.teacher_head.last_layer.weight.detach().clone()
    tr.max_steps = 4; tr.fit()
    assert tr.epoch == 1 and not torch.equal(last.detach(), w0), "the last layer must train after epoch 0"
    assert not torch.equal(dino.teacher_head.last_layer.weight.detach(), teacher0), "the teacher follows by EMA"
    assert all(not p.requires_grad for p in dino.target_encoder.parameters())
    # the weight rows are unit vectors whatever is stored: weight norm with a fixed gain of 1
    assert torch.allclose(F.normalize(last, dim=1).norm(dim=1), torch.ones(32))


def test_dino_teacher_temperature_warms_up(images):
    seed_everything(0)
    dino = DINO(ViT(**TINY), out_dim=32, hidden=32, bottleneck=8, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_epochs=2)
    b = crops(images)
    temps = [float(dino(b, epoch=e)[1]['teacher_temp']) for e in (0.0, 1.0, 2.0, 5.0)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_simclr_positive_is_the_other_view_of_the_same_image(images):
    seed_everything(0)
    m = SimCLR(ViT(**TINY), proj_dim=16, hidden=32).eval()
    g = crops(images)['global']                                          # [B, 2, C, S, S]
    twins = {'global': torch.stack([g[:, 0], g[:, 0]], 1)}
    strangers = {'global': torch.stack([g[:, 0], g[:, 0].roll(1, 0)], 1)}   # "positive" = another image's crop
    with torch.no_grad():
        l_same, p_same, _ = m(twins)
        l_wrong, p_wrong, _ = m(strangers)
    assert float(p_same['infonce_acc']) == 1.0 and float(p_wrong['infonce_acc']) < 0.3
    assert l_same < l_wrong


def test_lejepa_terms(images):
    seed_everything(0)
    m = SIGReg(ViT(**TINY), proj_dim=16, hidden=32, lam=0.05, sigreg=SIGRegLoss(num_slices=32, seed=0)).eval()
    b = crops(images, num_local=2)
    loss, parts, _ = m(b)
    assert torch.allclose(loss, 0.95 * parts['agree'] + 0.05 * parts['sigreg'], atol=1e-5)
    same = dict(b, local=b['global'][:, :1].expand(-1, 2, -1, -1, -1)[..., ::2, ::2])   # any change of the locals ...
    assert not torch.allclose(m(same)[1]['agree'], parts['agree'])                      # ... changes the agreement


def test_cross_crop_targets_address_the_right_crop_and_patches(images):
    seed_everything(0)
    m = JEPA(ViT(**TINY), strategy='cross_crop_prediction', **PRED)
    b = crops(images, strategy='cross_crop_prediction')
    z_ctx = m.context_encoder(b['global'].flatten(0, 1), b['masks_ctx'])
    pred, tgt = m.local_targets(b, z_ctx, b['local'])
    R, M, K = b['local_tgt'].shape
    assert pred.shape == tgt.shape == (R, M, K, 32)
    for r in (0, 5, R - 1):
        for j in range(M):
            c, idx, img = int(b['local_tgt_crop'][r, j]), b['local_tgt'][r, j], int(b['crop_sample'][r])
            with torch.no_grad(): z = m.target_encoder(b['local'][img, c][None])[0]
            assert torch.allclose(tgt[r, j], F.layer_norm(z, z.shape[-1:])[idx], atol=1e-5)


def test_local_context_is_each_rows_own_image(images):
    seed_everything(0)
    m = JEPA(ViT(**TINY), strategy='global_with_local_context', **PRED).eval()
    b = crops(images, strategy='global_with_local_context')
    with torch.no_grad():
        base = m.crop_forward(b)[0].preds[0]
        other = dict(b, local=b['local'].clone()); other['local'][3] = torch.rand_like(other['local'][3])
        moved = m.crop_forward(other)[0].preds[0]
    rows = b['crop_sample']
    changed = (moved - base).abs().flatten(1).amax(1) > 1e-6
    assert changed[rows == 3].all() and not changed[rows != 3].any(), "image 3's local crops are image 3's context only"


def test_crop_method_rejects_masked_batches(images):
    with pytest.raises(ValueError, match='multi-crop batches'): MAKERS['simclr']()(masked(images))


CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("default", "finetune"))
QUICK = ['--set', 'data.dataset=digits', '--set', 'train.max_steps=3', '--set', 'data.batch_size=16',
         '--set', 'train.log_every=1', '--set', 'log.tensorboard=false', '--set', 'log.plots=false',
         '--set', 'model.embed_dim=32', '--set', 'model.depth=1', '--set', 'model.num_heads=2']


def hjepa(*args, cwd):
    env = {**os.environ, 'WANDB_MODE': 'offline', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'hjepa.cli', *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_config_per_method():
    assert sorted(CONFIGS) == sorted(METHOD_NAMES), f"configs/ must hold one YAML per method, has {CONFIGS}"
    for name in CONFIGS:
        cfg = load_config(ROOT / 'configs' / f'{name}.yaml')
        assert cfg.method.name == name and method_name(cfg) == name
        assert build_method(cfg).needs == method_needs(cfg)


@pytest.mark.parametrize('name', CONFIGS)
def test_hjepa_train_runs_every_method_config(tmp_path, name):
    probe = name in ('dino', 'simclr')                 # the probe at the end, for one EMA method and one without
    r = hjepa('train', '--config', ROOT / 'configs' / f'{name}.yaml', '--out', tmp_path / 'run', *QUICK,
              '--set', f'eval.probe={str(probe).lower()}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert res['method'] == name and res['steps'] == 3
    if probe: assert 0 <= res['probe_pretrained'] <= 1 and f'pretrained {name}' in r.stdout
    recs = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert all(math.isfinite(x['loss']) for x in recs if 'loss' in x)
    if not probe: return
    # `hjepa probe` finds the learned encoder in the checkpoint, whatever the method calls it
    p = hjepa('probe', tmp_path / 'run' / 'checkpoints' / 'final.pt', '--dataset', 'digits', cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 0 <= json.loads(p.stdout)['linear'] <= 1


@pytest.mark.parametrize('strategy', STRATEGY_NAMES)
def test_hjepa_train_runs_every_crop_masking_strategy(tmp_path, strategy):
    r = hjepa('train', '--config', ROOT / 'configs' / 'ijepa.yaml', '--out', tmp_path / 'run', *QUICK,
              '--set', f'data.multicrop.strategy={strategy}', '--set', 'eval.probe=false', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    losses = [x for x in recs if 'loss' in x]
    assert len(losses) == 3 and all(math.isfinite(x['loss']) for x in losses)
    if strategy == 'cross_crop_prediction': assert all('jepa_local' in x for x in losses)


@pytest.mark.parametrize('needs', ['masks', 'crops', 'masked_crops'])
def test_loaders_for_each_need(needs):
    over = {'masks': [], 'crops': ['method.name=simclr', 'data.multicrop.num_local=0'],
            'masked_crops': ['data.multicrop.strategy=global_only']}[needs]
    cfg = load_config(overrides=['data.dataset=digits', 'data.batch_size=8', *over])
    assert method_needs(cfg) == needs
    train, val = build_loaders(cfg)
    b = next(iter(train))
    if needs == 'masks': assert b[0].shape == (8, 1, 32, 32)
    else:
        assert b['global'].shape == (8, 2, 1, 32, 32)
        assert ('masks_ctx' in b) == (needs == 'masked_crops')
    loss, parts, feats = build_method(cfg)(b)
    assert torch.isfinite(loss) and feats.shape[0] == 8


@pytest.mark.parametrize('over, msg', [
    (['method.name=hjepa', 'model.num_levels=1'], 'needs model.num_levels >= 2'),
    (['method.name=ijepa', 'model.num_levels=2'], 'set method.name=hjepa'),
    (['method.name=simclr', 'data.multicrop.num_global=3'], 'num_global=2'),
    (['method.name=dino', 'data.multicrop.strategy=global_only'], 'set it to null'),
    (['data.multicrop.strategy=cross_crop_prediction', 'data.multicrop.num_local=0'], 'num_local >= 1'),
    (['method.name=dino', 'data.multicrop.local_size=10'], 'data.multicrop.local_size=10'),
    (['method.name=sigreg', 'data.multicrop.num_global=1', 'data.multicrop.num_local=0'], 'at least two views'),
])
def test_method_config_errors_name_the_key(over, msg):
    from hjepa.config import ConfigError
    with pytest.raises(ConfigError, match=msg): load_config(overrides=over)


@pytest.mark.parametrize('name', ['dino', 'sigreg'])
def test_hjepa_train_under_torchrun(tmp_path, name):
    "DINO (its centre is averaged over ranks) and LeJEPA (SIGReg's sums are all-reduced) train with 2 DDP ranks."
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', WANDB_MODE='disabled', MPLBACKEND='Agg')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'hjepa.cli',
           'train', '--config', ROOT / 'configs' / f'{name}.yaml', '--out', tmp_path / 'run', *QUICK,
           '--set', 'eval.probe=false']
    r = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    losses = [x['loss'] for x in recs if 'loss' in x]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert (tmp_path / 'run' / 'checkpoints' / 'final.pt').is_file()


def test_adaptive_curriculum_follows_the_trainers_epoch():
    "data.multicrop.adaptive: few large local crops at epoch 0, the configured number after warmup_epochs."
    from hjepa.trainer import set_loader_epoch
    cfg = load_config(overrides=['method.name=dino', 'data.dataset=digits', 'data.batch_size=128', 'model.depth=1',
                                 'model.embed_dim=32', 'model.num_heads=2', 'method.dino_out_dim=32',
                                 'data.multicrop.adaptive=true', 'data.multicrop.num_local_start=2',
                                 'data.multicrop.num_local=6', 'data.multicrop.warmup_epochs=2'])
    train, _ = build_loaders(cfg)
    counts = []
    for epoch in (0, 1, 2, 5):
        set_loader_epoch(train, epoch)
        counts.append(next(iter(train))['local'].shape[1])
    assert counts == [2, 4, 6, 6], counts
    seed_everything(0)
    _, tr = fit(build_method(cfg), train, steps=len(train) + 1)              # into epoch 1 through the Trainer
    assert tr.epoch == 1 and tr.batch['local'].shape[1] == 4


def test_removing_the_anti_collapse_pieces_collapses_a_real_run(tmp_path):
    "The bundled job vs the same job without its regulariser and with EMA momentum 0, on MNIST: rank and k-NN fall."
    from hjepa.monitor import read_jsonl
    from hjepa.recipe import run_training
    base = ['train.max_steps=60', 'train.collapse_every=20', 'eval.knn_every=20', 'log.console=false',
            'log.tensorboard=false', 'eval.probe=false', 'eval.knn_subset=200']
    broken = ['loss.vicreg_coeff=0', 'loss.sigreg_coeff=0', 'ema.momentum=0', 'ema.momentum_end=0']
    rank, knn = {}, {}
    for name, over in (('healthy', []), ('collapsed', broken)):
        run_training(load_config(None, base + over), out=tmp_path / name, verbose=False)
        recs = read_jsonl(tmp_path / name / 'metrics.jsonl')
        rank[name] = [r['eff_rank'] for r in recs if 'eff_rank' in r]          # steps 20, 40, 60
        knn[name] = [r['probe/knn'] for r in recs if 'probe/knn' in r]         # steps 0 (random init), 20, 40, 60
    h, c = rank['healthy'], rank['collapsed']
    assert h[-1] > h[0] and c[-1] < c[0] and c[-1] < 0.7 * h[-1], rank       # spreads vs falls onto ~one direction
    assert knn['collapsed'][-1] < knn['collapsed'][0] and knn['collapsed'][-1] < knn['healthy'][-1], knn
