"""Every method of chapter 13 on the same CPU budget, on MNIST-5k: linear probe, k-NN, effective rank, img/s, memory.

    python benchmarks/methods.py                     # all runs, --budget 120 CPU-seconds per thread each (~25 min)
    python benchmarks/methods.py --quick             # a 2-minute smoke run (budget 8 s, one probe), not for the table
    python benchmarks/methods.py --only dino simclr  # some runs

Each run is its own process (so its peak memory is its own) that builds everything from `configs/<method>.yaml`
exactly as `hjepa train` does, and trains until it has used `budget` seconds of CPU time per thread (CPU time, not wall
time, so that a short burst of another job does not shorten one run more than another; threads wait passively, so
waiting is not charged). Run it on an otherwise idle machine all the same: contention slows every step. A short
calibration first measures the cost of a step, so that the schedules (warm-up, cosine decay, EMA ramp, DINO's epochs)
span the budget.
The encoder is probed on the held-out split at four points of the budget; probe time is not charged. Results go to
benchmarks/results/methods.json and methods.png (the probe-over-time curves), which chapter 13 shows.
"""
from __future__ import annotations
import argparse, copy, json, os, platform, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {   # name: (config, overrides)
    'ijepa': ('ijepa', []),
    'hjepa (2 levels)': ('hjepa', []),
    'dino': ('dino', []),
    'dino, no freeze or warm-up': ('dino', ['method.freeze_last_layer=0', 'method.warmup_teacher_epochs=0']),
    'simclr': ('simclr', []),
    'vicreg': ('vicreg', []),
    'sigreg (LeJEPA)': ('sigreg', []),
    'ijepa + global_only': ('ijepa', ['data.multicrop.strategy=global_only']),
    'ijepa + global_with_local_context': ('ijepa', ['data.multicrop.strategy=global_with_local_context']),
    'ijepa + cross_crop_prediction': ('ijepa', ['data.multicrop.strategy=cross_crop_prediction']),
}


def cpu_s() -> float: return time.process_time()


def steps_in_budget(cfg, method, loader, budget: float, threads: int = 1) -> int:
    "Optimiser steps that fit `budget` CPU-seconds per thread, timed on a copy of `method` (4 steps after a warm-up)."
    from hjepa.monitor import MultiLogger
    from hjepa.recipe import build_trainer
    cal = build_trainer(cfg, copy.deepcopy(method), loader, logger=MultiLogger())
    cal.train_step(); t = cpu_s()
    for _ in range(4): cal.train_step()
    return max(8, int(budget / ((cpu_s() - t) / 4 / threads)))


def child(name: str, budget: float, threads: int, probes: int, out: Path):
    import torch
    from hjepa.config import load_config
    from hjepa.recipe import build_datasets, build_loaders, build_method, build_trainer, method_needs
    from hjepa.trainer import Callback, seed_everything
    from hjepa.eval import extract_features, probe_features
    from hjepa.monitor import MultiLogger, effective_rank
    torch.set_num_threads(threads)
    conf, over = RUNS[name]
    cfg = load_config(ROOT / 'configs' / f'{conf}.yaml', over + ['train.epochs=1000', 'train.ckpt_every=100000'])
    seed_everything(cfg.train.seed)
    train_ds, test_ds = build_datasets(cfg)
    train_dl, _ = build_loaders(cfg, method_needs(cfg), train_ds, test_ds)
    method = build_method(cfg)
    init = copy.deepcopy(method.state_dict())

    def probe_now(enc):
        Xtr, ytr = extract_features(enc, train_ds, pool=cfg.eval.pool)
        Xte, yte = extract_features(enc, test_ds, pool=cfg.eval.pool)
        r = probe_features(Xtr, ytr, Xte, yte, k=cfg.eval.knn_k, T=cfg.eval.knn_temperature)
        return {'linear': float(r['linear']), 'knn': float(r['knn']),
                'eff_rank': float(effective_rank(Xte - Xte.mean(0)))}      # of the centred test features

    # calibration: CPU seconds per step on a copy (its RNG use is undone by reseeding below)
    steps = steps_in_budget(cfg, method, train_dl, budget, threads)
    method.load_state_dict(init); seed_everything(cfg.train.seed)
    train_dl, _ = build_loaders(cfg, method_needs(cfg), train_ds, test_ds)
    cfg.train.max_steps = steps

    class Budget(Callback):
        "Charge training CPU time to the budget; probe at `probes` points of it (the probes are not charged)."
        def __init__(self):
            self.used, self.t, self.curve, self.next = 0.0, None, [], budget / probes
        def before_step(self, trainer): self.t = cpu_s()
        def after_step(self, trainer, metrics):
            self.used += (cpu_s() - self.t) / threads
            if self.used >= self.next or trainer.step >= steps:
                r = probe_now(method.eval_encoder)
                self.curve.append({'step': trainer.step, 'budget_s': round(self.used, 1), **r})
                self.next += budget / probes
            if self.used >= budget: trainer.stop(f'budget of {budget} CPU-s per thread used')

    b = Budget()
    tr = build_trainer(cfg, method, train_dl, logger=MultiLogger())
    tr.callbacks.append(b)
    t0 = time.perf_counter()
    summary = tr.fit()
    wall = time.perf_counter() - t0
    if not b.curve or b.curve[-1]['step'] != tr.step:
        b.curve.append({'step': tr.step, 'budget_s': round(b.used, 1), **probe_now(method.eval_encoder)})
    final = b.curve[-1]
    method.load_state_dict(init)
    rnd = probe_now(method.eval_encoder)
    n_img = tr.step * cfg.data.batch_size
    res = {'run': name, 'config': f'configs/{conf}.yaml', 'overrides': over, 'steps': tr.step,
           'planned_steps': steps, 'epochs': round(tr.step / len(train_dl), 2), 'cpu_s_per_thread': round(b.used, 1),
           'img_per_s': round(n_img / max(b.used, 1e-9), 1), 'wall_s_with_probes': round(wall, 1),
           'linear': final['linear'], 'knn': final['knn'], 'eff_rank': final['eff_rank'],
           'random_linear': rnd['linear'], 'random_knn': rnd['knn'],
           'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'curve': b.curve,
           'stop_reason': summary['stop_reason']}
    out.write_text(json.dumps(res, indent=1))


