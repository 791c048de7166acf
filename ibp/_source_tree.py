"""Imports from a bare source checkout (``PYTHONPATH=.``).

pyproject.toml installs three folders under other names: ``integrations/``
as ``ibp.integrations``, ``bench/`` as ``ibp.bench`` and ``cuda/`` as
``ibp.kernels``.  An install maps them; a checkout that was never
installed (a GPU machine without network, a CI job) would not find them.
This finder, consulted after every other one, maps them the same way
when ``ibp`` itself was imported from a checkout.
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

MAPPED = {"ibp.integrations": "integrations", "ibp.bench": "bench", "ibp.kernels": "cuda"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages in the checkout at ``root``."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        folder = MAPPED.get(name)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def install():
    """Add the finder when this copy of ibp lies in a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return
    if not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(SourceTreeFinder(root))
