"""Every chapter (nbs/) and lab (lessons/, with its solutions) runs top to bottom, as `nbdev_test` runs it.

Each notebook goes through `nbdev.test.test_nb` (the function `nbdev_test` calls, with the skip flags
of settings.ini) exactly once per run; the executed copy is saved in `_exec/` so the site is rendered
from it without executing anything again.
"""
import json, sys, time
from configparser import ConfigParser
from pathlib import Path

import pytest
import nbdev.test as nbtest
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
from build_site import notebooks, source_hash, EXEC  # noqa: E402

cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
FLAGS = cfg['DEFAULT'].get('tst_flags', '').split()
LIMIT_S = 60   # every chapter and lab should run offline on CPU in under a minute (reported, not asserted:
               # a wall-clock limit in a test is flaky on a shared machine; tools/suite.py prints the table)


class RecordingShell(CaptureShell):
    "The shell nbdev's test_nb uses, remembering the notebook it ran (with outputs)."
    last = None
    def run_all(self, nb, *args, **kwargs):
        RecordingShell.last = nb
        return super().run_all(nb, *args, **kwargs)


def save_executed(rel: Path, ran, seconds: float) -> None:
    "Merge the outputs test_nb produced into the source notebook (directives intact) and save it in _exec/."
    nb = json.loads((ROOT / rel).read_text(encoding='utf-8'))
    cells = [c for c in nb['cells']]
    if ran is None or len(ran.cells) != len(cells): return      # site build will execute it itself
    for c, r in zip(cells, ran.cells):
        if c['cell_type'] == 'code':
            c['outputs'] = [dict(o) for o in r.get('outputs', [])]
            c['execution_count'] = r.get('execution_count')
    nb.setdefault('metadata', {})['hjepa_source_hash'] = source_hash(rel)
    nb['metadata']['hjepa_wall_s'] = round(seconds, 1)      # tools/suite.py prints these
    out = EXEC / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nb, indent=1, ensure_ascii=False, default=str), encoding='utf-8')


@pytest.mark.parametrize('rel', notebooks(), ids=lambda p: str(p))
def test_notebook(rel, monkeypatch):
    monkeypatch.setattr(nbtest, 'CaptureShell', RecordingShell)
    RecordingShell.last = None
    t0 = time.time()
    ok, _ = nbtest.test_nb(ROOT / rel, skip_flags=FLAGS, showerr=True)
    took = time.time() - t0
    assert ok, f"{rel} failed (its error is printed above)"
    save_executed(rel, RecordingShell.last, took)
