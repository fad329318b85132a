"""The wheel's package list, derived rather than written by hand.

``pyproject.toml`` maps each import package to its folder (``[tool.setuptools] package-dir``:
``abliserve.server`` is ``server/``, ...). Every folder with an ``__init__.py`` below a mapped
folder becomes a package of the wheel, so a new subpackage can never be importable in an
editable install yet missing from the wheel (``tests/test_packaging.py`` builds one to check).
"""

import sys

from setuptools import find_packages, setup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the build requirements bring tomli on 3.10
    import tomli as tomllib


def mapped_packages() -> list[str]:
    with open("pyproject.toml", "rb") as handle:
        folders = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
    packages = []
    for name, folder in folders.items():
        packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return sorted(set(packages))


setup(packages=mapped_packages())
