"""Symbol links on the rendered site (`_docs/`, built by `python tools/build_site.py`) point at the library.

nbdev links every backticked name in a page's prose (and the `source` link of every `show_doc`) through its symbol
index, `hjepa/_modidx.py`, which indexes every module of the package: the lab checkers too. A checker that defined a
wrong answer under a library name (`param_groups`, `patch_grid`, ...) made the chapter pages link that name to the
checker's page and source. These tests read every chapter page (not the labs under `lessons/`, not the checker pages
under `checks/`) and check that each symbol link of a library name goes to the chapter that defines the name, and that
no link goes to a checker's page or source.

The site tests are skipped unless HJEPA_SITE_TEST=1 (tools/suite.py sets it and runs this file right after building
the site); with the variable set, a missing site is a failure. The first test needs no site: it proves, on planted
pages, that the check can fail.
"""
import os, posixpath, re
from configparser import ConfigParser
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / '_docs'
_cfg = ConfigParser(delimiters=['=']); _cfg.read(ROOT / 'settings.ini'); CFG = _cfg['DEFAULT']
DOC_BASE = CFG['doc_host'].rstrip('/') + '/' + CFG['doc_baseurl'].strip('/') + '/'   # where nbdev points doc links
SRC_BASE = f"{CFG['git_url'].rstrip('/')}/blob/{CFG['branch']}/"                     # where it points source links
site = pytest.mark.skipif(os.environ.get('HJEPA_SITE_TEST') != '1',
                          reason='set HJEPA_SITE_TEST=1 after building the site')


class _Links(HTMLParser):
    "Every `<a href>` of a page's main content as `(href, text, is_code)`; `is_code`: the link wraps one `<code>`."
    def __init__(self):
        super().__init__(); self.links, self._a, self._depth = [], None, 0
    def handle_starttag(self, tag, attrs):
        if tag == 'a' and self._a is None:
            self._a = {'href': dict(attrs).get('href') or '', 'text': '', 'code': 0, 'other': 0}
        elif self._a is not None: self._a['code' if tag == 'code' else 'other'] += 1
    def handle_data(self, data):
        if self._a is not None: self._a['text'] += data
    def handle_endtag(self, tag):
        if tag == 'a' and self._a is not None:
            a, self._a = self._a, None
            self.links.append((a['href'], a['text'].strip(), a['code'] == 1 and not a['other']))


def page_links(html: str) -> list[tuple[str, str, bool]]:
    p = _Links(); p.feed(html); return p.links


def library_index() -> dict[str, set[str]]:
    """Every name nbdev's lookup resolves (short, `Class.method` and fully qualified) -> the library pages defining it
    (`trainer.html#param_groups`), from the library's own modules only (not `hjepa.labs`)."""
    from hjepa._modidx import d
    out = {}
    for mod, syms in d['syms'].items():
        if mod.startswith('hjepa.labs'): continue
        for full, (doc, _py) in syms.items():
            for key in (full, full.removeprefix(mod + '.')): out.setdefault(key, set()).add(doc)
    return out


def site_target(href: str, page: str) -> str | None:
    "The site page (and anchor) a link points at, e.g. `trainer.html#param_groups`, or None for an outside link."
    if href.startswith(DOC_BASE): return href[len(DOC_BASE):]
    if re.match(r'^[a-z]+:', href) or href.startswith('#') or not href: return None
    return posixpath.normpath(posixpath.join(posixpath.dirname(page), href))


def bad_links(pages: dict[str, str], index: dict[str, set[str]]) -> list[str]:
    """What is wrong with the symbol and source links of chapter `pages` ({site path: html}): a library name linked
    anywhere but its chapter, any symbol linked to a checker or lab page, any link to a checker's source."""
    bad = []
    for page, html in pages.items():
        for href, text, is_code in page_links(html):
            if href.startswith(SRC_BASE) and (href[len(SRC_BASE):].startswith(('hjepa/labs/', 'hjepa/checks_'))):
                bad.append(f"{page}: a source link goes to the checker code {href}")
                continue
            if not is_code: continue
            target = site_target(href, page)
            if target is None: continue
            name = text.removesuffix('()')
            if target.startswith(('checks/', 'lessons/')):
                bad.append(f"{page}: `{name}` links to {target}, not to the library's page for it")
            elif name in index and target not in index[name]:
                where = ' or '.join(sorted(index[name]))
                bad.append(f"{page}: `{name}` links to {target}; the library defines it at {where}")
    return bad


def chapter_pages() -> dict[str, str]:
    "The rendered chapter pages (the site's root, without the labs and checker folders)."
    assert (DOCS / 'index.html').exists(), "no _docs/index.html: run `python tools/build_site.py` first"
    return {p.name: p.read_text(encoding='utf-8') for p in sorted(DOCS.glob('*.html'))}


def test_the_check_catches_links_to_checkers():
    "Planted pages as the old layout rendered them: a library name linked to a checker page and to checker source."
    index = {'param_groups': {'trainer.html#param_groups'}, 'patch_grid': {'data.html#patch_grid'}}
    good = (f'<p><a href="{DOC_BASE}trainer.html#param_groups"><code>param_groups</code></a> and '
            f'<a href="data.html#patch_grid"><code>patch_grid()</code></a>; '
            f'<a href="checks/exercises.html">how labs are checked</a></p>'
            f'<a href="{SRC_BASE}hjepa/trainer.py#L10">source</a>')
    assert bad_links({'trainer.html': good}, index) == []
    old = (f'<a href="{DOC_BASE}checks/trainer.html#param_groups"><code>param_groups</code></a>'
           f'<a href="{SRC_BASE}hjepa/checks_trainer.py#L149">source</a>'
           f'<a href="{SRC_BASE}hjepa/labs/checks/trainer.py#L149">source</a>'
           f'<a href="model.html#patch_grid"><code>patch_grid</code></a>')
    bad = bad_links({'trainer.html': old}, index)
    assert len(bad) == 4, bad
    assert 'links to checks/trainer.html' in bad[0] and 'checker code' in bad[1] and 'the library defines it' in bad[3]


@site
def test_chapter_symbol_links_point_to_the_library():
    pages = chapter_pages()
    assert {'data.html', 'trainer.html', 'model.html'} <= set(pages), sorted(pages)
    bad = bad_links(pages, library_index())
    assert not bad, "symbol links on chapter pages that do not go to the library:\n" + '\n'.join(bad)


@site
def test_the_chapters_do_link_library_names():
    "Guard against a vacuous pass: the chapters must carry symbol and source links of the library (and none of labs)."
    index, n_sym, n_src = library_index(), 0, 0
    for page, html in chapter_pages().items():
        for href, text, is_code in page_links(html):
            if is_code and site_target(href, page) in index.get(text.removesuffix('()'), ()): n_sym += 1
            if href.startswith(SRC_BASE + 'hjepa/'): n_src += 1
    assert n_sym >= 20 and n_src >= 50, f"only {n_sym} symbol links and {n_src} source links on the chapter pages"
