"""Both sides of every lab.

- The lab sources (with solutions) pass: tests/test_notebooks.py runs them.
- The generated *student* notebook of every lab fails every one of its `check(...)` cells, by printing the report
  (not raising, so "Run All" goes on), and raises `ExerciseFailed` in strict mode.
- Every registered exercise rejects the unimplemented stub and each of its plausible wrong answers,
  and accepts the lab's reference solution.
- Every wrong answer has its own diagnosis, and `check` prints that one (not another's) for it.
- Every exercise a lab checks is registered, and every solution function has a checker.
- The wrong answers are private: they never become library names (in `__all__` or nbdev's symbol index).
"""
import ast, importlib, json, re
from pathlib import Path

import pytest

from hjepa.labs import (EXERCISES, ExerciseFailed, _HINTS_SEEN, _load_checkers, check, hint, is_solution, run_cells,
                        stub_source, write_student_lab, list_labs)

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted((ROOT / 'lessons').glob('[0-9]*.ipynb'))
_load_checkers()
_CHECK = re.compile(r'^check\((\w+)', re.M)


def cells(nb, kind='code'):
    return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == kind]


def solution_functions(nb):
    "Names of the functions defined in the lab's #| solution cells."
    return [n.name for src in cells(nb) if is_solution(src)
            for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)]


def test_there_are_labs():
    assert LABS, "no labs in lessons/"
    assert [n for n, _, _ in list_labs()] == [p.name.split('_')[0] for p in LABS]


@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.name)
def test_lab_is_wired(lab):
    nb = json.loads(lab.read_text())
    sols, checked = solution_functions(nb), [m for src in cells(nb) for m in _CHECK.findall(src)]
    assert len(sols) >= 2, f"{lab.name}: a lab needs at least two exercises, found {sols}"
    for name in sols:
        assert name in EXERCISES, f"{lab.name}: solution `{name}` has no registered checker (add one in nbs/checks/)"
        assert name in checked, f"{lab.name}: solution `{name}` is never passed to check(...)"
        assert EXERCISES[name].lab == lab.name.split('_')[0], f"{name} is registered for lab {EXERCISES[name].lab}"


@pytest.mark.parametrize('strict', [False, True], ids=['learner', 'strict'])
@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.name)
def test_student_lab_fails_its_checks(lab, tmp_path, monkeypatch, strict):
    """Generate the student notebook (as `hjepa lab` does) and run it: every check cell must fail. As a learner runs
    it, a failing check prints its report and raises nothing; in strict mode it raises `ExerciseFailed`."""
    monkeypatch.setenv('HJEPA_STRICT_CHECKS', '1' if strict else '0')
    out = write_student_lab(lab.name.split('_')[0], tmp_path)
    nb = json.loads(out.read_text())
    assert not any(is_solution(s) for s in cells(nb)), "a solution cell survived in the student notebook"
    results = run_cells(nb, cwd=tmp_path, with_output=True)
    checks = [(src, exc, text) for _, src, exc, text in results if _CHECK.search(src)]
    assert checks, "the student lab has no check(...) cells"
    for src, exc, text in checks:
        if strict:
            assert isinstance(exc, ExerciseFailed), f"`{src.strip()}` did not fail on the student stub (got {exc!r})"
            assert 'not implemented yet' in str(exc)
        else:
            assert exc is None, f"`{src.strip()}` raised {exc!r}: a failing check must print, not stop Run All"
            assert '✗' in text and 'not implemented yet' in text, f"`{src.strip()}` printed {text!r}"
            assert 'Well done' not in text


@pytest.mark.parametrize('name', sorted(EXERCISES), ids=str)
def test_checker_rejects_stub_and_wrong_answers(name):
    ex = EXERCISES[name]
    assert len(ex.tests) >= 2, f"{name}: a checker needs several properties, has {len(ex.tests)}"
    assert ex.wrongs, f"{name}: register at least one plausible wrong answer with @ex.wrong"
    def stub(*a, **k): raise NotImplementedError("Exercise")
    assert not all(ok for _, ok, _ in ex.run(stub)), f"{name}: the checker accepts an unimplemented stub"
    for w in ex.wrongs:
        res = ex.run(w)
        assert not all(ok for _, ok, _ in res), \
            f"{name}: the checker accepts the wrong answer {w.__name__}: {w.__doc__!r}"


