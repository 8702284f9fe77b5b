"Fault injection and properties of hjepa.checkpoint that a notebook cannot show (failing writes, killed writers)."
import os, random, signal, subprocess, sys, textwrap, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hjepa.checkpoint import (CheckpointError, CheckpointManager, gather_state, load_checkpoint, restore_state,
                              save_checkpoint)


def _state(seed=0, n=1000):
    g = torch.Generator().manual_seed(seed)
    return {'model': {'w': torch.randn(n, generator=g)}, 'step': seed, 'config': {'lr': 1e-3, 'name': 'x'}}


def _files(d):
    return sorted(p.name for p in Path(d).iterdir())


def test_failing_torch_save_keeps_old_file(tmp_path, monkeypatch):
    "torch.save writes half of its bytes and then fails: the old checkpoint is intact and no temp file remains."
    path = tmp_path / 'ck.pt'
    save_checkpoint(path, _state(1), step=1)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        import io
        buf = io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        raise OSError(28, 'No space left on device (injected)')

    monkeypatch.setattr(torch, 'save', half_then_fail)
    with pytest.raises(OSError, match='injected'):
        save_checkpoint(path, _state(2), step=2)
    monkeypatch.setattr(torch, 'save', real_save)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ['ck.pt']
    assert load_checkpoint(path)['step'] == 1


def test_failing_replace_in_manager(tmp_path, monkeypatch):
    "os.replace fails during a manager save: the previous checkpoint still loads, no temp file is left."
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(_state(1), step=1)

    def boom(*a, **k): raise OSError('rename failed (injected)')
    monkeypatch.setattr(os, 'replace', boom)
    with pytest.raises(OSError, match='injected'):
        mgr.save(_state(2), step=2)
    monkeypatch.undo()
    assert not [n for n in _files(tmp_path) if n.endswith('.tmp')]
    ck = CheckpointManager(tmp_path).load_latest()
    assert ck['step'] == 1 and torch.equal(ck['state']['model']['w'], _state(1)['model']['w'])


WRITER = textwrap.dedent('''
    import sys, torch
    from hjepa.checkpoint import atomic_save
    path, i = sys.argv[1], 0
    while True:
        i += 1
        atomic_save({'i': i, 'w': torch.full((1_000_000,), float(i))}, path)   # 4 MB per write
        if i == 3: print('ready', flush=True)
''')


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    "SIGKILL a process in the middle of its stream of writes: the checkpoint loads and is one whole write."
    path = tmp_path / 'ck.pt'
    script = tmp_path / 'writer.py'; script.write_text(WRITER)
    p = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'ready'
    time.sleep(0.37)
    p.send_signal(signal.SIGKILL); p.wait()
    ck = torch.load(path, weights_only=True)
    assert ck['i'] >= 3 and (ck['w'] == ck['i']).all(), "a torn mix of two writes"
    # the killed writer may leave a temp file; it never replaces the checkpoint and is hidden (dot-prefixed)
    assert all(n == 'ck.pt' or n.startswith('.ck.pt.') or n == 'writer.py' for n in _files(tmp_path))


