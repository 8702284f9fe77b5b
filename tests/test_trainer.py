"""What the trainer chapter cannot show in a notebook: bit-exact resume, fault injection (NaN, SIGINT/SIGTERM from
another process), bf16 vs fp32, gradient accumulation against a big batch, AdamW parameter groups."""
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from hjepa.data import build_loader, load_dataset
from hjepa.masking import HierarchicalMaskGenerator, MaskCollator, preset_8x8
from hjepa.model import HJEPA
from hjepa.checkpoint import load_checkpoint
from hjepa.trainer import Callback, Trainer, jepa_forward, param_groups, total_steps

torch.set_num_threads(1)
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, pred_dim=32, pred_depth=1, pred_heads=2)
ROOT = Path(__file__).resolve().parent.parent


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return HJEPA.from_preset('nano', num_levels=2, **TINY)


def loader(batch_size=16, n=96, seed=0):
    ds = load_dataset('synthetic', 'train', n=n)                      # 32 px RGB shapes
    gen = HierarchicalMaskGenerator(**preset_8x8(2), num_levels=2)
    return build_loader(ds, batch_size, seed=seed, collate_fn=MaskCollator(gen, seed=seed), drop_last=True)


class Record(Callback):
    "Every step's loss, and the exact batch it used (images and masks)."
    def __init__(self): self.seen = []
    def after_step(self, trainer, metrics):
        x, _, mc, mt = trainer.batch
        self.seen.append((float(metrics['loss']), x.clone(), mc.clone(), [m.clone() for m in mt]))


def same_batches(a, b):
    assert len(a) == len(b)
    for (la, xa, ca, ta), (lb, xb, cb, tb) in zip(a, b):
        assert la == lb and torch.equal(xa, xb) and torch.equal(ca, cb)
        assert all(torch.equal(p, q) for p, q in zip(ta, tb))


