"""The recipe search of the bundled job: H-JEPA variants on MNIST-5k at an equal CPU budget, probed three ways.

    python benchmarks/recipe.py        # every run of RUNS, 120 CPU-s each, 2 at a time (~25 min on 2 cores)
    python benchmarks/recipe.py --only '3 levels' 'no regulariser'

Each run is its own process with one thread (two run side by side on a 2-core machine), builds everything from
`configs/<config>.yaml` plus its overrides exactly as `hjepa train` does, and trains until it has used `budget`
seconds of CPU time (CPU time, not wall time: a run is not shortened by its neighbour; the schedules span the budget,
from a short calibration). At the end the eval encoder is probed on the held-out split with mean-pooled tokens,
2x2- and 4x4-grid-pooled tokens (4x4: the probe of `hjepa train`, `eval.pool`) and mean+max, and the context
encoder mean-pooled. A random-init row probes the same network untrained. The table goes to
benchmarks/results/recipe.{json,md}; chapter 13 shows it. `--only` re-runs some rows and keeps the others.
"""
from __future__ import annotations
import argparse, json, os, platform, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IJEPA_MASKS = ['mask.enc_scale=[0.85,1.0]', 'mask.pred_scale=[0.15,0.2]', 'mask.min_keep=16']   # the old default
RUNS = {   # name: (search dimension, config, overrides, budget factor); 'default' is `hjepa train` as bundled
    'default': ('the bundled job', 'default', [], 1),
    'random init (no training)': ('baseline: no pre-training', 'default', [], 0),
    'padded digits (fit=pad)': ('input', 'default', ['data.fit=pad'], 1),
    'default, seed 1': ('seed noise', 'default', ['train.seed=1'], 1),
    '1 level (I-JEPA)': ('levels', 'default', ['model.num_levels=1'], 1),
    '3 levels': ('levels', 'default', ['model.num_levels=3'], 1),
    'no level schedule': ('level weights', 'default', ['train.level_schedule=false'], 1),
    'no regulariser': ('regulariser', 'default', ['loss.vicreg_coeff=0'], 1),
    'VICReg x3': ('regulariser', 'default', ['loss.vicreg_coeff=0.3'], 1),
    'SIGReg instead': ('regulariser', 'default', ['loss.vicreg_coeff=0', 'loss.sigreg_coeff=0.5'], 1),
    "I-JEPA's masks": ('masks', 'default', IJEPA_MASKS + ['mask.npred=[3,1]'], 1),
    'large targets, large context': ('masks', 'default', ['mask.enc_scale=[0.85,1.0]', 'mask.min_keep=8'], 1),
    'predictor depth 2': ('predictor', 'default', ['model.pred_depth=2'], 1),
    'predictor width 96': ('predictor', 'default', ['model.pred_dim=96'], 1),
    'EMA 0.996': ('EMA', 'default', ['ema.momentum=0.996'], 1),
    'cross-crop prediction': ('augmentation', 'default', ['data.multicrop.strategy=cross_crop_prediction'], 1),
    '8 px patches (4x4 grid)': ('tokens', 'default', ['model.patch_size=8', 'mask.min_keep=3'], 1),
    'default, 3x budget': ('epochs in the budget', 'default', [], 3),
    'VICReg (views), for scale': ('sanity: a view method', 'vicreg', [], 1),
}
POOLS = ('mean', 'grid2', 'grid4', 'mean+max')


from methods import cpu_s, steps_in_budget   # noqa: E402 (benchmarks/ is on sys.path when a script of it runs)


def child(name: str, budget: float, out: Path):
    import torch
    from hjepa.config import load_config
    from hjepa.recipe import build_datasets, build_loaders, build_method, build_trainer, method_needs
    from hjepa.trainer import Callback, seed_everything
    from hjepa.eval import extract_features, pool_tokens, probe_features
    from hjepa.monitor import MultiLogger, effective_rank
    torch.set_num_threads(1)
    _, conf, over, factor = RUNS[name]
    budget = budget * factor
    path = None if conf == 'default' else ROOT / 'configs' / f'{conf}.yaml'
    cfg = load_config(path, over + ['train.epochs=1000', 'train.ckpt_every=100000', 'eval.knn_every=null'])
    seed_everything(cfg.train.seed)
    train_ds, test_ds = build_datasets(cfg)

    def probe_now(enc, pools):
        Ztr, ytr = extract_features(enc, train_ds, pool=None)             # tokens once, pooled several ways
        Zte, yte = extract_features(enc, test_ds, pool=None)
        res = {p: probe_features(pool_tokens(Ztr, p, enc.grid), ytr, pool_tokens(Zte, p, enc.grid), yte,
                                 k=cfg.eval.knn_k, T=cfg.eval.knn_temperature) for p in pools}
        m = Zte.mean(1)
        return {**{p: {'linear': r['linear'], 'knn': r['knn']} for p, r in res.items()},
                'eff_rank': float(effective_rank(m - m.mean(0)))}

    def fresh():
        seed_everything(cfg.train.seed)
        dl, _ = build_loaders(cfg, method_needs(cfg), train_ds, test_ds)
        return build_method(cfg), dl
    if budget <= 0:                                                       # the same network, never trained
        method, dl = fresh()
        res = {'run': name, 'dimension': RUNS[name][0], 'config': conf, 'overrides': over, 'budget_cpu_s': 0.0,
               'steps': 0, 'epochs': 0.0, 'img_per_s': float('nan'),
               'eval_encoder': probe_now(method.eval_encoder, POOLS)}
        out.write_text(json.dumps(res, indent=1)); return
    cfg.train.max_steps = steps_in_budget(cfg, *fresh(), budget)          # calibrated on a copy, then from scratch
    method, dl = fresh()

    class Budget(Callback):
        used, t = 0.0, 0.0
        def before_step(self, trainer): self.t = cpu_s()
        def after_step(self, trainer, metrics):
            self.used += cpu_s() - self.t
            if self.used >= budget: trainer.stop(f'budget of {budget} CPU-s used')
    b = Budget()
    tr = build_trainer(cfg, method, dl, logger=MultiLogger())
    tr.callbacks.append(b)
    tr.fit()
    res = {'run': name, 'dimension': RUNS[name][0], 'config': conf, 'overrides': over, 'budget_cpu_s': budget,
           'steps': tr.step,
           'epochs': round(tr.step / len(dl), 2), 'img_per_s': round(tr.step * cfg.data.batch_size / b.used, 1),
           'eval_encoder': probe_now(method.eval_encoder, POOLS)}
    if getattr(method, 'context_encoder', method.eval_encoder) is not method.eval_encoder:
        res['context_encoder'] = probe_now(method.context_encoder, ('mean',))
    out.write_text(json.dumps(res, indent=1))


