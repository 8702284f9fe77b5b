"Fault injection and properties of hjepa.checkpoint that a notebook cannot show (failing writes, killed writers)."
import json, os, random, signal, socket, subprocess, sys, textwrap, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hjepa.checkpoint import (VERSION, CheckpointError, CheckpointManager, CheckpointVersionError, RunLock,
                              RunLockedError, StaleRunLockError, gather_state, load_checkpoint, restore_state,
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
    with pytest.raises(OSError, match='the disk is full'):
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


# --- issue 11: skipped files are reported, a newer hjepa's files are never discarded ---------------------------------

def _manager_with_bad_newest(d):
    mgr = CheckpointManager(d, keep_last=3)
    for s in (1, 2): mgr.save(_state(s), step=s)
    bad = mgr.path_for(2); bad.write_bytes(bad.read_bytes()[:500])
    return mgr, bad


def test_skip_warning_names_the_file_why_and_where_it_went(tmp_path):
    mgr, bad = _manager_with_bad_newest(tmp_path)
    with pytest.warns(UserWarning) as w:
        assert mgr.load_latest()['step'] == 1
    msg = str(w[0].message)
    assert str(bad) in msg and 'is truncated' in msg and 'renamed it to step_00000002.pt.corrupt' in msg
    assert '\n' not in msg
    assert (tmp_path / 'step_00000002.pt.corrupt').exists() and not bad.exists()


def test_skip_warning_does_not_claim_a_rename_that_failed(tmp_path, monkeypatch):
    "The rename to .corrupt fails (read-only file, odd file system): the warning says so instead of 'renamed'."
    mgr, bad = _manager_with_bad_newest(tmp_path)
    real = os.replace

    def no_corrupt(src, dst, *a, **k):
        if str(dst).endswith('.corrupt'): raise PermissionError(13, 'Permission denied (injected)')
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, 'replace', no_corrupt)
    with pytest.warns(UserWarning) as w:
        assert mgr.load_latest()['step'] == 1
    msg = str(w[0].message)
    assert str(bad) in msg and 'could not set it aside' in msg and 'injected' in msg and 'renamed' not in msg


def test_a_second_corrupt_file_does_not_replace_the_first(tmp_path):
    "The same step goes bad twice (two incidents): both .corrupt files are kept for inspection."
    mgr, bad = _manager_with_bad_newest(tmp_path)
    with pytest.warns(UserWarning): mgr.load_latest()
    first = (tmp_path / 'step_00000002.pt.corrupt').read_bytes()
    mgr.save(_state(2), step=2); bad.write_bytes(b'second incident')
    with pytest.warns(UserWarning, match='renamed it to step_00000002.pt.corrupt-2'): mgr.load_latest()
    assert (tmp_path / 'step_00000002.pt.corrupt').read_bytes() == first
    assert (tmp_path / 'step_00000002.pt.corrupt-2').read_bytes() == b'second incident'


def test_skip_warning_is_visible_with_default_filters(tmp_path):
    "A plain `python` process (default warning filters, as `hjepa train --resume` runs) prints the skip on stderr."
    mgr, bad = _manager_with_bad_newest(tmp_path)
    code = (f"from hjepa.checkpoint import CheckpointManager; "
            f"print(CheckpointManager({str(tmp_path)!r}).load_latest()['step'])")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '1'
    assert 'UserWarning' in r.stderr and str(bad) in r.stderr and 'is truncated' in r.stderr


@pytest.mark.parametrize('version', [VERSION + 1, VERSION + 7, '2.0'])
def test_newer_format_is_refused_and_left_untouched(tmp_path, version):
    "A checkpoint from a newer hjepa: load_latest raises a version error, renames nothing and does not roll back."
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (1, 2): mgr.save(_state(s), step=s)
    newer = mgr.path_for(2)
    torch.save({**torch.load(newer, weights_only=True), 'version': version}, newer)
    before, files, manifest = newer.read_bytes(), _files(tmp_path), (tmp_path / 'manifest.json').read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter('error')                            # and no "skipping" warning either
        with pytest.raises(CheckpointVersionError, match=r'written by a newer hjepa \(format .+, this one reads up '
                           rf'to {VERSION}\): upgrade hjepa to resume it') as e:
            CheckpointManager(tmp_path).load_latest()
    assert str(newer) in str(e.value) and isinstance(e.value, CheckpointError)
    assert newer.read_bytes() == before and _files(tmp_path) == files
    assert (tmp_path / 'manifest.json').read_bytes() == manifest
    with pytest.raises(CheckpointVersionError, match=str(newer)): load_checkpoint(newer)


# --- issue 11 item 12: a code-executing pickle is named as such, and never executed ---------------------------------

