"""Everything CI checks, in order. Run from anywhere: `python tools/suite.py` (exit code 0 = all green).

 0. lint                  `ruff check .` (config: .ruff.toml): syntax, pyflakes, lines <= 120, loop-closure bugs
 1. notebooks clean       every notebook in nbs/ and lessons/ is what `nbdev_clean` would leave
 2. library in sync       `nbdev_export` (in a scratch copy) reproduces hjepa/ exactly
 3. pytest                tests/ and every notebook in nbs/ and lessons/ (via nbdev's test_nb)
 4. student labs          generated student notebooks fail their checkers; checkers reject wrong answers
 5. site                  assembled, processed by nbdev, `smalldocs check` (no broken links) and rendered;
                          chapter pages link library names to the library, never to a checker (test_site_links)
 6. browser               headless Chromium follows the rendered site's sidebar to a chapter and a lab

Steps 0-2 never modify your files. Options: --skip-browser, --only N[,N...].
"""
from __future__ import annotations
import argparse, filecmp, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY = sys.executable


def sh(*cmd, **kw) -> int:
    print('$', ' '.join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=kw.pop('cwd', ROOT), **kw).returncode


def notebooks_clean() -> bool:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for sub in ('nbs', 'lessons'):
            shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
        for sub in ('nbs', 'lessons'):
            if sh(BIN / 'nbdev_clean', '--fname', d / sub): return False
        dirty = [p.relative_to(d) for p in d.rglob('*.ipynb')
                 if not filecmp.cmp(p, ROOT / p.relative_to(d), shallow=False)]
    for p in dirty: print(f"  not clean: {p}")
    if dirty: print("  fix: run `nbdev_clean && nbdev_clean --fname lessons` and commit the notebooks")
    return not dirty


def library_in_sync() -> bool:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for f in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(ROOT / f, d / f)
        shutil.copytree(ROOT / 'nbs', d / 'nbs')
        if sh(BIN / 'nbdev_export', cwd=d): return False
        ours = {p.relative_to(ROOT / 'hjepa') for p in (ROOT / 'hjepa').rglob('*.py') if '__pycache__' not in p.parts}
        theirs = {p.relative_to(d / 'hjepa') for p in (d / 'hjepa').rglob('*.py')}
        bad = sorted(str(p) for p in ours ^ theirs) + sorted(str(p) for p in ours & theirs
                     if (ROOT / 'hjepa' / p).read_text() != (d / 'hjepa' / p).read_text())
    for p in bad: print(f"  out of sync with the notebooks: hjepa/{p}")
    if bad: print("  fix: edit the notebook (never hjepa/*.py), run `nbdev_export`, commit both")
    return not bad


def notebook_times():
    "Print how long each notebook took in the test run (the course promises under a minute each on CPU)."
    import json
    t = {}
    for f in (ROOT / '_exec').rglob('*.ipynb'):
        w = json.loads(f.read_text()).get('metadata', {}).get('hjepa_wall_s')
        if w is not None: t[str(f.relative_to(ROOT / '_exec'))] = w
    if not t: return
    at_once = f"with {WORKERS} notebooks at a time, " if WORKERS > 1 else ''
    print(f"\n=== notebook wall times (target: under 60 s each; measured {at_once}one torch thread each)")
    for k, v in sorted(t.items(), key=lambda kv: -kv[1]):
        print(f"  {v:6.1f}s  {k}" + ("   <-- over a minute" if v > 60 else ''))
    try: print(f"  (load average during the run: {os.getloadavg()[0]:.1f})")
    except OSError: pass


def _workers() -> int:
    try: import xdist  # noqa: F401
    except ImportError: return 1
    return max(1, min(2, os.cpu_count() or 1))

WORKERS = _workers()


def pytest(*args, parallel=True) -> bool:
    "pytest, spread over the CPU cores with pytest-xdist (one torch thread per worker: no oversubscription)."
    xd = ['-n', str(WORKERS), '--dist', 'worksteal'] if parallel and WORKERS > 1 else []
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'} if xd else None
    return sh(PY, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', '-rfE', *xd, *args, env=env) == 0


def ensure_chromium() -> bool:
    if shutil.which('chromium') or Path('/usr/bin/chromium').exists(): return True
    if os.geteuid() == 0 and shutil.which('apt-get'):
        print("  Chromium is missing: installing Debian's chromium for the browser test")
        if sh('apt-get', 'install', '-y', '-q', 'chromium') == 0: return True
        return sh('apt-get', 'update', '-q') == 0 and sh('apt-get', 'install', '-y', '-q', 'chromium') == 0
    print("  Chromium is missing: install Debian's `chromium` package (or run with --skip-browser)")
    return False


LATER_TESTS = ('test_labs', 'test_site', 'test_site_links')   # run by their own steps below

def lint() -> bool:
    "ruff over the notebooks (code cells), the tests, the tools and the benchmarks, with the project's .ruff.toml."
    ruff = BIN / 'ruff'
    if not ruff.exists(): print("  ruff is missing: `pip install -e '.[dev]'` installs it"); return False
    ok = sh(ruff, 'check', '.') == 0
    if not ok: print("  fix the lines above in the notebooks (never in hjepa/*.py), then `nbdev_export`")
    return ok


STEPS = [
    ('lint (ruff)', lint),
    ('notebooks clean', notebooks_clean),
    ('library in sync', library_in_sync),
    ('pytest: tests/ and every notebook', lambda: pytest('tests', *(f'--ignore=tests/{t}.py' for t in LATER_TESTS))),
    ('student labs fail their checkers', lambda: pytest('tests/test_labs.py')),
    ('site rendered, no broken links', lambda: sh(PY, ROOT / 'tools' / 'build_site.py') == 0
                                               and pytest('tests/test_site_links.py', parallel=False)),
    ('browser test of the site', lambda: ensure_chromium() and pytest('tests/test_site.py', parallel=False)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--skip-browser', action='store_true')
    ap.add_argument('--only', default='', help='comma-separated step numbers to run, e.g. 1,2')
    a = ap.parse_args(argv)
    only = {int(s) for s in a.only.split(',') if s}
    os.environ.update(WANDB_MODE='offline', MPLBACKEND='Agg', HJEPA_SITE_TEST='1')
    results, t_all = [], time.time()
    for i, (name, step) in enumerate(STEPS):
        if (only and i not in only) or (a.skip_browser and i == 6): continue
        if i == 6 and any(n == 5 and not ok for n, _, ok, _ in results):
            results.append((i, name, False, 0.0)); print("skipping the browser test: the site did not build"); continue
        print(f"\n=== {i}. {name}", flush=True)
        t0 = time.time()
        ok = bool(step())
        results.append((i, name, ok, time.time() - t0))
    notebook_times()
    print("\n=== summary")
    for i, name, ok, t in results: print(f"  {'PASS' if ok else 'FAIL'}  {i}. {name:<36} {t:6.0f}s")
    print(f"  total {time.time() - t_all:.0f}s")
    return 0 if results and all(ok for _, _, ok, _ in results) else 1


if __name__ == '__main__': sys.exit(main())
