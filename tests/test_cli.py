"""`hjepa` as a user runs it: a subprocess, a tiny config, the run folder, bad input, resume."""
import json, os, subprocess, sys

import pytest

TINY = ['--set', 'data.dataset=digits', '--set', 'train.max_steps=12', '--set', 'train.ckpt_every=6',
        '--set', 'data.batch_size=32', '--set', 'train.log_every=3', '--set', 'train.collapse_every=6',
        '--set', 'eval.knn_every=4']


def hjepa(*args, cwd):
    env = {**os.environ, 'WANDB_MODE': 'offline', 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, '-m', 'hjepa.cli', *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_train_subprocess_writes_the_run_folder(tmp_path):
    r = hjepa('train', '--out', tmp_path / 'run', *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / 'run'
    for f in ('config.yaml', 'metrics.jsonl', 'results.json', 'encoder.pt', 'curves.png'):
        assert (run / f).exists(), f"run folder lacks {f}: {sorted(p.name for p in run.iterdir())}"
    assert (run / 'checkpoints' / 'latest.pt').exists() and any((run / 'tb').iterdir())
    res = json.loads((run / 'results.json').read_text())
    for k in ('probe_pretrained', 'probe_random', 'probe_pixels', 'knn_pretrained', 'steps', 'wall_s', 'img_per_s'):
        assert k in res, f"results.json lacks {k}"
    assert res['steps'] == 12 and 0 <= res['probe_pixels'] <= 1
    recs = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    logged = [r for r in recs if 'loss' in r]
    assert [r['step'] for r in logged][:2] == [3, 6] and all(r['loss'] == r['loss'] for r in logged)   # no NaN
    assert 'held-out accuracy' in r.stdout and 'raw pixels' in r.stdout

    # never clobbered: a second run into the same folder is refused, the first one intact
    again = hjepa('train', '--out', run, *TINY, cwd=tmp_path)
    assert again.returncode == 2 and 'left untouched' in again.stderr
    assert json.loads((run / 'results.json').read_text()) == res

    # issue 11.4: a resume that changes what the checkpoint depends on is refused before anything is written
    saved = (run / 'config.yaml').read_text()
    for bad, key in ((['--set', 'model.embed_dim=128'], 'model.embed_dim'), (['--set', 'data.batch_size=16'],
                                                                               'data.batch_size')):
        r2 = hjepa('train', '--out', run, '--resume', *TINY, *bad, cwd=tmp_path)
        assert r2.returncode == 2 and key in r2.stderr and 'Traceback' not in r2.stderr, r2.stderr[-2000:]
        assert (run / 'config.yaml').read_text() == saved and not (run / '.hjepa.lock').exists()
    # resume continues from the checkpoint to a later max_steps
    more = hjepa('train', '--out', run, '--resume', *TINY, '--set', 'train.max_steps=18', cwd=tmp_path)  # last wins
    assert more.returncode == 0, more.stderr[-3000:]
    assert json.loads((run / 'results.json').read_text())['steps'] == 18
    assert json.loads((run / 'results.json').read_text())['resume_changes'] == {'train.max_steps': [12, 18]}
    assert 'resuming with train.max_steps: 12 -> 18' in more.stdout
    # the k-NN probe curve: random init at step 0, then every 4 steps, continued (not restarted) by the resume
    recs = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    knn = [(r['step'], r['probe/knn']) for r in recs if 'probe/knn' in r]
    assert [s for s, _ in knn] == [0, 4, 8, 12, 16], knn
    assert all(0 <= a <= 1 for _, a in knn) and len({a for _, a in knn}) > 1    # measured, not a constant

    # probe a finished run
    pr = hjepa('probe', run, cwd=tmp_path)
    assert pr.returncode == 0, pr.stderr[-2000:]
    out, final = json.loads(pr.stdout), json.loads((run / 'results.json').read_text())
    # the run's own protocol (eval.pool: tokens pooled on a 4x4 grid, 16 x 96 features of the nano encoder) ...
    assert out['pool'] == 'grid4' and out['dim'] == 16 * 96, out
    # ... so `hjepa probe` reproduces the number the run printed at its end
    assert abs(out['linear'] - final['probe_pretrained']) < 2e-3, (out['linear'], final['probe_pretrained'])


@pytest.mark.parametrize('args, key', [
    (['--set', 'optim.lr=-1'], 'optim.lr'),
    (['--set', 'optim.lr=.nan'], 'optim.lr: nan is not a finite number'),
    (['--set', 'optim.clip_grad=.inf'], 'optim.clip_grad: inf is not a finite number'),
    (['--set', 'model.depht=3'], 'model.depht'),
    (['--set', 'data.image_size=30'], 'data.image_size'),
    (['--set', 'train.epochs=many'], 'train.epochs'),
])
def test_bad_config_names_the_key(tmp_path, capsys, args, key):
    from hjepa.cli import main
    code = main(['train', '--out', str(tmp_path / 'r'), *args])       # in-process: the error path, no torch start-up
    err = capsys.readouterr().err
    assert code == 2 and key in err and 'Traceback' not in err, err
    assert not (tmp_path / 'r').exists(), "a bad config must fail before any work (no run folder)"


def test_bad_yaml_file_names_the_key(tmp_path, capsys):
    from hjepa.cli import main
    f = tmp_path / 'bad.yaml'
    f.write_text('optim:\n  lr: 1e-3\n  warmup: 5\n')
    code, err = main(['train', '--config', str(f)]), capsys.readouterr().err
    assert code == 2 and 'optim.warmup: unknown key' in err and 'warmup_frac' in err, err


def test_help_explains_every_key(tmp_path):
    r = hjepa('train', '--help', cwd=tmp_path)
    assert r.returncode == 0
    from hjepa.config import config_help
    for line in config_help():
        key = line.strip().split(' ')[0].rstrip(':')
        assert key in r.stdout, f"--help does not mention {key}"


TORCH_FREE = """
import contextlib, io, sys
from hjepa.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try: code = main(argv)
        except SystemExit as e: code = e.code
    assert code in (0, None), (argv, code)
    assert out.getvalue().strip(), argv
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""


@pytest.mark.parametrize('argvs', [[['--help']], [['train', '--help']], [['lab']]],
                         ids=['help', 'train-help', 'lab-list'])
def test_cheap_commands_do_not_import_torch(tmp_path, argvs):
    "`hjepa --help`, `hjepa train --help` and the lab list answer without importing torch (a fresh process)."
    r = subprocess.run([sys.executable, '-c', TORCH_FREE.format(argvs=argvs)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = r.stdout.strip().splitlines()[-1]
    assert loaded == '[]', f"{argvs[0]} imported torch: {loaded[:200]}"


def test_import_config_is_torch_free(tmp_path):
    code = "import sys, hjepa.config; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == 'False', r.stdout + r.stderr[-2000:]


TWO_STEPS = ['--set', 'data.dataset=digits', '--set', 'train.max_steps=2', '--set', 'data.batch_size=16',
             '--set', 'eval.probe=false', '--set', 'log.tensorboard=false', '--set', 'log.plots=false',
             '--set', 'train.log_every=1']


def test_overwrite_never_touches_a_folder_that_is_not_a_run(tmp_path, capsys):
    "issue 11.1: `--overwrite` on a project folder refuses and deletes nothing; `--out ''` is an error."
    from hjepa.cli import main
    proj = tmp_path / 'proj'
    (proj / 'src').mkdir(parents=True); (proj / 'src' / 'a.py').write_text('')
    (proj / 'thesis.tex').write_text('chapter 1')
    code, err = main(['train', '--out', str(proj), '--overwrite', *TWO_STEPS]), capsys.readouterr().err
    assert code == 2 and 'not an hjepa run (src, thesis.tex)' in err and 'Traceback' not in err, err
    assert (proj / 'thesis.tex').read_text() == 'chapter 1' and (proj / 'src' / 'a.py').exists()
    assert sorted(p.name for p in proj.iterdir()) == ['src', 'thesis.tex'], "nothing may be added either"
    code, err = main(['train', '--out', '', '--overwrite', *TWO_STEPS]), capsys.readouterr().err
    assert code == 2 and '--out is empty' in err, err


def test_overwrite_replaces_only_the_runs_own_files(tmp_path):
    run = tmp_path / 'run'
    r = hjepa('train', '--out', run, *TWO_STEPS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run / 'my_notes.md').write_text('keep me')
    first = (run / 'metrics.jsonl').read_text()
    r = hjepa('train', '--out', run, '--overwrite', *TWO_STEPS, '--set', 'train.seed=1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / 'my_notes.md').read_text() == 'keep me'
    assert (run / 'metrics.jsonl').read_text() != first and (run / 'checkpoints' / 'final.pt').is_file()


def test_a_failed_start_leaves_no_trap(tmp_path, capsys):
    "issue 11.5: fp16 on a CPU fails before any file exists; the retry in the same folder then works."
    from hjepa.cli import main
    run = tmp_path / 'run'
    code = main(['train', '--out', str(run), '--set', 'train.amp=fp16', '--set', 'train.device=cpu', *TWO_STEPS])
    err = capsys.readouterr().err
    assert code == 2 and "amp='fp16' needs a CUDA device" in err, err
    assert not run.exists() or not any(run.iterdir()), f"the failed start left {sorted(run.iterdir())}"
    (run).mkdir(exist_ok=True); (run / 'config.yaml').write_text('{}')     # an older failed start's leftover
    r = hjepa('train', '--out', run, *TWO_STEPS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_probe_of_a_checkpoint_uses_the_runs_dataset(tmp_path):
    "issue 11.9: a synthetic run's checkpoint is probed on the synthetic test split, not on MNIST-5k."
    from hjepa.data import load_dataset
    run = tmp_path / 'run'
    over = [a if a != 'data.dataset=digits' else 'data.dataset=synthetic' for a in TWO_STEPS]
    r = hjepa('train', '--out', run, *over, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    p = hjepa('probe', run / 'checkpoints' / 'final.pt', cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)['n_test'] == len(load_dataset('synthetic', 'test')) != 1000


def test_config_folder_is_named(tmp_path, capsys):
    from hjepa.cli import main
    code, err = main(['train', '--config', str(tmp_path)]), capsys.readouterr().err
    assert code == 2 and 'is a folder: pass a YAML file' in err, err


@pytest.mark.parametrize('sig, code', [('SIGINT', 130), ('SIGTERM', 143)])
def test_an_interrupted_run_exits_nonzero_skips_the_probe_and_says_how_to_continue(tmp_path, sig, code):
    "issue 11.6: after SIGINT/SIGTERM the CLI prints the command that continues the run and exits 128 + signal."
    import signal, time
    run = tmp_path / 'run'
    env = {**os.environ, 'WANDB_MODE': 'offline', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
    long = [a if a != 'train.max_steps=2' else 'train.max_steps=100000' for a in TWO_STEPS]
    pr = subprocess.Popen([sys.executable, '-m', 'hjepa.cli', 'train', '--out', str(run), *long, '--set',
                           'eval.probe=true'], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    t0 = time.time()
    while not (run / 'metrics.jsonl').exists() or len((run / 'metrics.jsonl').read_text().splitlines()) < 3:
        assert pr.poll() is None and time.time() - t0 < 240, "the run ended or never logged"
        time.sleep(0.3)
    # issue 11.2: while it runs, a second `hjepa train` (or `--resume`) on the same folder is refused by the lock
    for extra in ([], ['--resume']):
        second = hjepa('train', '--out', run, *TWO_STEPS, *extra, cwd=tmp_path)
        assert second.returncode == 2 and f'pid {pr.pid}' in second.stderr and 'Traceback' not in second.stderr, \
            second.stderr[-2000:]
    pr.send_signal(getattr(signal, sig))
    out, err = pr.communicate(timeout=240)
    assert pr.returncode == code, (pr.returncode, err[-2000:])
    assert not (run / '.hjepa.lock').exists()                              # released on the way out
    assert f'hjepa train --out {run} --resume' in err and 'trainer.resume' not in err, err[-2000:]
    res = json.loads((run / 'results.json').read_text())
    assert res['status'] == 'interrupted' and 'probe_pretrained' not in res and 'held-out accuracy' not in out
    assert (run / 'checkpoints' / 'interrupted.pt').is_file()


def test_two_phase_workflow_finetune_and_export(tmp_path):
    "issue 12: `hjepa train` then `hjepa finetune RUN --out DIR` and `hjepa export RUN --out F.safetensors`."
    pre, ft, f = tmp_path / 'pre', tmp_path / 'ft', tmp_path / 'enc.safetensors'
    assert hjepa('train', '--out', pre, *TWO_STEPS, cwd=tmp_path).returncode == 0
    r = hjepa('finetune', pre, '--out', ft, '--set', 'train.max_steps=3', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((ft / 'results.json').read_text())
    assert {'test_acc', 'test_acc_tta', 'test_acc_ema', 'test_acc_ema_tta'} <= set(res)
    again = hjepa('finetune', pre, '--out', ft, '--set', 'train.max_steps=3', cwd=tmp_path)
    assert again.returncode == 2 and 'Traceback' not in again.stderr and (ft / 'results.json').exists()
    r = hjepa('export', pre, '--out', f, cwd=tmp_path)
    assert r.returncode == 0 and f.stat().st_size > 1000, r.stderr[-2000:]
    before = f.read_bytes()
    r = hjepa('export', pre, '--out', f, cwd=tmp_path)
    assert r.returncode == 2 and 'left untouched' in r.stderr and f.read_bytes() == before
    r = hjepa('finetune', tmp_path / 'nowhere', '--out', tmp_path / 'x', cwd=tmp_path)
    assert r.returncode == 2 and 'nowhere' in r.stderr and not (tmp_path / 'x').exists()
