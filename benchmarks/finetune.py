"""Why pre-train: a linear probe, fine-tuning and the same ViT from scratch, at 1 %, 10 % and 100 % of the labels.

    python benchmarks/finetune.py --pretrained runs/pre     # ~10 min on one thread, after `hjepa train --out runs/pre`
    python benchmarks/finetune.py                           # pretrains the bundled default first (+5 min)

Held-out MNIST-5k (the 1000 test images of the stratified split `hjepa train` pretrains on; the pretraining never saw
a label). At each label fraction the labelled images are a stratified subset of the 4000 training images (every class
keeps its share). The three learners see the same labelled images:

- `probe`: the frozen pretrained encoder, mean-pooled features, the L-BFGS linear probe of chapter 11.
- `finetune`: the pretrained encoder + a linear head, trained end to end by chapter 14's recipe (layer-wise LR decay,
  warm-up + cosine, label smoothing, random shifts, model EMA) for `--steps` optimiser steps of `--batch` images.
- `scratch`: the same ViT at random init, trained by exactly the same recipe and budget.

Accuracy is of the trained weights without TTA (`acc`); the json adds TTA, EMA and EMA+TTA. Results go to
benchmarks/results/finetune.{json,md,png}, which chapter 14 shows.
"""
from __future__ import annotations
import argparse, copy, json, platform, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRACS = (0.01, 0.1, 1.0)


def pretrain(tmp: Path) -> Path:
    from hjepa.config import load_config
    from hjepa.recipe import run_training
    run_training(load_config(None, ['log.console=false']), out=tmp / 'pre', verbose=False)
    return tmp / 'pre'


def one(kind: str, encoder, pre_cfg: dict, frac: float, steps: int, batch: int, seed: int) -> dict:
    import torch
    from hjepa.config import load_finetune_config
    from hjepa.eval import encoder_kwargs, extract_features, linear_probe
    from hjepa.encoders import ViT
    from hjepa.finetune import build_finetune, finetune_data, held_out_report
    from hjepa.monitor import make_logger
    cfg = load_finetune_config(None, [f'data.label_frac={frac}', 'data.val_frac=0', 'train.patience=null',
                                      f'train.max_steps={steps}', f'data.batch_size={batch}', f'train.seed={seed}',
                                      'log.console=false'])
    data = finetune_data(pre_cfg, cfg)
    t = time.perf_counter()
    if kind == 'probe':
        Xtr, ytr = extract_features(encoder, data['train'])
        Xte, yte = extract_features(encoder, data['test'])
        res = {'acc': round(linear_probe(Xtr, ytr, Xte, yte)['acc'], 4)}
    else:
        torch.manual_seed(seed)
        enc = copy.deepcopy(encoder) if kind == 'finetune' else ViT(**encoder_kwargs(encoder))
        enc.train().requires_grad_(True)
        trainer, model, ema, _ = build_finetune(enc, cfg, data,
                                                logger=make_logger(None, console=False, jsonl=False, tensorboard=False))
        trainer.fit()
        r = held_out_report(model, *data['test'], ema, cfg.eval.tta)
        res = {'acc': r['test_acc'], 'acc_tta': r['test_acc_tta'], 'acc_ema': r['test_acc_ema'],
               'acc_ema_tta': r['test_acc_ema_tta'], 'steps': trainer.step}
    return {'kind': kind, 'label_frac': frac, 'n_labels': len(data['train'][1]), **res,
            'wall_s': round(time.perf_counter() - t, 1)}


def table(rows: list[dict]) -> str:
    by = {(r['kind'], r['label_frac']): r for r in rows}
    head = '| labels | ' + ' | '.join(f"{f:.0%} ({by[('probe', f)]['n_labels']})" for f in FRACS) + ' |'
    out = [head, '|---|' + '---|' * len(FRACS)]
    for kind, name in (('probe', 'linear probe (frozen pretrained)'), ('finetune', 'fine-tune pretrained'),
                       ('scratch', 'same ViT from scratch')):
        out.append(f'| {name} | ' + ' | '.join(f"{by[(kind, f)]['acc']:.3f}" for f in FRACS) + ' |')
    return '\n'.join(out)


def plot(rows: list[dict], path: Path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for kind, label in (('probe', 'linear probe'), ('finetune', 'fine-tune'), ('scratch', 'from scratch')):
        pts = sorted((r['n_labels'], r['acc']) for r in rows if r['kind'] == kind)
        ax.plot(*zip(*pts), 'o-', label=label)
    ax.set_xscale('log'); ax.set_xlabel('labelled training images'); ax.set_ylabel('held-out accuracy')
    ax.set_title('MNIST-5k: label efficiency, same budget'); ax.grid(alpha=0.3); ax.legend()
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--pretrained', help='run folder / checkpoint / encoder.pt (default: pretrain the bundled job)')
    ap.add_argument('--steps', type=int, default=120, help='optimiser steps of fine-tune and scratch (each fraction)')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from hjepa.finetune import load_pretrained
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(a.pretrained) if a.pretrained else pretrain(Path(tmp))
        encoder, pre_cfg = load_pretrained(src)
        rows = []
        for frac in FRACS:
            for kind in ('probe', 'finetune', 'scratch'):
                rows.append(one(kind, encoder, pre_cfg, frac, a.steps, a.batch, a.seed))
                print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = {'rows': rows, 'steps': a.steps, 'batch': a.batch, 'seed': a.seed, 'threads': a.threads,
           'pretrained': {k: pre_cfg.get(k) for k in ('method', 'model', 'train') if k in pre_cfg},
           'pretrained_steps_epochs': (pre_cfg.get('train') or {}).get('epochs'),
           'wall_s': round(time.perf_counter() - t0, 1), 'machine': platform.processor() or platform.machine(),
           'torch': torch.__version__}
    (out / 'finetune.json').write_text(json.dumps(res, indent=1))
    md = (f"Held-out accuracy on MNIST-5k (1000 test images) at each share of the 4000 training labels; fine-tune and "
          f"scratch: {a.steps} steps of {a.batch} images each, same recipe; probe: L-BFGS on frozen features.\n\n"
          + table(rows) + '\n')
    (out / 'finetune.md').write_text(md)
    plot(rows, out / 'finetune.png')
    print(md)


if __name__ == '__main__':
    main()
