"""Mask generation speed: hjepa's vectorised generator vs lightly's I-JEPA collator, same settings, one process.

    python benchmarks/masks.py [--batch 256] [--grid 14] [--seconds 3] [--threads 1] [--hang-check]

Both run as a DataLoader `collate_fn` on the same list of samples (batch 256, 14×14 grid = 224 px / 16 px patches,
the I-JEPA paper's settings: 4 targets of scale (0.15, 0.2), aspect (0.75, 1.5), one context of scale (0.85, 1.0),
min_keep 10). One torch thread by default, as in a DataLoader worker. Prints masks/s of each and the ratio, and
what each keeps as context (after trimming to the batch minimum) and whether lightly's contexts overlap targets.
`--hang-check` also runs both on the course's 8×8 grid (32 px / 4 px patches) with min_keep=10, the reference in a
subprocess with a timeout, because it never returns there.
"""
import argparse, subprocess, sys, time

import torch

from hjepa.masking import HierarchicalMaskGenerator, MaskCollator, MultiBlockMaskGenerator


def rate(fn, batch, seconds, min_calls=3):
    "Masks per second of `fn(batch)`, timed over at least `seconds` (after one warm-up call)."
    fn(batch)
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < seconds:
        fn(batch); n += 1
    return n * len(batch) / (time.perf_counter() - t0)


def overlap_frac(ctx, tgts):
    "Share of samples whose context contains a target patch."
    hit = torch.zeros(ctx.shape[0], int(max(ctx.max(), max(t.max() for t in tgts))) + 1, dtype=torch.bool)
    for t in tgts: hit.scatter_(1, t, True)
    return hit.gather(1, ctx).any(1).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--grid', type=int, default=14)
    ap.add_argument('--seconds', type=float, default=3.0)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--hang-check', action='store_true',
                    help='also try the 8x8 grid with min_keep=10 (reference in a subprocess)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lightly.data import IJEPAMaskCollator
    ref = IJEPAMaskCollator(input_size=a.grid * 16, patch_size=16, enc_mask_scale=(0.85, 1.0),
                            pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10,
                            allow_overlap=False)
    ours = MaskCollator(MultiBlockMaskGenerator(grid=(a.grid, a.grid), enc_scale=(0.85, 1.0), pred_scale=(0.15, 0.2),
                                                aspect=(0.75, 1.5), nenc=1, npred=4, min_keep=10,
                                                allow_overlap=False), seed=0)
    batch = [(torch.zeros(1), i) for i in range(a.batch)]
    # interleave short rounds so both see the same CPU load (the machine may be shared); report the median ratio
    rounds = [(rate(ref, batch, a.seconds / 5, 1), rate(ours, batch, a.seconds / 5)) for _ in range(5)]
    r_ref, r_ours = (sorted(x)[2] for x in zip(*rounds))
    ratios = sorted(o / r for r, o in rounds)
    r_h3 = rate(MaskCollator(HierarchicalMaskGenerator(grid=(a.grid, a.grid), num_levels=3)), batch, a.seconds)
    # what each keeps as context, over a few batches
    N, k_ref, k_ours, ov = a.grid ** 2, [], [], []
    for _ in range(5):
        _, ctx, tgt = ref(batch); k_ref.append(ctx[0].shape[1] / N); ov.append(overlap_frac(ctx[0], tgt))
        _, _, mc, mt = ours(batch); k_ours.append(mc.shape[1] / N)
    print(f"batch {a.batch}, grid {a.grid}x{a.grid}, paper defaults, torch threads {a.threads}")
    print(f"lightly IJEPAMaskCollator : {r_ref:10.0f} masks/s   context keeps {sum(k_ref)/5:.1%} of patches; "
          f"{sum(ov)/5:.1%} of its contexts overlap a target")
    print(f"hjepa MultiBlockMaskGenerator: {r_ours:10.0f} masks/s   context keeps {sum(k_ours)/5:.1%} of patches; "
          "0% overlap")
    print(f"ratio (hjepa / lightly): {ratios[2]:.1f}x  "
          f"(median of 5 interleaved rounds; range {ratios[0]:.1f}x..{ratios[-1]:.1f}x)")
    print(f"(for reference: hjepa HierarchicalMaskGenerator, 3 levels: {r_h3:.0f} masks/s)")
    if a.hang_check: hang_check()


REF_8x8 = """
import torch
from lightly.data import IJEPAMaskCollator
c = IJEPAMaskCollator(input_size=32, patch_size=4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
                      aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10)
for i in range(10):
    c([(torch.zeros(1), 0)] * 64); print(i, flush=True)
"""


def hang_check(timeout=30):
    "The 8×8 grid with min_keep=10: the reference loops forever once a batch draws 3×3 targets (9 patches, never > 10)."
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, '-c', REF_8x8], timeout=timeout, check=True, capture_output=True, text=True)
        print(f"8x8, min_keep=10: lightly made 10 batches in {time.perf_counter() - t0:.1f}s")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
        print(f"8x8, min_keep=10: lightly made {len(out.split())} of 10 batches, "
              f"then nothing for the rest of {timeout}s (it loops forever: that batch drew 3x3 targets)")
    gen = MultiBlockMaskGenerator(grid=(8, 8), min_keep=10)
    t0 = time.perf_counter(); gen(64, torch.Generator().manual_seed(0))
    print(f"8x8, min_keep=10: hjepa made a batch of 64 in {1e3 * (time.perf_counter() - t0):.1f} ms, "
          f"context keeps {gen.last_stats['ctx_keep']:.0%} of the grid")


if __name__ == '__main__':
    main()
