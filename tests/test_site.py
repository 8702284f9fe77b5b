"""Browser test of the rendered site (`_docs/`, built by `python tools/build_site.py`).

Headless Debian Chromium driven by Playwright: open the home page, follow the sidebar to a chapter and
to a lab, check their content, and check that lab solutions are folded (collapsed) until clicked; open every page
with maths, from the local server and from `file://`, and check that KaTeX (shipped with the site, never from a
CDN) typeset it.
The site tests are skipped unless HJEPA_SITE_TEST=1 (tools/suite.py sets it after building the site), because the
site must be built first; with the variable set, a missing site or browser is a failure, not a skip. The first test
needs no site: it renders a two-page site with smalldocs and checks build_site's KaTeX post-processing on it.
"""
import functools, http.server, os, re, shutil, socketserver, subprocess, sys, threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / '_docs'
SCREENS = ROOT / '_build' / 'screens'
sys.path.insert(0, str(ROOT / 'tools'))
from build_site import offline_katex, quarto_katex  # noqa: E402

site_built = pytest.mark.skipif(os.environ.get('HJEPA_SITE_TEST') != '1',
                                reason='set HJEPA_SITE_TEST=1 after building the site')
KATEX_FILES = ['katex.min.css', 'katex.min.js', 'contrib/auto-render.min.js']
_REF = re.compile(r'(?:src|href)="([^"]*katex[^"]*)"')


def katex_refs(html: str) -> list[str]:
    "The KaTeX files a page loads, as written in its `src`/`href` attributes."
    return _REF.findall(html)


def test_katex_postprocessing_on_a_small_site(tmp_path):
    "smalldocs links KaTeX from a CDN; after `offline_katex` two pages (root and nested) load the shipped copy."
    (tmp_path / 'sub').mkdir()
    (tmp_path / '_quarto.yml').write_text('project:\n  type: website\n  output-dir: _docs\nwebsite:\n  title: t\n')
    (tmp_path / 'index.qmd').write_text('---\ntitle: Home\n---\n\nInline $Z \\in \\mathbb{R}^{N}$ and\n\n'
                                        '$$\n\\sum_i x_i^2\n$$\n\nNo maths on [the other page](plain.qmd).\n')
    (tmp_path / 'plain.qmd').write_text('---\ntitle: Plain\n---\n\nNo maths here.\n')
    (tmp_path / 'sub' / 'page.qmd').write_text('---\ntitle: Sub\n---\n\nNested $a^2+b^2$.\n')
    subprocess.run([sys.executable, '-m', 'smalldocs.cli', 'render', '--quiet', str(tmp_path)], check=True)
    docs = tmp_path / '_docs'
    pages = {p: (docs / p).read_text() for p in ('index.html', 'sub/page.html', 'plain.html')}
    assert all('cdn.jsdelivr.net/npm/katex@' in pages[p] for p in ('index.html', 'sub/page.html')), \
        "smalldocs no longer links KaTeX from the CDN: check what build_site's KATEX_CDN must match"
    assert offline_katex(docs) == 2
    for p in ('index.html', 'sub/page.html'):
        html = (docs / p).read_text()
        assert 'cdn.' not in html and 'katex@' not in html, f"{p} still loads KaTeX from the network"
        refs = katex_refs(html)
        up = '../' * p.count('/')
        assert sorted(refs) == sorted(f'{up}site_libs/katex/{f}' for f in KATEX_FILES), refs
        for r in refs: assert ((docs / p).parent / r).resolve().is_file(), f"{p}: {r} is missing"
        assert 'renderMathInElement' in html and '"$$"' in html, "the `$$` pass for raw-HTML maths is missing"
    assert (docs / 'plain.html').read_text() == pages['plain.html'], "a page without maths was changed"
    css = (docs / 'site_libs' / 'katex' / 'katex.min.css').read_text()
    fonts = re.findall(r'url\((fonts/[^)]+\.woff2)\)', css)
    assert len(fonts) >= 20 and all((docs / 'site_libs' / 'katex' / f).is_file() for f in fonts), fonts
    assert (docs / 'site_libs' / 'katex' / 'LICENSE').is_file(), "KaTeX's MIT licence must ship with it"
CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync']


def chromium() -> str:
    exe = shutil.which('chromium') or shutil.which('chromium-browser') or '/usr/bin/chromium'
    assert Path(exe).exists(), "Chromium not found: install Debian's `chromium` (apt-get install chromium)"
    return exe