@pytest.mark.parametrize('name', sorted(EXERCISES), ids=str)
def test_each_wrong_answer_gets_its_own_diagnosis(name, capsys):
    """Every wrong answer carries a diagnosis (distinct within its exercise), and checking it prints that diagnosis,
    not another wrong answer's: two wrong answers the tests cannot tell apart fail here."""
    ex = EXERCISES[name]
    diags = [w.diagnosis for w in ex.wrongs]
    for w, d in zip(ex.wrongs, diags):
        assert len(d.split()) >= 3, f"{name}: the wrong answer {w.__name__} has no diagnosis ({d!r})"
    assert len(set(diags)) == len(diags), f"{name}: two wrong answers share a diagnosis: {diags}"
    for w in ex.wrongs:
        found = ex.diagnose(ex.run(w))
        assert found is not None and found[0] is w, \
            f"{name}: {w.__name__} is diagnosed as {found and found[0].__name__}: make a test tell them apart"
        capsys.readouterr()
        check(w, name=name, strict=False)
        printed = capsys.readouterr().out
        assert f"known mistake: {w.diagnosis}" in printed, f"{name}: checking {w.__name__} printed {printed!r}"
        assert not [o.__name__ for o in ex.wrongs if o is not w and o.diagnosis in printed]


@pytest.mark.parametrize('name', sorted(EXERCISES), ids=str)
def test_hints_are_given_one_at_a_time(name, capsys):
    "`hint` prints the first hint, then the next on each call; a passing check returns nothing (no stray True)."
    ex = EXERCISES[name]
    assert ex.hints, f"{name}: give at least one hint"
    _HINTS_SEEN.pop(name, None)
    for i, h in enumerate(ex.hints):
        hint(name)
        out = capsys.readouterr().out
        assert f"Hint {i + 1} of {len(ex.hints)}" in out and h in out, out


@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.name)
def test_reference_solutions_pass_their_checkers(lab):
    """Run only the lab's solution cells (no data loading) and check each function, so a checker that rejects the
    reference fails here."""
    nb = json.loads(lab.read_text())
    setup = [s for s in cells(nb) if re.match(r'^(import|from) ', s.strip()) and not is_solution(s)]
    ns = {}
    for src in setup + [s for s in cells(nb) if is_solution(s)]: exec(compile(src, str(lab), 'exec'), ns)
    for name in solution_functions(nb):
        res = EXERCISES[name].run(ns[name])
        assert all(ok for _, ok, _ in res), f"{lab.name}: reference `{name}` fails: {[m for _, ok, m in res if not ok]}"
        assert check(ns[name], strict=True, quiet=True) is None            # a pass returns nothing: no stray True


def test_stub_keeps_signature_and_docstring():
    src = '#| solution\ndef f(a, b=2):\n    "Doc."\n    return a + b\n'
    stub = stub_source(src)
    ns = {}; exec(stub, ns)
    import inspect
    assert str(inspect.signature(ns['f'])) == '(a, b=2)' and ns['f'].__doc__ == 'Doc.'
    with pytest.raises(NotImplementedError): ns['f'](1)


CHECKERS = sorted(p for p in (ROOT / 'nbs' / 'checks').glob('[0-9]*.ipynb') if (ROOT / 'nbs' / p.name).exists())


def test_every_checker_notebook_is_found():
    "`check` discovers the checkers by importing `hjepa.labs.checks.*`: each chapter's checker must be there."
    mods = {ex.tests[0][1].__module__ for ex in EXERCISES.values() if ex.tests}
    want = {f"hjepa.labs.checks.{p.stem.split('_', 1)[1]}" for p in CHECKERS}
    assert CHECKERS and want <= mods, f"checker modules never loaded by check(): {sorted(want - mods)}"
    assert all(m.startswith('hjepa.labs.checks.') for m in mods), sorted(mods)