def test_resume_is_bit_exact(tmp_path):
    "N steps straight == N/2 steps, new Trainer, resume, N/2 steps: parameters, EMA target, optimiser, next batches."
    N, kw = 10, dict(total_steps=10, log_every=100, amp='bf16', val_every=3)   # 6 batches per epoch: crosses an epoch
    def fresh(): return dict(val_loader=loader(seed=5), val_batches=1, **kw)   # every trainer its own val loader
    straight, split = Record(), Record()
    a = Trainer(tiny_model(), loader(), max_steps=N, out_dir=tmp_path / 'a', callbacks=[straight], **fresh())
    a.fit()
    Trainer(tiny_model(), loader(), max_steps=N // 2, out_dir=tmp_path / 'b', callbacks=[split], **fresh()).fit()
    b = Trainer(tiny_model(seed=7), loader(), max_steps=N, out_dir=tmp_path / 'b', callbacks=[split], **fresh())
    assert b.resume() == N // 2
    b.fit()
    same_batches(straight.seen, split.seen)
    sa, sb = a.state_dict(), b.state_dict()
    assert any(k.startswith('target_encoder.') for k in sa['model'])
    for k in sa['model']: assert torch.equal(sa['model'][k], sb['model'][k]), k
    for i, st in sa['optimizer']['state'].items():
        for k, v in st.items(): assert torch.equal(v, sb['optimizer']['state'][i][k]), (i, k)
    assert sa['trainer'] == sb['trainer']
    # and the batch after the end is the same too
    assert torch.equal(a._next_batch()[0], b._next_batch()[0])


def test_validation_does_not_change_training():
    "Validation is RNG-neutral: a run with validation ends with exactly the weights of one without."
    runs = []
    for val in (None, 2):
        tr = Trainer(tiny_model(), loader(), max_steps=5, val_loader=loader(seed=3), val_every=val, val_batches=1,
                     log_every=100, amp='off')
        tr.fit(); runs.append(tr.module.state_dict())
    for k in runs[0]: assert torch.equal(runs[0][k], runs[1][k]), k


def test_nan_is_skipped_counted_and_stops_with_a_checkpoint(tmp_path):
    bad_steps = {2, 4, 5, 6}
    def poisoned(trainer, batch):
        loss, parts, feats = jepa_forward(trainer, batch)
        return (loss * float('nan') if trainer.step in bad_steps else loss), parts, feats
    tr = Trainer(tiny_model(), loader(), max_steps=40, forward_fn=poisoned, max_bad_steps=3, out_dir=tmp_path,
                 log_every=100)
    with pytest.warns(RuntimeWarning, match='last_good'):
        s = tr.fit()
    assert s['nan_skipped'] == 4 and s['steps'] == 7                       # step 2 skipped alone, 4-6 in a row -> stop
    assert 'NaN/Inf' in s['stop_reason']
    assert all(torch.isfinite(p).all() for p in tr.module.parameters())
    # issue 11.7: last_good is the newest state whose next steps were healthy: step 2 went bad before the first
    # copy (every 10 steps) was trusted, so it is the state at the start; a NaN never reached the weights anyway
    ck = load_checkpoint(tmp_path / 'checkpoints' / 'last_good.pt')
    assert ck['step'] == 0 and ck['state']['trainer']['nan_skipped'] == 0
    for k, v in tiny_model().state_dict().items(): assert torch.equal(ck['state']['model'][k], v), k


def test_inf_gradient_is_skipped():
    "A finite loss whose gradient is Inf (bf16/fp32: no GradScaler to catch it) is skipped too."
    model = tiny_model()
    h = model.predictor.mask_token.register_hook(lambda g: torch.full_like(g, float('inf')))
    tr = Trainer(model, loader(), max_steps=2, log_every=100, amp='off')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = tr.fit(); h.remove()
    assert s['nan_skipped'] == 2
    for k, v in model.state_dict().items(): assert torch.equal(v, before[k]), k


SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_trainer import tiny_model, loader
    from hjepa.trainer import Trainer, Callback
    class Ready(Callback):
        def after_step(self, trainer, metrics):
            if trainer.step == 3: open({ready!r}, 'w').write('go')
    tr = Trainer(tiny_model(), loader(), max_steps=100000, total_steps=50, out_dir={out!r}, callbacks=[Ready()],
                 log_every=1000)
    s = tr.fit()
    print('STOP', s['stop_reason'], flush=True)
''')


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_from_another_process_writes_interrupted_and_resumes(tmp_path, sig):
    ready, out = tmp_path / 'ready', tmp_path / 'run'
    code = SCRIPT.format(tests=str(ROOT / 'tests'), ready=str(ready), out=str(out))
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    t0 = time.time()
    while not ready.exists():
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() - t0 < 50, "the training subprocess did not reach step 3"
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=50)
    assert p.returncode == 0, stderr[-2000:]                                # a clean exit, not a KeyboardInterrupt
    assert f'interrupted by {signal.Signals(sig).name}' in stdout
    ck = load_checkpoint(out / 'checkpoints' / 'interrupted.pt')
    assert ck['step'] >= 3
    tr = Trainer(tiny_model(seed=9), loader(), max_steps=ck['step'] + 2, total_steps=50, out_dir=out, log_every=100)
    assert tr.resume('interrupted') == ck['step']
    assert tr.fit()['steps'] == ck['step'] + 2


def test_sigint_in_process_and_handlers_restored(tmp_path):
    class CtrlC(Callback):
        def after_step(self, trainer, metrics):
            if trainer.step == 2: os.kill(os.getpid(), signal.SIGINT)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    s = Trainer(tiny_model(), loader(), max_steps=10, out_dir=tmp_path, callbacks=[CtrlC()], log_every=100).fit()
    assert s['steps'] == 2 and (tmp_path / 'checkpoints' / 'interrupted.pt').exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_bf16_step_loss_close_to_fp32():
    losses = {}
    for amp in ('off', 'bf16'):
        rec = Record()
        Trainer(tiny_model(), loader(), max_steps=1, amp=amp, log_every=100, callbacks=[rec]).fit()
        losses[amp] = rec.seen[0][0]
    assert abs(losses['bf16'] - losses['off']) <= 0.02 * losses['off'], losses


def test_accumulation_of_two_halves_equals_one_big_batch():
    "accum_steps=2 on batches of B == one step on the same 2B images and masks (SGD, no clipping, fp32)."
    big = list(loader(batch_size=32, n=96))                                # 3 batches of 32
    halves = [tuple(t[s] if torch.is_tensor(t) else [m[s] for m in t] for t in b)
              for b in big for s in (slice(0, 16), slice(16, 32))]
    params = {}
    for name, data, A in (('big', big, 1), ('acc', halves, 2)):
        model = tiny_model()
        opt = torch.optim.SGD(param_groups(model, 0.0), lr=0.5)
        Trainer(model, data, optimizer=opt, epochs=1, accum_steps=A, lr=0.5, weight_decay=0.0, weight_decay_end=None,
                clip_grad=None, amp='off', log_every=100).fit()
        params[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    moved = (params['big'] - start).norm()
    assert moved > 1e-3
    assert (params['acc'] - params['big']).norm() < 1e-4 * moved.clamp_min(1), (params['acc'] - params['big']).norm()


class DeviceReads:
    "Count the calls that make the CPU wait for a tensor's value (item, tolist, bool, float) inside the block."
    NAMES = ('item', 'tolist', '__bool__', '__float__')
    def __enter__(self):
        self.n, self._orig = 0, {k: getattr(torch.Tensor, k) for k in self.NAMES}
        for k, f in self._orig.items(): setattr(torch.Tensor, k, self._counted(f))
        return self
    def _counted(self, f):
        def g(t, *a, **kw): self.n += 1; return f(t, *a, **kw)
        return g
    def __exit__(self, *exc):
        for k, f in self._orig.items(): setattr(torch.Tensor, k, f)


def lin_forward(trainer, batch):
    "A forward with no device reads of its own: the reads counted below are the trainer's (and AdamW's)."
    out = trainer.model(batch[0])
    loss = out.pow(2).mean()
    return loss, {'loss': loss.detach(), 'a': 2 * loss.detach(), 'b': 3 * loss.detach()}, out


def lin_trainer(A=1, **kw):
    torch.manual_seed(0)
    data = [(torch.randn(4, 8),) for _ in range(64)]
    return Trainer(torch.nn.Linear(8, 8), data, max_steps=8, accum_steps=A, amp='off', collapse_every=100,
                   forward_fn=lin_forward, **kw)


def test_step_reads_the_device_a_fixed_number_of_times_whatever_accum_steps():
    "Loss parts are summed as tensors: 1 or 4 micro-batches cost the same reads (the NaN vote, the grad-norm check)."
    reads = {}
    for A in (1, 4):
        tr = lin_trainer(A)
        tr.train_step()                                                     # warm-up (lazy optimiser state)
        with DeviceReads() as r: m = tr.train_step()
        reads[A] = r.n
        assert all(torch.is_tensor(m[k]) for k in ('loss', 'a', 'b', 'grad_norm'))
    assert reads[1] == reads[4], reads
    assert reads[1] <= 2 + 4, reads                                         # vote + grad check + AdamW's step counters


def test_a_logged_step_reads_its_metrics_at_once():
    "fit turns a logged step's tensors into floats in one read, not one per metric."
    class Count(Callback):
        def __init__(self): self.reads = []
        def before_step(self, trainer): self.r = DeviceReads().__enter__()
        def after_step(self, trainer, metrics): self.r.__exit__(); self.reads.append(self.r.n)
    c = Count()
    lin_trainer(log_every=2, callbacks=[c]).fit()
    assert c.reads[1] - c.reads[2] == 1 and c.reads[3] - c.reads[2] == 1, c.reads   # steps 2, 4 logged; 3 not


def test_numbers_become_the_configured_schedules():
    "lr -> warm-up + cosine to min_lr, weight_decay -> cosine to weight_decay_end (None: constant), momentum likewise."
    tr = Trainer(tiny_model(), loader(), max_steps=50, lr=2e-3, min_lr=1e-5, warmup_frac=0.2, weight_decay=0.05,
                 weight_decay_end=0.5, momentum=0.9, momentum_end=None)
    assert [tr.lr(0), tr.lr(10), tr.lr(50)] == [0.0, 2e-3, 1e-5]
    assert abs(tr.wd(0) - 0.05) < 1e-12 and abs(tr.wd(50) - 0.5) < 1e-12 and tr.momentum(0) == tr.momentum(50) == 0.9
    assert tr.optimizer.param_groups[0]['weight_decay'] == 0.05
    with pytest.raises(ValueError, match='min_lr=0.01 is above lr=0.001'):
        Trainer(tiny_model(), loader(), max_steps=5, lr=1e-3, min_lr=1e-2)
    with pytest.raises(TypeError, match='weight_decay must be a number or a function'):
        Trainer(tiny_model(), loader(), max_steps=5, weight_decay='0.1')


def test_total_steps_is_the_one_formula():
    assert total_steps(7, 3, 10) == 7 and total_steps(None, 3, 10, accum_steps=4) == 7
    assert total_steps(None, 1, 2, 4) == 1
    tr = Trainer(tiny_model(), loader(), epochs=3, accum_steps=2)          # 6 batches per epoch
    assert tr.total_steps == total_steps(None, 3, len(loader()), 2) == 9
    with pytest.raises(ValueError, match='max_steps= or epochs='): total_steps(None, None, 10)


def test_param_groups_exclude_biases_norms_embeddings_from_weight_decay():
    model = tiny_model()
    tr = Trainer(model, loader(), max_steps=1, weight_decay=lambda step: 0.1 + step, log_every=100)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, keep = ([names[id(p)] for p in g['params']] for g in tr.optimizer.param_groups)
    assert tr.optimizer.param_groups[1]['weight_decay'] == 0.0
    for n in keep: assert n.endswith('.bias') or 'norm' in n or n.endswith('mask_token'), n
    assert 'predictor.mask_token' in keep and 'context_encoder.norm.weight' in keep
    assert all(n.endswith('weight') and dict(model.named_parameters())[n].ndim >= 2 for n in decay)
    assert not any(n.startswith('target_encoder') for n in decay + keep)
    tr.fit()                                                               # the wd schedule moves only the decay group
    assert tr.optimizer.param_groups[0]['weight_decay'] == 1.1 and tr.optimizer.param_groups[1]['weight_decay'] == 0.0


def test_bad_settings_are_rejected_with_the_parameter_name():
    with pytest.raises(ValueError, match='max_steps= or epochs='): Trainer(tiny_model(), loader())
    with pytest.raises(ValueError, match='accum_steps'): Trainer(tiny_model(), loader(), max_steps=2, accum_steps=0)
    for bad, msg in ((dict(amp='fp16'), "amp='fp16' needs a CUDA"), (dict(val_every=0), 'val_every must be an int in'),
                     (dict(log_every=None), 'log_every must be an integer')):
        with pytest.raises(ValueError, match=msg): Trainer(tiny_model(), loader(), max_steps=2, **bad)
    with pytest.raises(ValueError, match='out_dir'): Trainer(tiny_model(), loader(), max_steps=2).resume()


# hjepa.trainer's public names before the parts of the loop moved to hjepa.loop (chapter 09_loop)
TRAINER_NAMES = ['NO_DECAY', 'AMP_MODES', 'AUTO_CPU', 'param_groups', 'amp_dtype', 'StopOnSignal', 'Callback',
                 'EarlyStopping', 'batch_size_of', 'jepa_forward', 'total_steps', 'Trainer']


def test_every_public_name_still_imports_from_hjepa_trainer():
    import importlib
    trainer, loop = importlib.import_module('hjepa.trainer'), importlib.import_module('hjepa.loop')
    from_core = ['seed_everything', 'to_device', 'is_main_process']     # hjepa.core's, imported by the trainer
    missing = [n for n in TRAINER_NAMES + from_core if not hasattr(trainer, n)]
    assert not missing, f"no longer importable from hjepa.trainer: {missing}"
    assert set(TRAINER_NAMES) <= set(trainer.__all__), "`from hjepa.trainer import *` must still give every name"
    moved = [n for n in TRAINER_NAMES if n != 'Trainer']
    assert set(moved) <= set(loop.__all__)
    copies = [n for n in moved if getattr(trainer, n) is not getattr(loop, n)]
    assert not copies, f"hjepa.trainer must re-export hjepa.loop's objects, not define its own: {copies}"
    ns = {}
    exec('from hjepa.trainer import *', ns)
    assert set(TRAINER_NAMES) <= set(ns)
