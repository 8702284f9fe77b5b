"""Issue 11: the command line under faults — a diverged run's last good state, crashes mid-run, unreadable files,
a full disk, missing packages and devices: one line that names the file or key, an honest exit code, nothing lost."""
import json, os, signal, subprocess, sys, time

import pytest
import torch

from test_cli import TWO_STEPS, hjepa

ENV = {**os.environ, 'WANDB_MODE': 'offline', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith('hjepa ')]
    assert 'Traceback' not in err and lines, err[-3000:]
    return lines[-1]


def with_set(args, key, value):
    "TWO_STEPS-style args with `key` set to `value` (replaced if present)."
    out = [a for a in args]
    for i, a in enumerate(out):
        if a.startswith(f'{key}='): out[i] = f'{key}={value}'; return out
    return out + ['--set', f'{key}={value}']


def test_last_good_is_a_state_before_the_blow_up_and_resumes_to_a_finite_loss(tmp_path):
    "11.7: with optim.lr=1e3 the weights blow up before the first NaN; last_good holds a state from before that."
    run = tmp_path / 'run'
    args = with_set(with_set(TWO_STEPS, 'train.max_steps', 60), 'optim.lr', '1e3')
    r = hjepa('train', '--out', run, *args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_line(r.stderr)
    assert 'NaN/Inf' in line and f'--out {run} --resume last_good --set optim.lr=<lower>' in line, line
    good = torch.load(run / 'checkpoints' / 'last_good.pt', weights_only=True)
    stopped = json.loads((run / 'results.json').read_text())['steps']
    assert good['step'] < stopped - 5
    big = max(v.abs().max().item() for v in good['state']['model'].values() if v.is_floating_point())
    assert big < 20, f"last_good holds blown-up weights (largest {big})"
    r = hjepa('train', '--out', run, '--resume', 'last_good', *with_set(args, 'optim.lr', '1e-4'), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {good['step']} of 60 (last_good)" in r.stdout, r.stdout
    recs = [json.loads(ln) for ln in (run / 'metrics.jsonl').read_text().splitlines()]
    after = [x['loss'] for x in recs if x['step'] > good['step'] and 'loss' in x]
    assert after and all(v is not None and v == v and v < 1e3 for v in after), after
    steps = [x['step'] for x in recs if 'loss' in x]
    assert len(steps) == len(set(steps)), "metrics.jsonl holds two records of one step"
    assert (run / 'metrics.replaced.jsonl').is_file()          # the abandoned timeline, kept aside


def test_resume_names_a_missing_tag(tmp_path, capsys):
    from hjepa.cli import main
    run = tmp_path / 'run'
    assert hjepa('train', '--out', run, *TWO_STEPS, cwd=tmp_path).returncode == 0
    code = main(['train', '--out', str(run), '--resume', 'last_good', *TWO_STEPS])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and 'has no last_good.pt; it has final' in line, line


def test_a_crash_mid_run_saves_the_newest_healthy_state(tmp_path):
    "11.11: an exception in the step (here from the forward) leaves a `crashed` checkpoint that resumes."
    from hjepa.config import load_config
    from hjepa.recipe import build_loaders, build_method
    from hjepa.trainer import Trainer, method_forward
    cfg = load_config(None, ['data.dataset=digits', 'data.batch_size=16'])
    def dl(): return build_loaders(cfg)[0]
    def model(): return build_method(cfg)

    def breaks(trainer, batch):
        if trainer.step == 24: raise ZeroDivisionError('a bug in the forward')
        return method_forward(trainer, batch)
    tr = Trainer(model(), dl(), max_steps=30, forward_fn=breaks, out_dir=tmp_path / 'r', log_every=100, amp='off')
    with pytest.raises(ZeroDivisionError) as e:
        tr.fit()
    step, path = e.value.hjepa_saved
    assert step == 20 and (tmp_path / 'r' / 'checkpoints' / 'crashed.pt').is_file() and path.is_file()
    back = Trainer(model(), dl(), max_steps=30, out_dir=tmp_path / 'r', log_every=100, amp='off')
    assert back.resume('crashed') == 20 and back.fit()['steps'] == 30


def test_an_unreadable_image_is_named(tmp_path):
    "11.11: a truncated JPEG or an empty file in an imagefolder gives one line naming it, not 61 lines."
    from PIL import Image
    import numpy as np
    for split in ('train', 'test'):
        for c in 'ab':
            (tmp_path / 'imgs' / split / c).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(tmp_path / 'imgs' / split / c / f'{i}.jpg')
    bad = tmp_path / 'imgs' / 'train' / 'a' / '0.jpg'
    bad.write_bytes(bad.read_bytes()[:100])
    for workers in (0, 1):
        args = with_set(with_set(with_set(TWO_STEPS, 'data.dataset', 'imagefolder'), 'data.root', tmp_path / 'imgs'),
                        'data.batch_size', 16) + ['--set', f'data.num_workers={workers}']
        r = hjepa('train', '--out', tmp_path / f'run{workers}', *args, cwd=tmp_path)
        line = one_line(r.stderr)
        assert r.returncode == 2 and f'cannot read image {bad}' in line and 'repair or remove' in line, line


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_older_checkpoint(tmp_path, capsys, monkeypatch):
    "11.11: torch's 'unexpected pos' (no space left) at the second checkpoint: one line, the first file intact."
    import hjepa.checkpoint as ck
    from hjepa.cli import main
    real, calls = torch.save, []
    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2: raise RuntimeError('[enforce fail at inline_container.cc:778] . PytorchStreamWriter '
                                               'failed writing file data/3: unexpected pos 9 vs 0')
        return real(obj, f, *a, **k)
    monkeypatch.setattr(ck.torch, 'save', save)
    run = tmp_path / 'run'
    args = with_set(with_set(TWO_STEPS, 'train.max_steps', 6), 'train.ckpt_every', 3)
    code = main(['train', '--out', str(run), *args])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and 'the disk is full' in line and 'step_00000006.pt' in line, line
    monkeypatch.setattr(ck.torch, 'save', real)
    assert ck.load_checkpoint(run / 'checkpoints' / 'step_00000003.pt')['step'] == 3
    assert not list((run / 'checkpoints').glob('.*.tmp'))


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys, monkeypatch):
    "11.11: a read-only --out (simulated: this suite may run as root) names the folder and what to do."
    import pathlib
    from hjepa.cli import main
    real = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if 'ro' in self.parts: raise PermissionError(13, 'Permission denied', str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, 'mkdir', mkdir)
    code = main(['train', '--out', str(tmp_path / 'ro' / 'run'), *TWO_STEPS])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and f"cannot write {tmp_path / 'ro'}" in line and 'fix its permissions' in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_a_gpu_is_a_config_error(tmp_path, capsys):
    from hjepa.cli import main
    code = main(['train', '--out', str(tmp_path / 'r'), *TWO_STEPS, '--set', 'train.device=cuda'])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and 'train.device=cuda' in line and '--set train.device=auto or cpu' in line, line
    assert not (tmp_path / 'r').exists()


def test_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error, urllib.request
    from hjepa.cli import main
    def offline(*a, **k): raise urllib.error.URLError(OSError(-2, 'Name or service not known'))
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    code = main(['train', '--out', str(tmp_path / 'r'), *TWO_STEPS, '--set', 'data.dataset=cifar10',
                 '--set', 'data.download=true', '--set', f'data.root={tmp_path / "data"}'])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and 'could not download cifar10' in line and 'Name or service not known' in line, line
    assert not (tmp_path / 'r').exists(), "a failed download must not leave a run folder behind"


def test_wandb_missing_is_named_before_anything_is_written(tmp_path):
    fake = tmp_path / 'fake' / 'wandb'
    fake.mkdir(parents=True); (fake / '__init__.py').write_text("raise ImportError('No module named wandb')\n")
    env = {**ENV, 'PYTHONPATH': os.pathsep.join([str(tmp_path / 'fake'), os.environ.get('PYTHONPATH', '')])}
    r = subprocess.run([sys.executable, '-m', 'hjepa.cli', 'train', '--out', str(tmp_path / 'r'), *TWO_STEPS,
                        '--set', 'log.wandb=true'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    line = one_line(r.stderr)
    assert r.returncode == 2 and 'log.wandb=true needs the wandb package' in line and 'log.wandb=false' in line, line
    assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('content', [b'hello world\n', b'', b'PK\x03\x04 truncated zip'])
def test_probe_of_a_file_that_is_not_a_checkpoint(tmp_path, content):
    f = tmp_path / 'notes.pt'; f.write_bytes(content)
    r = hjepa('probe', f, cwd=tmp_path)
    line = one_line(r.stderr)
    assert r.returncode == 2 and f'{f} is truncated, corrupted or not a torch file' in line, line


def test_debug_shows_the_traceback(tmp_path):
    f = tmp_path / 'empty.pt'; f.write_bytes(b'')
    for extra, env in ((['--debug'], ENV), ([], {**ENV, 'HJEPA_DEBUG': '1'})):
        r = subprocess.run([sys.executable, '-m', 'hjepa.cli', *extra, 'probe', str(f)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and 'Traceback (most recent call last)' in r.stderr and 'CheckpointError' in r.stderr


def test_batch_size_one_names_the_key(tmp_path, capsys):
    from hjepa.cli import main
    code = main(['train', '--out', str(tmp_path / 'r'), *TWO_STEPS, '--set', 'data.batch_size=1',
                 '--set', 'method.name=vicreg'])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith('hjepa train: error: data.batch_size=1') and 'raise data.batch_size' in line


def test_no_duplicate_step_records_after_a_kill(tmp_path):
    "11.13: kill -9 after the last checkpoint, then --resume: metrics.jsonl has one record per step."
    run = tmp_path / 'run'
    args = with_set(with_set(with_set(TWO_STEPS, 'train.max_steps', 400), 'train.ckpt_every', 4), 'eval.probe', 'false')
    pr = subprocess.Popen([sys.executable, '-m', 'hjepa.cli', 'train', '--out', str(run), *args], cwd=tmp_path,
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    def steps(): return [json.loads(ln)['step'] for ln in (run / 'metrics.jsonl').read_text().splitlines()
                         if '"loss"' in ln] if (run / 'metrics.jsonl').exists() else []
    while not (len(steps()) >= 6 and steps()[-1] % 4 != 0):
        assert pr.poll() is None and time.time() - t0 < 240, "the run ended or never logged"
        time.sleep(0.05)
    os.kill(pr.pid, signal.SIGKILL); pr.wait()
    before = steps()
    assert before[-1] % 4 != 0               # records past the last checkpoint exist: they would be duplicated
    (run / '.hjepa.lock').unlink()           # the killed run's lock is reported as stale, never broken: as told
    r = hjepa('train', '--out', run, '--resume', *with_set(args, 'train.max_steps', before[-1] + 4), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    after = steps()
    assert len(after) == len(set(after)) and after == sorted(after) and after[-1] == before[-1] + 4, after