def _library_names() -> set[str]:
    "Every name nbdev indexes for the library's own modules (not the checkers), as nbdev's lookup strips it."
    from hjepa._modidx import d
    return {k.removeprefix(m + '.') for m, syms in d['syms'].items() if not m.startswith('hjepa.labs') for k in syms}


@pytest.mark.parametrize('name', sorted(EXERCISES), ids=str)
def test_wrong_answers_are_private(name):
    ex = EXERCISES[name]
    for w in ex.wrongs:
        assert w.__name__.startswith('_wrong_'), \
            f"{name}: the wrong answer {w.__name__!r} must be private (`_wrong_{name}_<mistake>`), not a library name"
        mod = importlib.import_module(w.__module__)
        assert w.__name__ not in getattr(mod, '__all__', []), f"{w.__module__}.__all__ exports {w.__name__}"


def test_checkers_export_no_library_name():
    "A checker's public names (its `__all__`) and the names nbdev indexes for it never shadow a library name."
    from hjepa._modidx import d
    lib = _library_names()
    for m, syms in d['syms'].items():
        if not m.startswith('hjepa.labs.checks.'): continue
        public = set(importlib.import_module(m).__all__)
        leaked = sorted(n for n in public if not n.startswith('ex_'))
        assert not leaked, f"{m} exports {leaked}: make them private"
        clash = sorted({k.removeprefix(m + '.') for k in syms} & lib)
        assert not clash, f"{m} defines {clash}, which the library defines too: the site would link them to the checker"


def _frozen_clock(monkeypatch):
    "Every backup stamp falls in the same second, as when --force is run twice in a row."
    import hjepa.labs
    monkeypatch.setattr(hjepa.labs.time, 'strftime', lambda fmt, *a: '20250101-120000')


