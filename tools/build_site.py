"""Build the course site and the README from the notebooks.

    python tools/build_site.py            # assemble, process with nbdev, check and render with smalldocs -> _docs/
    python tools/build_site.py --quarto   # same tree, rendered by Quarto (where Quarto is installed)
    python tools/build_site.py --readme   # regenerate README.md from nbs/index.ipynb

The site tree is assembled in `_build/site/`: chapters from `nbs/` at its root, labs under `lessons/`,
the lab checkers under `checks/`, and the root `_quarto.yml` beside them. Each page is named after its
notebook without the number (`nbs/00_data.ipynb` -> `data.html`, as nbdev names module pages), and
links between notebooks (written repository-relative, so they work in JupyterLab and on GitHub) are
rewritten to the site's names. Notebooks are taken already executed from `_exec/` (written by the
notebook tests) when that copy matches the source, and executed here otherwise.

Maths is typeset by KaTeX, shipped with the site: the renderers link KaTeX from a CDN, so `offline_katex` copies
the vendored copy (`tools/vendor/katex/`) into `_docs/site_libs/katex/` and points every page at it, and the site
shows its maths from a plain folder with no network.
"""
from __future__ import annotations
import argparse, hashlib, json, os, re, shutil, subprocess, sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from hjepa.labs import site_path as _lib_site_path  # noqa: E402  (the library names pages too: student lab links)

BUILD, EXEC, PROC, DOCS = ROOT / '_build' / 'site', ROOT / '_exec', ROOT / '_proc', ROOT / '_docs'
_cfg = ConfigParser(delimiters=['=']); _cfg.read(ROOT / 'settings.ini'); CFG = _cfg['DEFAULT']
_LINK = re.compile(r'(\]\()([^)\s]+)(\))')


