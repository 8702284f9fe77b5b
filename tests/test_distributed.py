"""DDP for real: `torchrun --standalone --nproc_per_node=2` (gloo, CPU) on tests/ddp_script.py and on the Trainer.

A notebook cannot launch several processes, so the multi-process properties of hjepa.distributed live here:
identical parameters on every rank, equal to one process trained on the same global batches, metrics averaged
over ranks, only rank 0 writing files, and every rank resuming from the same checkpoint file.
"""
import os, subprocess, sys, time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), WANDB_MODE='disabled', MPLBACKEND='Agg')
    return env


def _run(cmd, timeout=240):
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.time() - t0


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One DDP run (2 ranks) and one single-process run of tests/ddp_script.py on the same global batches."
    d = tmp_path_factory.mktemp('ddp')
    t_ddp = _run(TORCHRUN + [ROOT / 'tests' / 'ddp_script.py', d / 'ddp'])
    sys.path.insert(0, str(ROOT / 'tests'))
    import ddp_script                                   # the single-process reference runs in this process
    ddp_script.main(d / 'single', single=True)
    load = lambda p: torch.load(p / 'result.pt', weights_only=False)
    print(f"torchrun 2 ranks: {t_ddp:.1f}s")
    return d, load(d / 'ddp'), load(d / 'single')


def test_parameters_identical_on_both_ranks(runs):
    _, ddp, _ = runs
    assert ddp['world_size'] == 2
    a, b = ddp['final']
    assert torch.equal(a, b), f"ranks disagree after training: max |diff| = {(a - b).abs().max():.3g}"


def test_ddp_matches_one_process_on_the_same_global_batch(runs):
    "2 ranks x 8 examples with averaged gradients = 1 process x 16 examples (ranks even start from different inits)."
    _, ddp, single = runs
    a, s = ddp['final'][0], single['final'][0]
    assert not torch.equal(a, torch.zeros_like(a))
    torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)
    # the logged loss is the mean over ranks, which is the global-batch loss of the single process
    for h_ddp, h_single in zip(ddp['history'], single['history']):
        assert h_ddp['steps'] == h_single['steps'] == 4
        assert abs(h_ddp['loss'] - h_single['loss']) < 1e-5, (h_ddp, h_single)


def test_every_rank_resumes_from_the_same_file(runs):
    "Fresh models on both ranks load the checkpoint rank 0 picked and redo epoch 2: same weights as the straight run."
    _, ddp, _ = runs
    assert ddp['resume_step'] == 1
    r0, r1 = ddp['resumed']
    assert torch.equal(r0, r1)
    torch.testing.assert_close(r0, ddp['final'][0], rtol=1e-6, atol=1e-7)


def test_rank_helpers_reduce_over_two_ranks(runs):
    "reduce_metrics (mean, weighted mean, sum, max) and the any_rank vote, with rank r holding r + 1 (from hjepa.core)."
    _, ddp, single = runs
    c = ddp['collectives']
    assert c['mean'] == {'x': 1.5, 'y': 15.0}
    assert abs(c['weighted']['x'] - 5 / 3) < 1e-12
    assert c['sum'] == {'n': 3.0} and c['max'] == {'g': 2.0}
    assert c['vote_last'] is True and c['vote_none'] is False            # one rank's True reaches every rank
    s = single['collectives']                                             # one process: its own numbers
    assert s['mean'] == {'x': 1.0, 'y': 10.0} and s['max'] == {'g': 1.0} and s['vote_last'] is True


def test_only_rank_zero_writes(runs):
    d, ddp, _ = runs
    w0, w1 = ddp['writes']
    assert w1 == [], f"rank 1 wrote files: {w1}"
    written = {p for _, p in w0}
    assert {'epoch0.pt', 'ckpt/step_00000001.pt', 'ckpt/latest.pt'} <= written, written
    assert sorted(p.name for p in (d / 'ddp').iterdir()) == ['ckpt', 'done.json', 'epoch0.pt', 'result.pt']


@pytest.fixture(scope='module')
def trainer_run(tmp_path_factory):
    "The real Trainer (tiny H-JEPA, 4 steps, checkpoints every 2) under torchrun with 2 ranks."
    d = tmp_path_factory.mktemp('ddp_trainer')
    _run(TORCHRUN + [ROOT / 'tests' / 'ddp_trainer_script.py', d, 4])
    return d, torch.load(d / 'result_4.pt', weights_only=False)


def test_trainer_under_torchrun_keeps_ranks_identical(trainer_run):
    "Context encoder, EMA target, predictor and heads are bit-identical on both ranks after 4 DDP steps."
    d, res = trainer_run
    assert res['world_size'] == 2 and res['step'] == 4
    a, b = res['params']
    assert torch.equal(a, b), f"ranks disagree: max |diff| = {(a - b).abs().max():.3g}"


def test_trainer_under_torchrun_only_rank_zero_writes_files(trainer_run):
    d, res = trainer_run
    w0, w1 = res['writes']
    files1 = [(e, p) for e, p in w1 if e != 'os.mkdir']      # an empty folder made by a constructor is not a file
    assert files1 == [], f"rank 1 wrote files: {files1}"
    written0 = {p for _, p in w0}
    assert 'metrics.jsonl' in written0 and any(p.startswith('checkpoints/step_') for p in written0), written0
    assert (d / 'checkpoints' / 'latest.pt').is_file() and (d / 'metrics.jsonl').is_file()


def test_trainer_ranks_resume_together(trainer_run):
    "A fresh Trainer on both ranks resumes from the step-2 checkpoint and ends at step 4 with identical weights."
    d, res = trainer_run
    assert res['resumed_from'] == 2 and res['resumed_step'] == 4
    a, b = res['resumed']
    assert torch.equal(a, b), "the ranks resumed into different states"
    # close to the straight run (not bit-equal: each rank's mask RNG stream is not in the rank-0 checkpoint)
    assert (a - res['params'][0]).abs().max() < 0.05