def plot(res: dict, path: Path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for r in res['runs']:
        xs = [0.0] + [c['budget_s'] for c in r['curve']]                 # budget 0: the same network at random init
        style = '--' if '+' in r['run'] or ',' in r['run'] else '-'
        for ax, key in zip(axs, ('linear', 'knn')):
            ax.plot(xs, [r[f'random_{key}']] + [c[key] for c in r['curve']], style, marker='o', ms=3, label=r['run'])
    for ax, key, title in zip(axs, ('linear', 'knn'), ('linear probe', 'k-NN (k=20)')):
        ax.axhline(res['pixels'][key], color='k', lw=1, ls=':', label='raw pixels')
        ax.set(xlabel='training CPU-seconds per thread', ylabel='held-out accuracy', title=f'MNIST-5k, {title}')
        ax.grid(alpha=0.3)
    axs[1].legend(fontsize=7, loc='lower right')
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def table(res: dict) -> str:
    lines = ["| run | steps | epochs | img/s | linear | k-NN | eff. rank | peak RSS (MB) |", "|---" * 8 + "|"]
    for r in sorted(res['runs'], key=lambda r: -r['linear']):
        lines.append(f"| {r['run']} | {r['steps']} | {r['epochs']} | {r['img_per_s']:.0f} | {r['linear']:.3f} | "
                     f"{r['knn']:.3f} | {r['eff_rank']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines.append(f"| raw pixels | | | | {res['pixels']['linear']:.3f} | {res['pixels']['knn']:.3f} | | |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--budget', type=float, default=120.0, help='training CPU-seconds per thread for each run')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--probes', type=int, default=4, help='probe points along the budget')
    p.add_argument('--only', nargs='*', help=f'runs to do (default all): {list(RUNS)}')
    p.add_argument('--quick', action='store_true', help='budget 8 s, one probe, results to a scratch folder')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--child-out', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: return child(a.child, a.budget, a.threads, a.probes, Path(a.child_out))
    if a.quick: a.budget, a.probes, a.out = 8.0, 1, str(Path(os.environ.get('TMPDIR', '/tmp')) / 'hjepa-bench-quick')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    names = a.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown: p.error(f"unknown runs {unknown}: choose from {list(RUNS)}")
    runs = []
    for n in names:
        f = out / f".run-{n.replace(' ', '_').replace('(', '').replace(')', '')}.json"
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, '--child', n, '--child-out', f, '--budget', str(a.budget),
                            '--threads', str(a.threads), '--probes', str(a.probes)],
                           env={**os.environ, 'OMP_NUM_THREADS': str(a.threads), 'OMP_WAIT_POLICY': 'PASSIVE'})
        if r.returncode: sys.exit(f"run {n!r} failed (exit {r.returncode})")
        runs.append(json.loads(f.read_text())); f.unlink()
        print(f"{n:<36} {runs[-1]['steps']:>5} steps  linear {runs[-1]['linear']:.3f}  k-NN {runs[-1]['knn']:.3f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    from hjepa.config import load_config
    from hjepa.recipe import build_datasets
    from hjepa.eval import probe_pixels
    tr, te = build_datasets(load_config())
    px = probe_pixels(tr, te)
    import torch
    res = {'budget_s': a.budget, 'threads': a.threads, 'dataset': 'mnist5k (4000 train / 1000 test)',
           'date': time.strftime('%Y-%m-%d'), 'machine': f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, torch {torch.__version__}", 'pixels': {k: float(px[k]) for k in ('linear', 'knn')},
           'runs': runs}
    if a.only and (out / 'methods.json').exists():                     # merge into the saved table
        old = json.loads((out / 'methods.json').read_text())
        keep = [r for r in old['runs'] if r['run'] not in names]
        res['runs'] = [r for n in RUNS for r in keep + runs if r['run'] == n]
    (out / 'methods.json').write_text(json.dumps(res, indent=1))
    plot(res, out / 'methods.png')
    (out / 'methods.md').write_text(table(res) + '\n')
    print(table(res))


if __name__ == '__main__': main()