@pytest.fixture(scope='module')
def site():
    assert (DOCS / 'index.html').exists(), "no _docs/index.html: run `python tools/build_site.py` first"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    handler = functools.partial(Quiet, directory=str(DOCS))
    srv = socketserver.ThreadingTCPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown()


@pytest.fixture(scope='module')
def page(site):
    from playwright.sync_api import sync_playwright
    SCREENS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROME_ARGS, headless=True)
        pg = browser.new_page(viewport={'width': 1300, 'height': 900})
        errors = []
        pg.on('pageerror', lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()


def lab_solutions(lab: Path) -> list[str]:
    "The first function each `#| solution` cell of a lab defines, in order (what the site folds)."
    import ast, json
    out = []
    for c in json.loads(lab.read_text(encoding='utf-8'))['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and re.search(r'^#\|\s*solution\s*$', src, re.M):
            out.append(next(n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)))
    return out


def sidebar_link(page, text):
    link = page.locator('#quarto-sidebar a', has_text=text).first
    assert link.count() == 1, f"no sidebar link with text {text!r}"
    return link


@site_built
def test_home_chapter_and_lab(site, page):
    page.goto(site + '/index.html')
    assert 'hjepa' in page.title()
    body = page.inner_text('main')
    assert 'Quick start' in body and 'tools/suite.py' in body and 'hjepa train' in body
    page.screenshot(path=str(SCREENS / 'home.png'))

    # follow the sidebar to the first chapter
    sidebar_link(page, 'Data that works offline').click()
    page.wait_for_load_state()
    assert page.url.endswith('/data.html'), page.url
    main = page.inner_text('main')
    for want in ('Learning objectives', 'load_dataset', 'stratified_split', 'Key insights'):
        assert want in main, f"chapter page lacks {want!r}"
    assert page.locator('main img').count() >= 2, \
        "the chapter's plots are missing (was it rendered from executed notebooks?)"
    page.screenshot(path=str(SCREENS / 'chapter.png'))

    # and on to its lab: solutions are folded until the reader opens them
    sidebar_link(page, 'Lab 00').click()
    page.wait_for_load_state()
    assert page.url.endswith('/lessons/data.html'), page.url
    assert 'Exercise 1' in page.inner_text('main')
    folds = page.locator('main details')
    solutions = lab_solutions(ROOT / 'lessons' / '00_data.ipynb')
    assert folds.count() == len(solutions) >= 3, \
        f"expected the {len(solutions)} solutions folded in <details>, found {folds.count()}"
    for i in range(folds.count()):
        d = folds.nth(i)
        assert 'Solution' in d.locator('summary').inner_text()
        assert d.get_attribute('open') is None, "a solution is shown unfolded"
    code = folds.first.locator('pre').first
    assert not code.is_visible(), "a folded solution's code is visible before clicking"
    folds.first.locator('summary').click()
    assert code.is_visible() and f'def {solutions[0]}(' in code.inner_text()
    assert '✓' in page.inner_text('main'), "the check outputs are missing"
    page.screenshot(path=str(SCREENS / 'lab.png'))
    assert not page.errors, f"JavaScript errors: {page.errors}"


@site_built
def test_search_index_lists_pages(site):
    import json
    idx = json.loads((DOCS / 'search.json').read_text())
    hrefs = {e.get('href', '').split('#')[0] for e in idx}
    for p in ('index.html', 'data.html', 'lessons/data.html'):
        assert p in hrefs, f"search index lacks {p}"



def test_quarto_renders_maths_with_katex(tmp_path):
    "For Quarto (`--quarto`), the processed config asks for KaTeX, whose CDN links `offline_katex` then replaces."
    import yaml
    cfg = tmp_path / '_quarto.yml'
    shutil.copy(ROOT / '_quarto.yml', cfg)
    before = yaml.safe_load(cfg.read_text())
    assert 'html-math-method' not in before['format']['html'], "smalldocs check reports the key: keep it out of here"
    quarto_katex(cfg)
    after = yaml.safe_load(cfg.read_text())
    assert after['format']['html'].pop('html-math-method') == 'katex'
    assert after == before, "quarto_katex changed more than the maths method"


def math_pages() -> list[str]:
    "Every page of the built site with maths on it (smalldocs wraps maths in `<span class=\"math ...\">`)."
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob('*.html')
                  if 'site_libs' not in p.parts and 'class="math' in p.read_text(encoding='utf-8'))