@pytest.mark.parametrize('links', [True, False], ids=['hard-links', 'no-hard-links'])
def test_force_twice_in_one_second_keeps_every_version(tmp_path, monkeypatch, links):
    "Edit, --force, edit, --force ... within one second (library and CLI): each edited version is its own backup."
    import os
    from hjepa.cli import main
    _frozen_clock(monkeypatch)
    if not links:                                              # a file system without hard links (FAT, some shares)
        def no_link(*a, **k): raise PermissionError(1, 'Operation not permitted (injected)')
        monkeypatch.setattr(os, 'link', no_link)
    out = write_student_lab('00', tmp_path)
    fresh = out.read_bytes()
    edits = [f'my work, version {i}\r\n'.encode() + bytes(range(256)) for i in range(5)]
    for i, edit in enumerate(edits):
        out.write_bytes(edit)
        if i % 2: assert main(['lab', '00', '--dest', str(tmp_path), '--force']) == 0
        else: write_student_lab('00', tmp_path, force=True)
        assert out.read_bytes() == fresh, "--force did not write a fresh student notebook"
    backups = sorted(tmp_path.glob(f'{out.stem}.backup-*{out.suffix}'))
    assert len(backups) == len(edits), [b.name for b in backups]
    assert sorted(b.read_bytes() for b in backups) == sorted(edits)          # bit for bit, none overwritten
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_concurrent_force_never_loses_the_notebook_or_a_backup(tmp_path, monkeypatch):
    "Six threads run --force at once next to an older backup: no error, no backup replaced, the edit survives."
    import threading
    _frozen_clock(monkeypatch)
    out = write_student_lab('00', tmp_path)
    fresh = out.read_bytes()
    old = out.with_name(f'{out.stem}.backup-20250101-120000{out.suffix}')
    old.write_bytes(b'an older backup')
    out.write_bytes(b'the edit')
    n, errors, go = 6, [], threading.Barrier(6)

    def force():
        go.wait()
        try: write_student_lab('00', tmp_path, force=True)
        except BaseException as e: errors.append(e)

    threads = [threading.Thread(target=force) for _ in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    assert old.read_bytes() == b'an older backup'
    backups = [b.read_bytes() for b in tmp_path.glob(f'{out.stem}.backup-*{out.suffix}')]
    assert len(backups) == n + 1                               # the old one + one per --force (out always existed)
    assert b'the edit' in backups and set(backups) <= {b'the edit', b'an older backup', fresh}
    assert out.read_bytes() == fresh


# --- the student copy works outside the repository (links to the course site, not to ../nbs/) ---

_MD_LINK = re.compile(r'\]\(([^)\s]+)\)')


def _site_pages() -> set[str]:
    "The site's pages as _quarto.yml's sidebar names them (`losses.ipynb` -> `losses.html`): written by hand there."
    import yaml
    cfg = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    hrefs, todo = set(), [cfg['website']['sidebar']['contents']]
    while todo:
        for item in todo.pop():
            if 'href' in item: hrefs.add(item['href'])
            if 'contents' in item: todo.append(item['contents'])
    return {h.removesuffix('.ipynb') + '.html' for h in hrefs if h.endswith('.ipynb')}


def test_course_site_url_is_baked_into_the_package():
    "The site URL a student copy links to is settings.ini's doc_host + doc_baseurl (and _quarto.yml's site-url)."
    import yaml
    from configparser import ConfigParser
    from hjepa.labs import course_urls
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini'); cfg = cfg['DEFAULT']
    want = cfg['doc_host'].rstrip('/') + '/' + cfg['doc_baseurl'].strip('/')
    assert course_urls()['site'] == want, "hjepa/_modidx.py is stale: run nbdev_export"
    assert yaml.safe_load((ROOT / '_quarto.yml').read_text())['website']['site-url'].rstrip('/') == want


@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.name)
def test_student_copy_links_point_at_the_course_site(lab, tmp_path):
    "`hjepa lab NN` writes a copy whose links are absolute: its chapter and the others on the site, by page name."
    from hjepa.cli import main
    from hjepa.labs import course_urls
    assert main(['lab', lab.name.split('_')[0], '--dest', str(tmp_path)]) == 0
    nb = json.loads((tmp_path / lab.name).read_text())
    md = '\n'.join(cells(nb, 'markdown'))
    links = _MD_LINK.findall(md)
    assert '../nbs/' not in md and 'nbs/' not in ' '.join(links)
    relative = [u for u in links if not re.match(r'^(https?://|#)', u)]
    assert not relative, f"{lab.name}: relative links in the student copy: {relative}"
    site, pages = course_urls()['site'] + '/', _site_pages()
    on_site = [u.split('#')[0].removeprefix(site) for u in links if u.startswith(site)]
    assert not [p for p in on_site if p not in pages], f"links to pages the site does not have: {on_site}"
    chapter = lab.name.split('_', 1)[1].removesuffix('.ipynb') + '.html'     # lessons/05_losses -> losses.html
    assert chapter in on_site, f"{lab.name}: no link to its chapter {site}{chapter}: {links}"
    source_links = _MD_LINK.findall('\n'.join(cells(json.loads(lab.read_text()), 'markdown')))
    assert len(links) == len(source_links), "a link was lost or added"


def test_student_copy_from_an_installed_package_links_to_the_site(tmp_path):
    "Installed as a wheel lays it out (labs inside the package, no settings.ini anywhere), the copy still links right."
    import shutil, subprocess, sys
    from hjepa.labs import course_urls
    pkg = tmp_path / 'site-packages' / 'hjepa'
    shutil.copytree(ROOT / 'hjepa', pkg, ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(ROOT / 'lessons', pkg / 'labs' / 'lessons', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    (tmp_path / 'learner').mkdir()
    code = ("import hjepa, sys; from hjepa.labs import write_student_lab; assert 'site-packages' in hjepa.__file__; "
            "print(write_student_lab('05', '.'))")
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path / 'learner', capture_output=True, text=True,
                         env={'PYTHONPATH': str(tmp_path / 'site-packages'), 'PATH': '/usr/bin:/bin'})
    assert out.returncode == 0, out.stderr
    md = '\n'.join(cells(json.loads((tmp_path / 'learner' / '05_losses.ipynb').read_text()), 'markdown'))
    assert '../nbs/' not in md and f"]({course_urls()['site']}/losses.html)" in md
