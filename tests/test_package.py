"""The package as a user gets it: an sdist and a wheel built with `python -m build` (the wheel from the
sdist, so MANIFEST.in is tested too), installed into a fresh virtual environment."""
import os, subprocess, sys, sysconfig, venv, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_in_a_fresh_venv(tmp_path):
    dist = tmp_path / 'dist'
    subprocess.run([sys.executable, '-m', 'build', '--outdir', str(dist), str(ROOT)], check=True,
                   capture_output=True, text=True)
    whl = next(dist.glob('hjepa-*.whl'))
    names = zipfile.ZipFile(whl).namelist()
    assert "hjepa/labs/lessons/00_data.ipynb" in names, "the labs are not shipped in the wheel"
    assert 'hjepa/data.py' in names and 'hjepa/cli.py' in names
    assert 'hjepa/labs/__init__.py' in names and 'hjepa/labs/checks/trainer.py' in names, "the lab checkers are missing"
    stale = [n for n in names if n.startswith(('hjepa/exercises', 'hjepa/checks_', 'hjepa/_labs'))]
    assert not stale, f"modules of the old layout in the wheel: {stale}"
    assert not any(n.startswith(('nbs/', 'tests/', 'lessons/')) for n in names)
    entry = [n for n in names if n.endswith('entry_points.txt')]
    ep = zipfile.ZipFile(whl).read(entry[0]).decode()
    assert 'hjepa = hjepa.cli:main' in ep and 'hjepa = hjepa._modidx:d' in ep, ep

    # a fresh venv; the heavy dependencies (torch...) are borrowed from this environment so the test
    # does not reinstall them, but hjepa itself comes only from the wheel.
    env_dir = tmp_path / 'venv'
    venv.create(env_dir, with_pip=True)
    py = env_dir / 'bin' / 'python'
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', str(whl)], check=True)
    purelib = 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
    site = Path(subprocess.check_output([str(py), '-c', purelib], text=True).strip())
    (site / '_borrowed_deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    env = {**os.environ, 'PYTHONPATH': ''}
    run = dict(env=env, cwd=tmp_path)   # not the repository: its hjepa/ folder would shadow the wheel
    where = subprocess.check_output([str(py), '-c', 'import hjepa, hjepa.data, hjepa.cli; print(hjepa.__file__)'],
                                    text=True, **run)
    assert str(env_dir) in where, f"hjepa was imported from {where}, not from the wheel"
    helptext = subprocess.check_output([str(env_dir / 'bin' / 'hjepa'), '--help'], text=True, **run)
    assert 'lab' in helptext and 'train' in helptext
    work = tmp_path / 'learner'
    lab00 = [str(env_dir / 'bin' / 'hjepa'), 'lab', '00', '--dest', str(work)]
    out = subprocess.run(lab00, capture_output=True, text=True, **run)
    assert out.returncode == 0, out.stderr
    assert (work / '00_data.ipynb').exists()
    found = subprocess.check_output([str(py), '-c', "from hjepa.labs import find_exercise; "
                                     "print(find_exercise('param_groups').tests[0][1].__module__)"], text=True, **run)
    assert found.strip() == 'hjepa.labs.checks.trainer', f"check() cannot find the installed checkers: {found}"
    again = subprocess.run(lab00, capture_output=True, text=True, **run)
    assert again.returncode == 2 and 'left untouched' in again.stderr
