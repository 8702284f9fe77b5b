"What the monitor chapter cannot show in a notebook: W&B offline runs, a killed writer's JSONL file, a TTY console."
import io, json, signal, subprocess, sys, textwrap, time

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
    "On a terminal: tqdm redraws one line (\\r), the last redraw shows the final step and the postfix, close ends it."
    out = FakeTTY()
    c = ConsoleLogger(total=5, batch_size=4, stream=out, min_interval=0)
    for s in range(1, 6): c.log({'loss': torch.tensor(0.5 / s), 'lr': 1e-3, 'img_per_s': 320.0}, s)
    assert not out.getvalue().endswith('\n')                # still open: no newline yet
    c.close()
    text = out.getvalue()
    assert text.endswith('\n') and text.count('\n') == 1
    frames = text.rstrip('\n').split('\r')[1:]
    assert len(frames) >= 5                                  # min_interval=0: redrawn at every step
    assert '5/5' in frames[-1] and 'loss 0.1000 | lr 1.00e-03 | 320 img/s' in frames[-1]
    assert 'loss 0.5000' in text                             # step 1 was drawn with its own loss


def test_console_is_quiet_when_not_a_tty_and_ends_with_one_line():
    "A log file: nothing per step, one line at close with the last step's numbers (img/s from batch_size)."
    out = io.StringIO()
    c = ConsoleLogger(total=200, batch_size=8, start_step=100, stream=out)
    for s in range(101, 201): c.log({'loss': 1.0 / s, 'lr': 2e-4}, s)
    assert out.getvalue() == ''
    c.close(); c.close()                                     # closing twice writes the line once
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and '200/200' in lines[0]
    assert 'loss 0.0050 | lr 2.00e-04 |' in lines[0] and 'img/s' in lines[0]
    forced = io.StringIO()
    with ConsoleLogger(total=3, stream=forced, disable=False, min_interval=0) as c:
        for s in (1, 2, 3): c.log({'loss': 1.0}, s)
    assert '3/3' in forced.getvalue()                        # disable=False draws even into a file
    silent = io.StringIO()
    with ConsoleLogger(total=3, stream=silent, enabled=False) as c: c.log({'loss': 1.0}, 3)
    assert silent.getvalue() == ''


def test_console_throttles_redraws_on_a_tty():
    out = FakeTTY()
    c = ConsoleLogger(total=10_000, stream=out, min_interval=60)
    for s in range(1, 10_001): c.log({'loss': 0.5}, s)
    assert 2 <= out.getvalue().count('\r') <= 3                 # the empty bar, maybe one timed redraw, the last step
    assert '10000/10000' in out.getvalue().split('\r')[-1]


def test_make_logger_console_goes_to_stderr_quietly(capsys):
    "The trainer's default console logger: stderr, quiet under pytest (not a TTY), one line at the end."
    with make_logger(console=True, jsonl=False, tensorboard=False, total=4) as log:
        for s in range(1, 5): log.log({'loss': 0.25, 'lr': 1e-3}, s)
        assert capsys.readouterr().err == ''
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '4/4' in err and 'loss 0.2500' in err


def test_multilogger_rejects_non_loggers():
    with pytest.raises(TypeError, match='MultiLogger takes Logger instances'):
        MultiLogger(print)


def test_plot_png_from_jsonl(tmp_path):
    g = torch.Generator().manual_seed(0)
    with JSONLLogger(tmp_path / 'm.jsonl') as log:
        for s in range(20):
            log.log({'loss': 1 / (s + 1), 'lr': 1e-3, 'momentum': 0.99,
                     **collapse_metrics(torch.randn(64, 8, generator=g))}, s)
    plot_metrics(tmp_path / 'm.jsonl', out=tmp_path / 'plots' / 'curves.png')
    assert (tmp_path / 'plots' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
