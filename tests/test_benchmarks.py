"""`benchmarks/run.py --quick` (hjepa against lightly on identical work) runs and prints every closing line.

Not timed: the numbers of a CI-sized run on a shared machine say nothing; the test checks that the comparison runs,
that the work is matched (both sides count the same model FLOPs per step) and that every RATIO / MFU line is there.
Skipped where lightly (the `bench` extra) is not installed.
"""
import json, math, os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RATIOS = ('throughput_fp32', 'throughput_bf16', 'bf16_vs_peer_fp32', 'masks', 'memory', 'probe')


def test_quick_benchmark_prints_every_ratio_on_matched_work(tmp_path):
    pytest.importorskip('lightly', reason='the bench extra: pip install -e ".[bench]"')
    out = tmp_path / 'perf.json'
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'run.py'), '--quick', '--json', str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    got = dict(re.findall(r'^RATIO (\w+) (\S+)$', p.stdout, re.M))
    assert sorted(got) == sorted(RATIOS), p.stdout[-2000:]
    for k, v in got.items(): assert math.isfinite(float(v)) and float(v) > 0, (k, v)
    mfu = re.findall(r'^MFU (\S+)$', p.stdout, re.M)
    assert len(mfu) == 1 and 0 < float(mfu[0]) < 2, mfu
    r = json.loads(out.read_text())
    # identical work: the same model FLOPs per step on both sides (a mis-sized peer model would differ)
    for prec in ('flops_fp32', 'flops_bf16'):
        assert r[prec]['hjepa'] == pytest.approx(r[prec]['lightly'], rel=0.01), r[prec]
    # the printed ratios are the stored numbers' ratios
    assert float(got['throughput_fp32']) == pytest.approx(r['fp32']['hjepa'] / r['fp32']['lightly'], rel=1e-2)
    assert float(got['memory']) == pytest.approx(r['memory']['hjepa'] / r['memory']['lightly'], rel=1e-2)
    # every step trained (finite losses) and each process's own peak is at least torch's footprint
    for k in ('loss_fp32', 'loss_bf16'): assert all(math.isfinite(v) for v in r[k].values()), r[k]
    assert all(m > 100e6 for m in r['memory'].values()), r['memory']
    assert all(0 <= r['probe'][s]['acc'] <= 1 and r['probe'][s]['steps'] > 0 for s in r['probe']), r['probe']
