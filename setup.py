"""Packaging for hjepa: everything is read from settings.ini (nbdev 2 layout).

The labs in `lessons/` ship inside the wheel as `hjepa/labs/lessons/*.ipynb`, so that a
learner who only ran `pip install hjepa` can still get a student copy with
`hjepa lab NN`.
"""
import shutil
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

here = Path(__file__).resolve().parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here / 'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature',
            '7 - Inactive']
lic = licenses[cfg['license']]


class BuildPyWithLabs(build_py):
    "Copy the lab notebooks into the built package (`hjepa/labs/lessons`)."
    def run(self):
        super().run()
        src = here / 'lessons'
        if not src.is_dir(): return  # building from an sdist that already carries hjepa/labs/lessons
        dest = Path(self.build_lib) / cfg['lib_name'] / 'labs' / 'lessons'
        dest.mkdir(parents=True, exist_ok=True)
        for nb in sorted(src.glob('[0-9]*.ipynb')): shutil.copy(nb, dest / nb.name)


setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'],
    license=lic[0],
    url=cfg['git_url'],
    keywords=cfg['keywords'].split(),
    classifiers=[
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'].title(),
        'License :: ' + lic[1],
        'Natural Language :: ' + cfg['language'].title(),
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']),
    package_data={cfg['lib_name']: ['labs/lessons/*.ipynb']},
    include_package_data=True,
    python_requires='>=' + cfg['min_python'],
    install_requires=cfg['requirements'].split(),
    extras_require={'dev': cfg['dev_requirements'].split(), 'bench': cfg['bench_requirements'].split()},
    entry_points={
        'console_scripts': cfg['console_scripts'].split(),
        'nbdev': [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"],
    },
    cmdclass={'build_py': BuildPyWithLabs},
    zip_safe=False,
)
