"""Time a full `Trainer.train_step` (forward, backward, clip, AdamW, EMA) of the nano H-JEPA in fp32 and bf16 autocast.

Usage: python benchmarks/trainer_amp.py [--batch 64 128] [--threads 1 2] [--reps 6]
The two precisions alternate, so load from other processes hits both alike; prints ms/step, img/s and the ratio.
"""
import argparse, time
import torch
from hjepa.model import HJEPA
from hjepa.masking import HierarchicalMaskGenerator, preset_8x8
from hjepa.trainer import Trainer


class Cycle:
    "Endless iterable over a few pre-built batches (no data-loading cost in the timing)."
    def __init__(self, batches): self.batches = batches
    def __iter__(self):
        while True: yield from self.batches
    def __len__(self): return 10**6


def bench(batch, threads, reps, levels=3):
    torch.set_num_threads(threads)
    gen = HierarchicalMaskGenerator(**preset_8x8(levels), num_levels=levels)
    g = torch.Generator().manual_seed(0)
    data = Cycle([(torch.rand(batch, 1, 32, 32), None, *gen(batch, generator=g)) for _ in range(4)])
    trainers = {}
    for amp in ('off', 'bf16'):
        torch.manual_seed(0)
        trainers[amp] = Trainer(HJEPA.from_preset('nano', in_chans=1, num_levels=levels), data, max_steps=10**6,
                                amp=amp, log_every=10**6, collapse_every=10**6)
        for _ in range(2): trainers[amp].train_step()          # warm-up
    times = {amp: [] for amp in trainers}
    for _ in range(reps):
        for amp, tr in trainers.items():
            for _ in range(3):
                t = time.perf_counter(); tr.train_step(); times[amp].append(time.perf_counter() - t)
    best = {amp: min(v) for amp, v in times.items()}
    med = {amp: sorted(v)[len(v) // 2] for amp, v in times.items()}
    for amp in trainers:
        print(f"batch {batch:4d} threads {threads}: {amp:4s} best {best[amp]*1e3:6.0f} ms/step "
              f"({batch/best[amp]:5.0f} img/s), median {med[amp]*1e3:6.0f} ms ({batch/med[amp]:5.0f} img/s)")
    print(f"batch {batch:4d} threads {threads}: bf16 speed-up x{best['off']/best['bf16']:.2f} (best), "
          f"x{med['off']/med['bf16']:.2f} (median)", flush=True)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, nargs='+', default=[64, 128])
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--reps', type=int, default=6)
    a = ap.parse_args()
    for th in a.threads:
        for b in a.batch: bench(b, th, a.reps)
