"What the monitor chapter cannot show in a notebook: W&B offline runs, a killed writer's JSONL file, a console on a TTY."
import io, json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from hjepa.monitor import (ConsoleLogger, JSONLLogger, MultiLogger, WandbLogger, collapse_metrics, make_logger,
                           plot_metrics, read_jsonl)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb'))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    (tmp_path / 'wandb').mkdir()
    return tmp_path / 'wandb'


def test_wandb_offline_needs_no_key_and_writes_a_run(wandb_offline, tmp_path):
    log = make_logger(tmp_path / 'run', console=False, tensorboard=False, wandb=True,
                      wandb_kwargs={'dir': wandb_offline, 'config': {'lr': 1e-3}})
    for s in range(1, 6): log.log({'loss': torch.tensor(1.0 / s), 'lr': 1e-3, 'tag': 'text is skipped'}, s)
    log.close()
    runs = list(wandb_offline.rglob('offline-run-*'))
    assert runs, f"no offline run under {wandb_offline}: {list(wandb_offline.rglob('*'))[:10]}"
    assert list(runs[0].glob('*.wandb'))
    assert len(read_jsonl(tmp_path / 'run' / 'metrics.jsonl')) == 5


def test_wandb_disabled_mode(monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    with WandbLogger() as w: w.log({'loss': 1.0}, 1)


def test_wandb_bad_mode():
    pytest.importorskip('wandb')
    with pytest.raises(ValueError, match="mode must be 'online', 'offline' or 'disabled'"):
        WandbLogger(mode='offlne')


WRITER = textwrap.dedent('''
    import sys, time
    from hjepa.monitor import JSONLLogger
    log = JSONLLogger(sys.argv[1])
    for s in range(1, 10**9):
        log.log({'loss': 1.0 / s, 'note': 'x' * 200}, s)
        if s == 50: print('ready', flush=True)
''')


def test_jsonl_survives_a_killed_writer(tmp_path):
    "SIGKILL the writing process: every complete line parses, steps are consecutive from 1, nothing else is lost."
    path = tmp_path / 'metrics.jsonl'
    script = tmp_path / 'w.py'; script.write_text(WRITER)
    p = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'ready'
    time.sleep(0.2); p.send_signal(signal.SIGKILL); p.wait()
    recs = read_jsonl(path)
    steps = [r['step'] for r in recs]
    assert len(steps) >= 50 and steps == list(range(1, len(steps) + 1))
    n_lines = path.read_text().count('\n')
    assert n_lines - len(recs) <= 0      # flushed line by line: at most the unterminated tail is missing


def test_jsonl_appends_on_resume(tmp_path):
    path = tmp_path / 'm.jsonl'
    with JSONLLogger(path) as a:
        for s in (1, 2): a.log({'loss': 1.0}, s)
    with JSONLLogger(path) as b:
        for s in (3, 4): b.log({'loss': float('inf')}, s)
    recs = read_jsonl(path)
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and recs[-1]['loss'] is None
    for line in path.read_text().splitlines(): json.loads(line)      # strict JSON: no NaN/Infinity tokens
    assert 'Infinity' not in path.read_text()


class FakeTTY(io.StringIO):
    def isatty(self): return True


def test_console_redraws_in_place_on_a_tty():
    out = FakeTTY()
    c = ConsoleLogger(total=5, batch_size=4, stream=out, min_interval=0)
    for s in range(1, 6): c.log({'loss': 0.5, 'lr': 1e-3}, s)
    c.close()
    text = out.getvalue()
    assert text.count('\r') == 5 and text.endswith('\n') and text.count('\n') == 1
    assert '5/5 100%' in text.split('\r')[-1]


def test_multilogger_rejects_non_loggers():
    with pytest.raises(TypeError, match='MultiLogger takes Logger instances'):
        MultiLogger(print)


def test_plot_png_from_jsonl(tmp_path):
    g = torch.Generator().manual_seed(0)
    with JSONLLogger(tmp_path / 'm.jsonl') as log:
        for s in range(20):
            log.log({'loss': 1 / (s + 1), 'lr': 1e-3, 'momentum': 0.99, **collapse_metrics(torch.randn(64, 8, generator=g))}, s)
    plot_metrics(tmp_path / 'm.jsonl', out=tmp_path / 'plots' / 'curves.png')
    assert (tmp_path / 'plots' / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_console_throttles_redraws_on_a_tty():
    out = FakeTTY()
    c = ConsoleLogger(total=10_000, stream=out, min_interval=60)
    for s in range(1, 10_001): c.log({'loss': 0.5}, s)
    assert out.getvalue().count('\r') == 2          # the first step and the last one
