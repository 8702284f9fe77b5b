"""hjepa against a peer (lightly 1.6.0's I-JEPA modules) on identical work: step speed, memory, masks, probe, MFU.

    python benchmarks/run.py            # the full comparison, by hand (the issue's workload; minutes)
    python benchmarks/run.py --quick    # a CI-sized smoke run (a tiny model; checks that everything runs, not timed)
    python benchmarks/run.py --json benchmarks/results/perf.json   # also write the numbers

One worker process per side (`--worker hjepa|lightly`), both alive at once and driven in turn by this process, so the
sides are interleaved (round r: hjepa's steps, then lightly's) and load from other jobs hits both alike; medians.
Identical work, fed from one file this process writes: the same images, the same precomputed mask index tensors
(hjepa's generator; lightly's collator hangs on an 8x8 grid with min_keep=10), the same model shapes, batch,
precision and threads, AdamW, EMA every step, smooth-L1 on layer-normed targets, no VICReg, no clipping.
lightly is configured as follows (its example loop, `examples/pytorch/ijepa.py`, otherwise):
  - its backbone prepends a class token, so every patch index given to the backbone is shifted by one (+1), and the
    target encoder gets all 64 patch indices as `idx_keep`, so it encodes the same 64 tokens as hjepa's (not 65);
  - `IJEPAPredictor.from_vit_encoder` hard-codes width 768, so the predictor is built directly at hjepa's predictor
    width and depth, and its in/out projections are replaced by encoder-width <-> predictor-width linears.
Peak memory is `VmHWM` of each side's own process after its fp32 steps (a child's `ru_maxrss` starts at its
parent's high-water mark); the workers import only their own library. The model FLOPs of one step (forward and
backward, `torch.utils.flop_counter`) are counted for both sides: equal counts show the work is matched.
Closing lines, for scripts: `RATIO throughput_fp32|throughput_bf16|bf16_vs_peer_fp32|masks|memory|probe <x>` (hjepa
over lightly) and `MFU <fraction>` (hjepa's bf16 model FLOP/s over this machine's measured bf16 matmul rate).
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the hjepa of this checkout
SIDES = ('hjepa', 'lightly')
# the workload; --quick shrinks the model and the counts so the whole run is a smoke test
FULL = dict(img=32, patch=4, dim=192, depth=6, heads=3, pred_dim=96, pred_depth=4, pred_heads=3, batch=64,
            warmup=3, rounds=6, steps=4, bf16_rounds=6, bf16_steps=4, masks_batch=256, masks_s=3.0,
            probe_s=60.0, probe_train=4000, probe_test=1000, probe_batch=64)
QUICK = dict(img=32, patch=4, dim=64, depth=2, heads=2, pred_dim=32, pred_depth=1, pred_heads=2, batch=16,
             warmup=1, rounds=2, steps=2, bf16_rounds=2, bf16_steps=1, masks_batch=64, masks_s=0.4,
             probe_s=2.0, probe_train=400, probe_test=200, probe_batch=32)
MASKS = dict(enc_scale=(0.85, 1.0), pred_scale=(0.15, 0.2), aspect=(0.75, 1.5), nenc=1, npred=4, min_keep=10,
             allow_overlap=False)   # I-JEPA's settings (for the 8x8 training grid and the 14x14 mask benchmark)
SEED = 0


# ---------------------------------------------------------------- the work both sides get (built by this process)

def make_data(c: dict, path: Path):
    "Timing batches, a pool of mask batches and the probe split (MNIST-5k at 32 px, RGB), saved to `path`."
    import torch
    from hjepa.data import image_transform, load_dataset
    from hjepa.masking import MultiBlockMaskGenerator
    g = torch.Generator().manual_seed(SEED)
    grid = (c['img'] // c['patch'],) * 2
    gen = MultiBlockMaskGenerator(grid=grid, **MASKS)
    timing = [(torch.rand(c['batch'], 3, c['img'], c['img'], generator=g), *gen(c['batch'], generator=g))
              for _ in range(4)]
    pool = [gen(c['probe_batch'], generator=g) for _ in range(64)]
    ds = load_dataset('mnist5k', 'all', transform=image_transform(c['img'], channels=3))
    idx = torch.randperm(len(ds), generator=g)[:c['probe_train'] + c['probe_test']].tolist()
    X = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([int(ds[i][1]) for i in idx])
    n = c['probe_train']
    torch.save({'timing': timing, 'pool': pool, 'Xtr': X[:n], 'ytr': y[:n], 'Xte': X[n:], 'yte': y[n:]}, path)
    ctx = statistics.mean(b[1].shape[1] for b in timing)
    tgt = statistics.mean(b[2].shape[2] for b in timing)
    return ctx, tgt, timing[0][2].shape[1]


# ---------------------------------------------------------------- the two sides (each in its own worker process)

class HJEPASide:
    "hjepa's `HJEPA` (one level = I-JEPA, no head) trained by its `Trainer.train_step`."
    def __init__(self, c, amp, batches):
        import torch
        from hjepa.encoders import ViT
        from hjepa.model import HJEPA
        from hjepa.trainer import Trainer
        torch.manual_seed(SEED)
        enc = ViT(img_size=c['img'], patch_size=c['patch'], in_chans=3, embed_dim=c['dim'], depth=c['depth'],
                  num_heads=c['heads'], mlp_ratio=4.0)
        self.model = HJEPA(enc, num_levels=1, head='identity', predictor_embed_dim=c['pred_dim'],
                           depth=c['pred_depth'], num_heads=c['pred_heads'], mlp_ratio=4.0)
        self.trainer = Trainer(self.model, batches, max_steps=10**9, lr=lambda s: 1e-3, weight_decay=0.05,
                               weight_decay_end=None, momentum=0.996, momentum_end=None, clip_grad=None,
                               amp='bf16' if amp == 'bf16' else 'off', log_every=10**9, collapse_every=10**9)

    def step(self): return self.trainer.train_step()['loss']

    def features(self, X):
        import torch
        with torch.no_grad(): return self.model.target_encoder(X).mean(1)


class LightlySide:
    "lightly's `IJEPABackbone` + `IJEPAPredictor`, stepped as its example loop does (configured as the docstring says)."
    def __init__(self, c, amp, batches):
        import copy, torch
        from torch import nn
        from lightly.models import utils
        from lightly.models.modules.ijepa import IJEPABackbone, IJEPAPredictor
        torch.manual_seed(SEED)
        self.utils, self.amp, self.batches = utils, amp, iter(batches)
        n = (c['img'] // c['patch']) ** 2
        self.encoder = IJEPABackbone(image_size=c['img'], patch_size=c['patch'], num_layers=c['depth'],
                                     num_heads=c['heads'], hidden_dim=c['dim'], mlp_dim=4 * c['dim'])
        self.predictor = IJEPAPredictor(seq_length=1, num_layers=c['pred_depth'], num_heads=c['pred_heads'],
                                        hidden_dim=c['pred_dim'], predictor_embed_dim=c['pred_dim'], num_patches=n,
                                        mlp_dim=4 * c['pred_dim'], dropout=0.0, attention_dropout=0.0)
        self.predictor.predictor_embed = nn.Linear(c['dim'], c['pred_dim'])     # was mlp_dim -> width
        self.predictor.predictor_proj = nn.Linear(c['pred_dim'], c['dim'])      # was width -> mlp_dim
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        params = [p for m in (self.encoder, self.predictor) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        self.crit = nn.SmoothL1Loss()
        self.all_idx = torch.arange(1, n + 1)                                   # every patch, past the class token

    def step(self):
        import torch
        import torch.nn.functional as F
        x, masks_ctx, masks_tgt = next(self.batches)
        B = x.shape[0]
        masks_pred = list(masks_tgt.unbind(1))                                  # M x [B, K]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.amp == 'bf16'):
            with torch.no_grad():
                h = self.target(x, idx_keep=self.all_idx.expand(B, -1))
                h = F.layer_norm(h, (h.size(-1),))
                h = self.utils.apply_masks(h, masks_pred)                       # [M*B, K, D]
            z = self.encoder(x, idx_keep=masks_ctx + 1)
            z = self.predictor(z, masks_ctx, masks_pred)                        # [M*B, K, D]
            loss = self.crit(z, h)
        loss.backward()
        self.opt.step(); self.opt.zero_grad()
        with torch.no_grad():                                                   # the example's EMA loop
            for q, k in zip(self.encoder.parameters(), self.target.parameters()):
                k.data.mul_(0.996).add_((1.0 - 0.996) * q.detach().data)
        return loss.detach()

    def features(self, X):
        import torch
        with torch.no_grad(): return self.target(X, idx_keep=self.all_idx.expand(len(X), -1)).mean(1)


class Cycle:
    "Endless iterable over a list of batches."
    def __init__(self, batches): self.batches = batches
    def __iter__(self):
        while True: yield from self.batches
    def __len__(self): return 10**9


def probe_batches(d, batch, seed=SEED):
    "Shuffled real batches `(x, masks_ctx, masks_tgt)`, masks cycled from the shared pool: the same for both sides."
    import torch
    g, i = torch.Generator().manual_seed(seed), 0
    while True:
        order = torch.randperm(len(d['Xtr']), generator=g)
        for s in range(0, len(order) - batch + 1, batch):
            yield (d['Xtr'][order[s:s + batch]], *d['pool'][i % len(d['pool'])]); i += 1


class _Iter:
    "A generator that looks like a sized loader (the Trainer asks for a length only when epochs= is given)."
    def __init__(self, it): self.it = it
    def __iter__(self): return self.it
    def __len__(self): return 10**9


def vm(key: str) -> int:
    "A field of /proc/self/status in bytes (VmHWM: this process's peak resident memory)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'): return int(line.split()[1]) * 1024
    return 0


def matmul_peak(dtype_name: str, quick: bool) -> float:
    "The best FLOP/s of a few matmul shapes in `dtype` on this process's threads (the machine's rate for MFU)."
    import torch
    dt = getattr(torch, dtype_name)
    shapes = [(512, 512, 512)] if quick else [(512, 512, 512), (1024, 1024, 1024), (4096, 192, 768)]
    best = 0.0
    for M, K, N in shapes:
        a, b = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
        a @ b.T
        for _ in range(3):
            t = time.perf_counter(); a @ b.T; best = max(best, 2 * M * K * N / (time.perf_counter() - t))
    return best


def worker(side: str):
    "Answer one JSON command per stdin line with one JSON line on stdout (everything else goes to stderr)."
    import torch
    out, sys.stdout = sys.stdout, sys.stderr
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', '1')))
    Side = HJEPASide if side == 'hjepa' else LightlySide
    d = c = run = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op, ans = cmd['op'], {}
        if op == 'setup':
            d, c = torch.load(cmd['data'], weights_only=True), cmd['config']
        elif op == 'build':
            run = Side(c, cmd['amp'], Cycle(d['timing']))
        elif op == 'steps':
            times = []
            for _ in range(cmd['n']):
                t = time.perf_counter(); loss = run.step(); times.append(time.perf_counter() - t)
            ans = {'times': times, 'loss': float(loss)}
        elif op == 'flops':
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc: run.step()
            ans = {'flops': fc.get_total_flops()}
        elif op == 'mem':
            ans = {'hwm': vm('VmHWM'), 'rss': vm('VmRSS')}
        elif op == 'peak':
            ans = {'fp32': matmul_peak('float32', cmd['quick']), 'bf16': matmul_peak('bfloat16', cmd['quick'])}
        elif op == 'masks':
            ans = {'rate': mask_rate(side, cmd['batch'], cmd['seconds'])}
        elif op == 'probe':
            ans = probe(Side, c, d, cmd['seconds'], cmd['threads'], cmd['out'])
        elif op == 'quit':
            break
        out.write(json.dumps(ans) + '\n'); out.flush()


def mask_rate(side: str, batch: int, seconds: float) -> float:
    "Masks per second of this side's I-JEPA collator on a 14x14 grid (224 px / 16 px patches), as a collate_fn."
    import torch
    if side == 'hjepa':
        from hjepa.masking import MaskCollator, MultiBlockMaskGenerator
        fn = MaskCollator(MultiBlockMaskGenerator(grid=(14, 14), **MASKS), seed=SEED)
    else:
        from lightly.data import IJEPAMaskCollator
        m = MASKS
        fn = IJEPAMaskCollator(input_size=224, patch_size=16, enc_mask_scale=m['enc_scale'],
                               pred_mask_scale=m['pred_scale'], aspect_ratio=m['aspect'], nenc=m['nenc'],
                               npred=m['npred'], min_keep=m['min_keep'], allow_overlap=m['allow_overlap'])
    samples = [(torch.zeros(1), i) for i in range(batch)]
    fn(samples)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds: fn(samples); n += 1
    return n * batch / (time.perf_counter() - t0)


def probe(Side, c, d, seconds: float, threads: int, out: str) -> dict:
    "Pre-train a fresh fp32 model on real images for `seconds` CPU-seconds per thread; save held-out features."
    import torch
    run = Side(c, 'off', _Iter(probe_batches(d, c['probe_batch'])))
    steps, t0 = 0, time.process_time()
    while (time.process_time() - t0) / threads < seconds: run.step(); steps += 1
    f = {k: torch.cat([run.features(X[i:i + 256]) for i in range(0, len(X), 256)]).float()
         for k, X in (('tr', d['Xtr']), ('te', d['Xte']))}
    torch.save(f, out)
    return {'steps': steps}


# ---------------------------------------------------------------- the driver

class Worker:
    def __init__(self, side, threads):
        path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
        env = {**os.environ, 'BENCH_THREADS': str(threads), 'OMP_NUM_THREADS': str(threads),
               'MKL_NUM_THREADS': str(threads), 'PYTHONPATH': path}
        self.side = side
        self.p = subprocess.Popen([sys.executable, __file__, '--worker', side], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, op, **kw):
        self.p.stdin.write(json.dumps({'op': op, **kw}) + '\n'); self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line: raise RuntimeError(f"the {self.side} worker died during {op!r} (its error is above)")
        return json.loads(line)

    def close(self):
        try: self('quit')
        except (RuntimeError, BrokenPipeError, ValueError): pass
        self.p.wait(timeout=30)


def timed(ws, amp, c, rounds, steps, warmup):
    "Build both sides at `amp`, warm up, then `rounds` rounds of `steps` steps each, alternating sides: img/s medians."
    for w in ws.values(): w('build', amp=amp)
    for w in ws.values(): w('steps', n=warmup)
    times, losses = {s: [] for s in ws}, {}
    for r in range(rounds):
        for s in (SIDES if r % 2 == 0 else SIDES[::-1]):                       # who goes first alternates too
            a = ws[s]('steps', n=steps); times[s] += a['times']; losses[s] = a['loss']
    return {s: c['batch'] / statistics.median(t) for s, t in times.items()}, times, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='a tiny model and few steps: checks that it runs (CI)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads per side (default: 1 quick, else 2)')
    ap.add_argument('--probe-s', type=float, default=None, help='CPU-seconds per thread of pre-training for the probe')
    ap.add_argument('--json', type=Path, default=None, help='also write the numbers to this file')
    ap.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: return worker(a.worker)
    c = dict(QUICK if a.quick else FULL)
    if a.probe_s is not None: c['probe_s'] = a.probe_s
    threads = a.threads or (1 if a.quick else min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    ws = {s: Worker(s, threads) for s in SIDES}            # they import while this process builds the data
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ctx, tgt, M = make_data(c, tmp / 'data.pt')
            for w in ws.values(): w('setup', data=str(tmp / 'data.pt'), config=c)
            res = run_all(ws, c, threads, a.quick, tmp)
    finally:
        for w in ws.values(): w.close()
    res.update(config=c, threads=threads, quick=a.quick, ctx_tokens=ctx, tgt_tokens=tgt, npred=M,
               wall_s=time.perf_counter() - t_start, machine=machine())
    report(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return 0


def run_all(ws, c, threads, quick, tmp):
    from hjepa.eval import linear_probe
    from hjepa.loop import cpu_has_fast_bf16
    peak = ws['hjepa']('peak', quick=quick)
    fp32, t32, l32 = timed(ws, 'off', c, c['rounds'], c['steps'], c['warmup'])
    mem = {s: w('mem')['hwm'] for s, w in ws.items()}      # after the fp32 steps only: each process's own peak
    flops32 = {s: w('flops')['flops'] for s, w in ws.items()}
    fast = cpu_has_fast_bf16()
    if not fast and not quick:     # emulated bf16 is ~10x slower than fp32 here: a few steps tell that much
        print("this CPU has no bf16 hardware (AMX / AVX512-BF16): 2 timed bf16 steps per side", file=sys.stderr)
    bf16, t16, l16 = timed(ws, 'bf16', c, *((c['bf16_rounds'], c['bf16_steps'], c['warmup']) if fast or quick
                                            else (2, 1, 1)))
    flops16 = {s: w('flops')['flops'] for s, w in ws.items()}
    masks = {s: [] for s in SIDES}
    for r in range(5):                                     # interleaved short rounds, medians
        for s in SIDES: masks[s].append(ws[s]('masks', batch=c['masks_batch'], seconds=c['masks_s'] / 5)['rate'])
    masks = {s: statistics.median(v) for s, v in masks.items()}
    probe = {}
    for s, w in ws.items():
        steps = w('probe', seconds=c['probe_s'], threads=threads, out=str(tmp / f'{s}.pt'))['steps']
        import torch
        f = torch.load(tmp / f'{s}.pt', weights_only=True)
        d = torch.load(tmp / 'data.pt', weights_only=True)
        probe[s] = {'steps': steps, **linear_probe(f['tr'], d['ytr'], f['te'], d['yte'])}
    return dict(fp32=fp32, bf16=bf16, times_fp32=t32, times_bf16=t16, loss_fp32=l32, loss_bf16=l16, memory=mem,
                flops_fp32=flops32, flops_bf16=flops16, masks=masks, probe=probe, peak=peak, fast_bf16=fast)


def machine() -> dict:
    try: load = os.getloadavg()
    except OSError: load = None
    cpu = platform.processor()
    try:
        cpu = next(ln.split(':', 1)[1].strip() for ln in Path('/proc/cpuinfo').read_text().splitlines()
                   if ln.startswith('model name'))
    except (OSError, StopIteration): pass
    import torch
    return {'cpu': cpu, 'cores': os.cpu_count(), 'load': load, 'torch': torch.__version__,
            'python': platform.python_version()}


def report(r):
    h, L = 'hjepa', 'lightly'
    fp32, bf16, mem, m, p = r['fp32'], r['bf16'], r['memory'], r['masks'], r['probe']
    c, pk = r['config'], r['peak']
    mfu16 = r['flops_bf16'][h] * bf16[h] / c['batch'] / pk['bf16']
    mfu32 = r['flops_fp32'][h] * fp32[h] / c['batch'] / pk['fp32']
    mc = r['machine']
    load = ', '.join(f'{x:.1f}' for x in mc['load']) if mc['load'] else '?'
    print(f"\nmachine: {mc['cpu']}, {mc['cores']} cores, torch {mc['torch']}, {r['threads']} thread(s) per side, "
          f"load average {load}; bf16 in hardware: {r['fast_bf16']}")
    print(f"work: {c['img']} px, patch {c['patch']}, encoder {c['dim']}x{c['depth']} ({c['heads']} heads), predictor "
          f"{c['pred_dim']}x{c['pred_depth']}, batch {c['batch']}, {r['ctx_tokens']:.2f} context and "
          f"{r['npred']} x {r['tgt_tokens']:.2f} target tokens per image" + ('   [--quick: not for the table]'
                                                                            if r['quick'] else ''))
    rows = [('fp32 step, img/s (median)', fp32[h], fp32[L]), ('bf16-autocast step, img/s', bf16[h], bf16[L]),
            ('model GFLOP per step (fwd+bwd)', r['flops_fp32'][h] / 1e9, r['flops_fp32'][L] / 1e9),
            ('peak RSS, MB (VmHWM, fp32)', mem[h] / 1e6, mem[L] / 1e6),
            ('masks/s (14x14 grid, collate)', m[h], m[L]),
            ('linear probe acc (same CPU time)', p[h]['acc'], p[L]['acc']),
            ('  pre-training steps in that time', p[h]['steps'], p[L]['steps'])]
    print(f"\n| | {h} | {L} | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        fa = f'{a:.3f}' if a < 10 else f'{a:,.0f}'
        fb = f'{b:.3f}' if b < 10 else f'{b:,.0f}'
        print(f"| {name} | {fa} | {fb} | {a / b:.2f}x |")
    print(f"| hjepa bf16 vs lightly fp32, img/s | {bf16[h]:,.0f} | {fp32[L]:,.0f} | {bf16[h] / fp32[L]:.2f}x |")
    print(f"| share of matmul peak (fp32 {pk['fp32'] / 1e9:.0f}, bf16 {pk['bf16'] / 1e9:.0f} GFLOP/s) | "
          f"fp32 {mfu32:.0%}, bf16 {mfu16:.0%} | | |")
    print(f"\nwall time {r['wall_s']:.0f} s")
    print(f"RATIO throughput_fp32 {fp32[h] / fp32[L]:.3f}")
    print(f"RATIO throughput_bf16 {bf16[h] / bf16[L]:.3f}")
    print(f"RATIO bf16_vs_peer_fp32 {bf16[h] / fp32[L]:.3f}")
    print(f"RATIO masks {m[h] / m[L]:.3f}")
    print(f"RATIO memory {mem[h] / mem[L]:.3f}")
    print(f"RATIO probe {p[h]['acc'] / p[L]['acc']:.3f}")
    print(f"MFU {mfu16:.4f}")


if __name__ == '__main__': sys.exit(main())