@site_built
def test_no_page_loads_katex_from_a_cdn():
    "Every page's KaTeX is the site's own copy, linked relative to the page; pages with maths load it."
    pages = [p for p in DOCS.rglob('*.html') if 'site_libs' not in p.parts]
    assert len(pages) > 30, "the site looks incomplete"
    cdn = [p.relative_to(DOCS).as_posix() for p in pages
           if re.search(r'https?://[^"\']*katex', p.read_text(encoding='utf-8'))]
    assert not cdn, f"pages loading KaTeX from the network: {cdn}"
    maths = math_pages()
    assert {'losses.html', 'model.html', 'lessons/losses.html'} <= set(maths), maths
    for rel in maths:
        refs = katex_refs((DOCS / rel).read_text(encoding='utf-8'))
        assert sorted(Path(r).name for r in refs) == sorted(Path(f).name for f in KATEX_FILES), (rel, refs)
        for r in refs: assert ((DOCS / rel).parent / r).resolve().is_file(), f"{rel}: {r} is missing"


_VISIBLE_PROSE = """() => {
  const main = document.querySelector('main').cloneNode(true);
  main.querySelectorAll('pre, code, .katex, script, style').forEach((e) => e.remove());
  return main.innerText;
}"""


_KATEX_FONTS = """async () => {
  await document.fonts.ready;
  return [...document.fonts].filter((f) => f.family.replace(/["']/g, '').startsWith('KaTeX_') && f.status === 'loaded')
    .length;
}"""


def typeset_report(page) -> dict:
    "What KaTeX did on the page: formulas, typeset ones, parse errors, the prose left around them, its fonts loaded."
    return {'katex': page.locator('main .katex').count(), 'errors': page.locator('main .katex-error').count(),
            'math': page.locator('main .math').count(), 'text': page.evaluate(_VISIBLE_PROSE),
            'fonts': page.evaluate(_KATEX_FONTS)}


@site_built
def test_maths_is_typeset_offline(site, page):
    """Every page with maths, served with no network: KaTeX typesets each formula (no raw `\\(`, `\\[` or `$$`
    left in the prose, no KaTeX parse error) and its fonts load; no request leaves the site."""
    outside = []
    def note(req):
        if not req.url.startswith((site, 'data:', 'about:')): outside.append(req.url)
    page.on('request', note)
    try:
        for rel in math_pages():
            page.goto(f'{site}/{rel}')
            page.wait_for_load_state('load')
            r = typeset_report(page)
            raw = [t for t in ('\\(', '\\)', '\\[', '\\]', '$$') if t in r['text']]
            assert not raw, f"{rel}: raw TeX delimiters {raw} left in the text, e.g. " \
                            f"{r['text'][max(0, r['text'].find(raw[0]) - 80):][:160]!r}"
            assert r['katex'] >= r['math'] > 0, f"{rel}: {r['math']} formulas but {r['katex']} typeset by KaTeX"
            assert not r['errors'], f"{rel}: {r['errors']} formulas KaTeX could not parse (shown in red)"
            assert r['fonts'] > 0, f"{rel}: none of KaTeX's fonts loaded"
            if rel == 'losses.html':
                page.locator('main .katex-display').first.scroll_into_view_if_needed()
                page.screenshot(path=str(SCREENS / 'maths.png'))
    finally: page.remove_listener('request', note)
    # the cosmo theme's CSS @imports its web font from Google Fonts; offline the browser falls back to a system font
    outside = [u for u in outside if not u.startswith('https://fonts.googleapis.com/')]
    assert not outside, f"requests that left the site (it must work with no network): {sorted(set(outside))[:10]}"
    assert not page.errors, f"JavaScript errors: {page.errors}"


@site_built
def test_maths_is_typeset_from_a_plain_folder(page):
    "Opened from the folder (file://), a chapter and a nested lab page still typeset their maths."
    for rel in ('losses.html', 'lessons/losses.html'):
        page.goto((DOCS / rel).resolve().as_uri())
        page.wait_for_load_state('load')
        r = typeset_report(page)
        assert '\\(' not in r['text'] and '$$' not in r['text'], rel
        assert r['katex'] >= r['math'] > 0 and not r['errors'], (rel, {k: v for k, v in r.items() if k != 'text'})
        assert r['fonts'] > 0, f"{rel}: none of KaTeX's fonts loaded from file://"
