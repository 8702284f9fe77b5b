"""Where a training step's time goes: `torch.profiler` over a few steps of one side of `run.py`'s comparison.

    python benchmarks/profile_step.py [--side hjepa|lightly] [--amp off|bf16] [--steps 3] [--quick] [--rows 25]

Builds the same work as `benchmarks/run.py` (its data, model shapes and step), warms up, profiles `--steps` steps and
prints the operators sorted by their own CPU time (self time: where a fix would have to act).
"""
import argparse, os, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (benchmarks/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--side', choices=run.SIDES, default='hjepa')
    ap.add_argument('--amp', choices=('off', 'bf16'), default='off')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--rows', type=int, default=25)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(a.threads)
    c = dict(run.QUICK if a.quick else run.FULL)
    with tempfile.TemporaryDirectory() as tmp:
        run.make_data(c, Path(tmp) / 'data.pt')
        d = torch.load(Path(tmp) / 'data.pt', weights_only=True)
    side = (run.HJEPASide if a.side == 'hjepa' else run.LightlySide)(c, a.amp, run.Cycle(d['timing']))
    for _ in range(2): side.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps): side.step()
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=a.rows))
    print(f"load average {os.getloadavg()}")


if __name__ == '__main__': main()
