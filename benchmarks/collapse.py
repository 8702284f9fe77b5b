"""Collapse, on a real run: the bundled default next to the same run with its anti-collapse pieces removed.

    python benchmarks/collapse.py              # two runs of --steps 300 on MNIST-5k (~3 min on 2 cores)

`healthy` is `hjepa train` as bundled; `collapsed` sets the regulariser to zero (`loss.vicreg_coeff=0`,
`loss.sigreg_coeff=0`) and the EMA momentum to 0 (the target encoder is a copy of the context encoder at every step,
so nothing slows the two down from agreeing on a constant). Both log the monitor's effective rank of the target
features (`eff_rank`, every `train.collapse_every` steps) and the k-NN probe during training (`probe/knn`), exactly
as any run does to its metrics.jsonl. Results go to benchmarks/results/collapse.json and collapse.png, which
chapter 13 shows.
"""
from __future__ import annotations
import argparse, json, os, platform, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {'healthy': [], 'collapsed': ['loss.vicreg_coeff=0', 'loss.sigreg_coeff=0', 'ema.momentum=0',
                                     'ema.momentum_end=0']}


def one(name: str, steps: int, every: int, tmp: Path) -> dict:
    from hjepa.config import load_config
    from hjepa.recipe import run_training
    from hjepa.monitor import read_jsonl
    cfg = load_config(None, RUNS[name] + [f'train.max_steps={steps}', f'eval.knn_every={every}',
                                          f'train.collapse_every={every}', 'log.console=false'])
    t = time.perf_counter()
    res = run_training(cfg, out=tmp / name, verbose=False)
    recs = read_jsonl(tmp / name / 'metrics.jsonl')
    return {'run': name, 'overrides': RUNS[name], 'steps': res['steps'], 'wall_s': round(time.perf_counter() - t, 1),
            'linear': res['probe_pretrained'], 'knn': res['knn_pretrained'], 'random_linear': res['probe_random'],
            'eff_rank': [(r['step'], r['eff_rank']) for r in recs if 'eff_rank' in r],
            'probe_knn': [(r['step'], r['probe/knn']) for r in recs if 'probe/knn' in r],
            'jepa_loss': [(r['step'], r['jepa']) for r in recs if 'jepa' in r]}


def plot(res: dict, path: Path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.4))
    for r in res['runs']:
        for ax, key in zip(axs, ('jepa_loss', 'eff_rank', 'probe_knn')):
            if r[key]: ax.plot(*zip(*r[key]), marker='o', ms=2, label=r['run'])
    for ax, title in zip(axs, ('JEPA loss (smooth L1)', 'effective rank of target features', 'k-NN probe (held-out)')):
        ax.set(title=title, xlabel='step'); ax.grid(alpha=0.3)
    axs[0].set_yscale('log'); axs[2].legend()
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--every', type=int, default=20, help='steps between monitor/probe points')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one(n, a.steps, a.every, Path(tmp)) for n in RUNS]
    res = {'steps': a.steps, 'date': time.strftime('%Y-%m-%d'), 'dataset': 'mnist5k (4000 train / 1000 test)',
           'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__}",
           'runs': runs}
    (out / 'collapse.json').write_text(json.dumps(res, indent=1))
    plot(res, out / 'collapse.png')
    for r in runs:
        print(f"{r['run']:<10} linear {r['linear']:.3f}  k-NN {r['knn']:.3f}  "
              f"final eff. rank {r['eff_rank'][-1][1]:.1f}  ({r['wall_s']:.0f} s)")


if __name__ == '__main__': main()
