"""Edit notebooks as plain text: a notebook <-> a percent-format text file that keeps every cell's id.

    python tools/nbtxt.py out nbs/06_schedulers.ipynb [more.ipynb ...]   # -> _nbtxt/nbs/06_schedulers.txt
    python tools/nbtxt.py in  _nbtxt/nbs/06_schedulers.txt [more.txt ...] # -> nbs/06_schedulers.ipynb (clean)

A cell starts with a line `# %% [code] <id>` or `# %% [markdown] <id>`; write `new` (or nothing) as the id of a
cell you add and it gets a fresh one. Outputs are dropped (notebooks are committed clean). `_nbtxt/` is ignored by git.
"""
from __future__ import annotations
import json, re, secrets, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TXT = ROOT / '_nbtxt'
HEAD = re.compile(r'^# %% \[(code|markdown|raw)\](?: (\S+))?\s*$')


def to_text(nb: dict) -> str:
    out = []
    for c in nb['cells']:
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        out.append(f"# %% [{c['cell_type']}] {c.get('id', 'new')}\n{src}\n")
    return '\n'.join(out)


def from_text(text: str, meta: dict | None = None) -> dict:
    cells, cur = [], None
    for line in text.splitlines(keepends=True):
        m = HEAD.match(line)
        if m:
            cid = m.group(2) if m.group(2) not in (None, 'new') else secrets.token_hex(4)
            cur = {'cell_type': m.group(1), 'id': cid, 'lines': []}
            cells.append(cur)
        elif cur is not None: cur['lines'].append(line)
    out = []
    for c in cells:
        src = ''.join(c['lines']).rstrip('\n')
        lines = src.splitlines(keepends=True)
        cell = {'cell_type': c['cell_type'], 'id': c['id'], 'metadata': {}, 'source': lines}
        if c['cell_type'] == 'code': cell.update(execution_count=None, outputs=[])
        out.append(cell)
    ids = [c['id'] for c in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup: raise SystemExit(f"duplicate cell ids {sorted(dup)}: give copied cells the id `new`")
    kernel = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    return {'cells': out, 'metadata': meta or kernel, 'nbformat': 4, 'nbformat_minor': 5}


def txt_path(nb: Path) -> Path: return TXT / nb.resolve().relative_to(ROOT).with_suffix('.txt')
def nb_path(txt: Path) -> Path: return ROOT / txt.resolve().relative_to(TXT).with_suffix('.ipynb')


def main(argv):
    if len(argv) < 2 or argv[0] not in ('out', 'in'): print(__doc__); return 2
    for f in map(Path, argv[1:]):
        if argv[0] == 'out':
            t = txt_path(f); t.parent.mkdir(parents=True, exist_ok=True)
            t.write_text(to_text(json.loads(f.read_text()))); print(t)
        else:
            nb = nb_path(f)
            meta = json.loads(nb.read_text())['metadata'] if nb.exists() else None
            nb.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(from_text(f.read_text(), meta), indent=1, ensure_ascii=False, sort_keys=True)
            nb.write_text(text + '\n'); print(nb)
    return 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