def table(res: dict) -> str:
    "The markdown table: linear probe and k-NN on mean-pooled and 4x4-grid-pooled tokens (the probe of `hjepa train`)."
    nan = {'linear': float('nan'), 'knn': float('nan')}
    lines = ['| dimension | run | overrides | CPU-s | steps | img/s | linear, mean | k-NN, mean | linear, 2x2 | '
             'linear, 4x4 | k-NN, 4x4 | linear, context enc. | eff. rank |', '|---' * 13 + '|']
    for r in res['runs']:
        e, c = r['eval_encoder'], r.get('context_encoder', {}).get('mean', {})
        g4 = e.get('grid4', nan)
        lines.append(f"| {r['dimension']} | {r['run']} | {' '.join(r['overrides']) or '-'} | {r['budget_cpu_s']:.0f} | "
                     f"{r['steps']} | {r['img_per_s']:.0f} | {e['mean']['linear']:.3f} | {e['mean']['knn']:.3f} | "
                     f"{e['grid2']['linear']:.3f} | {g4['linear']:.3f} | {g4['knn']:.3f} | "
                     f"{c.get('linear', float('nan')):.3f} | {e['eff_rank']:.1f} |")
    px = res['pixels']
    lines.append(f"| baseline | raw pixels | | | | | {px['linear']:.3f} | {px['knn']:.3f} | | {px['linear']:.3f} | "
                 f"{px['knn']:.3f} | | |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--budget', type=float, default=120.0, help='training CPU-seconds (one thread) per run')
    p.add_argument('--jobs', type=int, default=2, help='runs side by side (one thread each)')
    p.add_argument('--only', nargs='*', help=f'runs to do (default all): {list(RUNS)}')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--child-out', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: return child(a.child, a.budget, Path(a.child_out))
    names = a.only or list(RUNS)
    if unknown := [n for n in names if n not in RUNS]: p.error(f"unknown runs {unknown}: choose from {list(RUNS)}")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}
    queue, running, done = list(names), [], []
    while queue or running:
        while queue and len(running) < a.jobs:
            n = queue.pop(0); f = out / f".recipe-{n}.json"
            running.append((n, f, subprocess.Popen([sys.executable, __file__, '--child', n, '--child-out', f,
                                                    '--budget', str(a.budget)], env=env)))
        time.sleep(1)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job); n, f, pr = job
            if pr.returncode: print(f"run {n!r} failed (exit {pr.returncode}): left out", flush=True); continue
            done.append(json.loads(f.read_text())); f.unlink()
            e = done[-1]['eval_encoder']
            print(f"{n:<24} linear {e['mean']['linear']:.3f}  k-NN {e['mean']['knn']:.3f}  "
                  f"grid2 {e['grid2']['linear']:.3f}  grid4 {e['grid4']['linear']:.3f}", flush=True)
    from hjepa.config import load_config
    from hjepa.recipe import build_datasets
    from hjepa.eval import probe_pixels
    import torch
    px = probe_pixels(*build_datasets(load_config()))
    res = {'budget_cpu_s': a.budget, 'threads_per_run': 1, 'dataset': 'mnist5k (4000 train / 1000 test)',
           'date': time.strftime('%Y-%m-%d'), 'machine': f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, torch {torch.__version__}", 'pixels': {k: float(px[k]) for k in ('linear', 'knn')},
           'runs': done}
    if a.only and (out / 'recipe.json').exists():                     # merge into the saved table, in RUNS order
        keep = [r for r in json.loads((out / 'recipe.json').read_text())['runs'] if r['run'] not in names]
        res['runs'] = [r for n in RUNS for r in keep + done if r['run'] == n]
    else: res['runs'] = [r for n in RUNS for r in done if r['run'] == n]
    (out / 'recipe.json').write_text(json.dumps(res, indent=1))
    (out / 'recipe.md').write_text(table(res) + '\n')
    print(table(res))


if __name__ == '__main__': main()