class _Payload:
    "Unpickling this runs a shell command (here: creating a marker file)."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize('writer', ['torch.save', 'pickle'])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, writer):
    import pickle
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pt'
    payload = {'format': 'hjepa-checkpoint', 'version': 1, 'state': {'x': _Payload(marker)}}
    if writer == 'torch.save': torch.save(payload, path)
    else: path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a plain-tensor checkpoint (it would run code when loaded unsafely); "
                          "refusing"), msg
    assert 'truncated' not in msg and '\n' not in msg and 'system' in msg
    assert not marker.exists(), "loading the checkpoint ran the payload"
    mgr = CheckpointManager(tmp_path / 'run'); mgr.save(_state(1), step=1)
    os.replace(path, mgr.path_for(2))
    with pytest.warns(UserWarning, match='not a plain-tensor checkpoint'):
        assert mgr.load_latest()['step'] == 1                   # skipped like any unusable file, and still not run
    assert not marker.exists()
    aside = tmp_path / 'run' / 'step_00000002.pt.corrupt'
    if writer == 'torch.save': torch.load(aside, weights_only=False)    # the payload is real: loaded unsafely,
    else: pickle.loads(aside.read_bytes())
    assert marker.exists()                                               # it does run


def test_objects_of_other_classes_are_named_too(tmp_path):
    torch.save({'x': np.arange(3)}, tmp_path / 'np.pt')
    torch.save({'x': _Payload.__init__}, tmp_path / 'fn.pt')
    for name in ('np.pt', 'fn.pt'):
        with pytest.raises(CheckpointError, match=f'{name} is not a plain-tensor checkpoint .*refusing \\(it imports '):
            load_checkpoint(tmp_path / name)


# --- issue 11 item 2: one run per folder ----------------------------------------------------------------------------

HOLDER = textwrap.dedent('''
    import sys
    from hjepa.checkpoint import RunLock
    with RunLock(sys.argv[1]):
        print('locked', flush=True)
        sys.stdin.readline()
''')


def test_lock_held_by_another_process_refuses_a_second_run(tmp_path):
    p = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == 'locked'
        info = json.loads((tmp_path / '.hjepa.lock').read_text())
        assert info['pid'] == p.pid and info['host'] == socket.gethostname()
        assert abs(info['started'] - time.time()) < 300
        with pytest.raises(RunLockedError, match=rf'another hjepa process \(pid {p.pid} on ') as e:
            with RunLock(tmp_path): pytest.fail("a second run entered a locked folder")
        assert not isinstance(e.value, StaleRunLockError) and e.value.pid == p.pid and isinstance(e.value, RuntimeError)
        assert (tmp_path / '.hjepa.lock').exists()                 # the refusal leaves the holder's lock alone
    finally:
        p.communicate('\n', timeout=120)
    assert p.returncode == 0 and not (tmp_path / '.hjepa.lock').exists()
    with RunLock(tmp_path) as lock:                                # released: the folder is free again
        assert json.loads(lock.path.read_text())['pid'] == os.getpid()


def test_lock_in_this_process_refuses_and_releases(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf'this process \(pid {os.getpid()}\) already holds'):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / '.hjepa.lock').exists()
    with RunLock(tmp_path): pass


@pytest.mark.parametrize('exc', [ValueError, KeyboardInterrupt])
def test_lock_is_removed_after_an_exception(tmp_path, exc):
    with pytest.raises(exc):
        with RunLock(tmp_path): raise exc('the run failed')
    assert not (tmp_path / '.hjepa.lock').exists()
    with RunLock(tmp_path): pass


def _dead_pid():
    p = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    return int(p.stdout)


def test_stale_lock_is_reported_with_its_pid_and_not_broken(tmp_path):
    pid, lock = _dead_pid(), tmp_path / '.hjepa.lock'
    lock.write_text(json.dumps({'pid': pid, 'host': socket.gethostname(), 'started': time.time() - 60}))
    before = lock.read_bytes()
    with pytest.raises(StaleRunLockError) as e:
        with RunLock(tmp_path): pytest.fail("entered a folder with a stale lock")
    msg = str(e.value)
    assert 'stale' in msg and f'pid {pid}' in msg and f'delete {lock}' in msg and 'no other run uses' in msg
    assert isinstance(e.value, RunLockedError) and e.value.pid == pid
    assert lock.read_bytes() == before                              # reported, not silently broken
    lock.unlink()
    with RunLock(tmp_path): pass


def test_lock_of_an_earlier_process_with_our_pid_is_stale(tmp_path):
    "A container restart gives the new run the old run's pid: the lock is not this process's, so it is stale."
    (tmp_path / '.hjepa.lock').write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                                      'started': time.time() - 3600, 'token': 'earlier'}))
    with pytest.raises(StaleRunLockError, match=f'pid {os.getpid()}'):
        RunLock(tmp_path).acquire()


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='needs /proc (Linux)')
def test_lock_whose_pid_was_recycled_is_stale(tmp_path):
    "The lock's pid now belongs to a process that started after the lock was taken."
    p = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.readline()'], stdin=subprocess.PIPE, text=True)
    try:
        (tmp_path / '.hjepa.lock').write_text(json.dumps({'pid': p.pid, 'host': socket.gethostname(),
                                                          'started': time.time() - 3600}))
        with pytest.raises(StaleRunLockError, match=f'pid {p.pid}'):
            RunLock(tmp_path).acquire()
    finally: p.communicate('\n', timeout=60)


def test_unreadable_lock_refuses(tmp_path):
    (tmp_path / '.hjepa.lock').write_text('{garbage')
    with pytest.raises(RunLockedError, match='cannot be read') as e:
        RunLock(tmp_path).acquire()
    assert not isinstance(e.value, StaleRunLockError)