@pytest.mark.parametrize('frac', [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_any_truncation_is_a_checkpoint_error(tmp_path, frac):
    "Whatever the cut point, a truncated file raises CheckpointError naming the file (never another exception)."
    path = tmp_path / 'ck.pt'
    save_checkpoint(path, _state(3, n=50_000), step=3)
    data = path.read_bytes(); path.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(CheckpointError, match='ck.pt'):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files(tmp_path):
    import pickle, zipfile
    (tmp_path / 'p.pt').write_bytes(pickle.dumps({'a': 1}))
    with zipfile.ZipFile(tmp_path / 'z.pt', 'w') as z: z.writestr('x.txt', 'hello')
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    for name in ('p.pt', 'z.pt', 'list.pt'):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)


def test_fallback_skips_several_bad_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=4)
    for s in (10, 20, 30, 40): mgr.save(_state(s), step=s)
    mgr.path_for(40).write_bytes(b'')
    p = mgr.path_for(30); p.write_bytes(p.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ck = mgr.load_latest()
    assert ck['step'] == 20 and len(w) == 2
    # the bad files are set aside; the next save continues the rotation from the good one
    assert sorted(mgr.entries) == [10, 20]
    mgr.save(_state(30), step=30)
    assert load_checkpoint(tmp_path / 'latest.pt')['step'] == 30


def test_rng_roundtrip_through_file_is_bit_exact(tmp_path):
    for seed in range(5):
        random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
        np.random.normal(); random.gauss(0, 1)                       # cached gaussians in both
        save_checkpoint(tmp_path / 'ck.pt', {}, step=0)
        want = (random.random(), random.gauss(0, 1), np.random.normal(size=4).tolist(), torch.randn(4).tolist())
        for _ in range(5): random.random(); np.random.rand(); torch.rand(1)
        load_checkpoint(tmp_path / 'ck.pt', restore_rng=True)
        got = (random.random(), random.gauss(0, 1), np.random.normal(size=4).tolist(), torch.randn(4).tolist())
        assert got == want


def test_best_n_retention_matches_the_rule(tmp_path):
    "Random metric sequences: the files on disk are exactly the last K plus the best N (min and max)."
    rng = random.Random(1)
    for case in range(6):
        mode = 'min' if case % 2 else 'max'
        d = tmp_path / f'c{case}'
        mgr = CheckpointManager(d, keep_last=2, keep_best=3, metric='val', mode=mode)
        vals = {}
        for s in range(1, 13):
            v = rng.random() if rng.random() > 0.1 else float('nan')
            vals[s] = v
            mgr.save({'s': s}, step=s, metrics={'val': v})
        finite = sorted((s for s in vals if vals[s] == vals[s]), key=vals.get, reverse=mode == 'max')
        want = set(range(11, 13)) | set(finite[:3])
        assert {int(p.stem[5:]) for p in d.glob('step_*.pt')} == want
        assert load_checkpoint(d / 'best.pt')['metrics']['val'] == vals[finite[0]]


def test_bit_exact_resume_of_a_training_loop(tmp_path):
    "N steps straight == N/2 steps, save, fresh objects, load, N/2 steps (params, AdamW moments, scheduler, RNG)."
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return model, opt, sched

    def steps(model, opt, sched, n):
        for _ in range(n):
            x = torch.randn(16, 8); noise = float(np.random.randn()) * 0.01 + random.random() * 0.01
            loss = (model(x) - x.sum(1, keepdim=True) - noise).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()

    np.random.seed(0); random.seed(0)
    m1, o1, s1 = build(); steps(m1, o1, s1, 20)

    np.random.seed(0); random.seed(0)
    m2, o2, s2 = build(); steps(m2, o2, s2, 10)
    mgr = CheckpointManager(tmp_path)
    mgr.save(gather_state(model=m2, optimizer=o2, scheduler=s2, step=10), step=10)
    torch.manual_seed(123); np.random.seed(123); random.seed(123)       # the new process starts elsewhere
    m3, o3, s3 = build()
    ck = mgr.load_latest(restore_rng=True)
    restore_state(ck['state'], model=m3, optimizer=o3, scheduler=s3)
    steps(m3, o3, s3, 10)
    for a, b in zip(m1.parameters(), m3.parameters()): assert torch.equal(a, b)
    assert s1.get_last_lr() == s3.get_last_lr()
    st1, st3 = o1.state_dict()['state'], o3.state_dict()['state']
    assert all(torch.equal(st1[k]['exp_avg_sq'], st3[k]['exp_avg_sq']) for k in st1)


def test_unsafe_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['state'\]\['config'\]\['seed'\] is a numpy.int64"):
        save_checkpoint(tmp_path / 'ck.pt', {'config': {'seed': np.int64(3)}}, step=0)
    assert not (tmp_path / 'ck.pt').exists()