def notebooks() -> list[Path]:
    "Every notebook of the course (chapters, checkers, labs), repository-relative, in course order."
    nbs = sorted(p.relative_to(ROOT) for p in (ROOT / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    return nbs + sorted(p.relative_to(ROOT) for p in (ROOT / 'lessons').glob('[0-9]*.ipynb'))


def site_path(rel: Path) -> Path:
    "Where a repository notebook lands in the site tree: numbers dropped, nbs/ flattened (`hjepa.labs.site_path`)."
    return Path(_lib_site_path(rel))


def source_hash(rel: Path) -> str:
    "Hash of a notebook's code and markdown sources (what execution depends on)."
    nb = json.loads((ROOT / rel).read_text(encoding='utf-8'))
    return hashlib.sha256(json.dumps([c['source'] for c in nb['cells']]).encode()).hexdigest()


def rewrite_links(text: str, src: Path, dst: Path | None, mapping: dict) -> str:
    """Rewrite repository-relative links in markdown `text` of notebook `src` for its new home `dst`
    (a site path, or None for the README at the repository root)."""
    def sub(m):
        target = m.group(2)
        if re.match(r'^([a-z]+:|#|/)', target): return m.group(0)
        path, _, anchor = target.partition('#')
        repo = Path(os.path.normpath((ROOT / src).parent / path)).relative_to(ROOT) if path else None
        if repo is None: return m.group(0)
        if dst is None: new = repo.as_posix()
        elif repo in mapping: new = Path(os.path.relpath(mapping[repo], dst.parent)).as_posix()
        elif (ROOT / repo).exists(): new = f"{CFG['git_url']}/blob/{CFG['branch']}/{repo.as_posix()}"
        else: return m.group(0)   # broken: left for `smalldocs check` to report
        return f"{m.group(1)}{new}{'#' + anchor if anchor else ''}{m.group(3)}"
    return _LINK.sub(sub, text)


def execute(rel: Path) -> dict:
    "Execute a notebook as nbdev_test does (same skip flags, cwd = its folder) and return it with outputs."
    from execnb.shell import CaptureShell
    nb = json.loads((ROOT / rel).read_text(encoding='utf-8'))
    flags = set(CFG.get('tst_flags', '').split())
    sh, old = CaptureShell(), os.getcwd()
    os.environ['IN_TEST'] = '1'
    try:
        os.chdir((ROOT / rel).parent)
        for c in nb['cells']:
            if c['cell_type'] != 'code': continue
            src = ''.join(c['source'])
            dirs = {l[3:].split(':')[0].strip() for l in src.splitlines() if l.startswith('#| ')}
            if flags & dirs or re.search(r'^#\|\s*eval:\s*false', src, re.M): continue
            c['outputs'] = sh.run(src)
            if sh.exc: raise RuntimeError(f"{rel}: a cell failed while building the site:\n{src}\n{sh.exc}")
    finally: os.chdir(old)
    return nb


def executed(rel: Path) -> dict:
    "The executed notebook: the test run's copy in `_exec/` if it matches the source, else run it now."
    cached = EXEC / rel
    if cached.exists():
        nb = json.loads(cached.read_text(encoding='utf-8'))
        if nb.get('metadata', {}).get('hjepa_source_hash') == source_hash(rel): return nb
    print(f"  executing {rel} (no up-to-date copy in _exec/)")
    return execute(rel)


def assemble() -> dict:
    "Assemble the site tree in `_build/site/`; returns the repository -> site path mapping."
    mapping = {rel: site_path(rel) for rel in notebooks()}
    if BUILD.exists(): shutil.rmtree(BUILD)
    BUILD.mkdir(parents=True)
    shutil.copy(ROOT / '_quarto.yml', BUILD / '_quarto.yml')
    for rel, dst in mapping.items():
        nb = executed(rel)
        for c in nb['cells']:
            if c['cell_type'] == 'markdown':
                c['source'] = rewrite_links(''.join(c['source']), rel, dst, mapping)
        (BUILD / dst).parent.mkdir(parents=True, exist_ok=True)
        (BUILD / dst).write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
    return mapping


def process():
    "Run nbdev's notebook processing (show_doc, directives, fold solutions) on the tree -> `_proc/`."
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    if PROC.exists(): shutil.rmtree(PROC)
    proc_nbs(str(BUILD), force=True)
    # pages are already named as nbdev names them; smalldocs ignores output-file
    for p in PROC.rglob('*.ipynb'):
        nb = json.loads(p.read_text(encoding='utf-8'))
        for c in nb['cells']:
            if c['cell_type'] == 'raw':
                lines = ''.join(c['source']).splitlines(True)
                c['source'] = ''.join(ln for ln in lines if not ln.startswith('output-file:'))
        p.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
    n = len(list(PROC.rglob('*.ipynb')))
    total = len(list(BUILD.rglob('*.ipynb')))
    if n != total: raise RuntimeError(f"nbdev processed {n} notebooks of {total}")


def render(quarto: bool = False):
    "Check and render `_proc/` into `_docs/` (smalldocs offline, or Quarto)."
    if DOCS.exists(): shutil.rmtree(DOCS)
    if quarto:
        quarto_katex(PROC / '_quarto.yml')
        subprocess.run(['quarto', 'render', str(PROC)], check=True)
    else:
        sd = [sys.executable, '-m', 'smalldocs.cli'] if not shutil.which('smalldocs') else ['smalldocs']
        chk = subprocess.run(sd + ['check', str(PROC)], capture_output=True, text=True)
        print(chk.stdout + chk.stderr)
        if chk.returncode: raise SystemExit("smalldocs check found problems (above): fix the links or options")
        subprocess.run(sd + ['render', '--quiet', str(PROC)], check=True)
    shutil.move(str(PROC / '_docs'), str(DOCS))
    n = offline_katex(DOCS)
    print(f"site: {DOCS / 'index.html'} (KaTeX from site_libs/katex on {n} pages with maths)")


def quarto_katex(cfg: Path):
    """Have Quarto typeset maths with KaTeX, as smalldocs does (Quarto's default, MathJax, would come from a CDN):
    `html-math-method: katex` in the processed tree's config. Not in the root `_quarto.yml`, where smalldocs
    ignores the key and `smalldocs check` reports it."""
    import yaml
    conf = yaml.safe_load(cfg.read_text(encoding='utf-8'))
    html = conf.setdefault('format', {}).setdefault('html', {})
    if html.get('html-math-method') in (None, 'katex'):
        html['html-math-method'] = 'katex'
        cfg.write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding='utf-8')


KATEX = ROOT / 'tools' / 'vendor' / 'katex'
KATEX_CDN = re.compile(r'https?://cdn\.jsdelivr\.net/npm/katex@[^/"\']+/dist/')
# smalldocs writes `$...$` as `\(...\)` and `$$...$$` as `\[...\]` (as Pandoc does) and smalldocs.js typesets those;
# this script, run once the deferred scripts have, also typesets display maths still written `$$...$$` (in raw HTML).
KATEX_DOLLARS = ('<script>document.addEventListener("DOMContentLoaded", () => window.renderMathInElement && '
                 'renderMathInElement(document.body, {delimiters: [{left: "$$", right: "$$", display: true}], '
                 'throwOnError: false}));</script>')


def offline_katex(docs: Path) -> int:
    """Ship KaTeX with the rendered site in `docs`: copy the vendored KaTeX into `site_libs/katex/` and point each
    page's KaTeX links at it, relative to the page (so it works from `file://` and from any server path).
    Returns how many pages load KaTeX."""
    libs = docs / 'site_libs' / 'katex'
    if libs.exists(): shutil.rmtree(libs)
    shutil.copytree(KATEX, libs, ignore=shutil.ignore_patterns('README.md'))
    n = 0
    for page in docs.rglob('*.html'):
        if libs in page.parents: continue
        html = page.read_text(encoding='utf-8')
        new = postprocess_katex(html, page.relative_to(docs))
        if new != html: page.write_text(new, encoding='utf-8'); n += 1
    return n


def postprocess_katex(html: str, rel: Path) -> str:
    "Page `rel` (relative to the site root) with its CDN KaTeX links pointed at the site's own copy."
    if not KATEX_CDN.search(html): return html
    up = '../' * (len(Path(rel).parts) - 1)
    html = KATEX_CDN.sub(f'{up}site_libs/katex/', html)
    if 'smalldocs.js' in html and KATEX_DOLLARS not in html:
        html = html.replace('</body>', KATEX_DOLLARS + '\n</body>', 1)
    return html


def readme() -> str:
    "README.md, generated from nbs/index.ipynb (its markdown, links made relative to the repository root)."
    rel = Path('nbs/index.ipynb')
    nb = json.loads((ROOT / rel).read_text(encoding='utf-8'))
    out = ["<!-- Generated from nbs/index.ipynb by `python tools/build_site.py --readme`: "
           "edit the notebook, not this file. -->\n"]
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if c['cell_type'] == 'markdown': out.append(rewrite_links(src, rel, None, {}))
        elif src and not src.startswith('#| hide'): out.append(f"```python\n{src}\n```")
    return '\n\n'.join(out) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quarto', action='store_true', help='render with Quarto instead of smalldocs')
    ap.add_argument('--readme', action='store_true', help='only regenerate README.md from nbs/index.ipynb')
    a = ap.parse_args(argv)
    if a.readme:
        (ROOT / 'README.md').write_text(readme(), encoding='utf-8'); print('wrote README.md'); return
    assemble(); process(); render(a.quarto)


if __name__ == '__main__': main()
