"""The benchmark scripts, importable as ``benchmarks.X`` from the repository root (the tests do, through
pytest's ``pythonpath``); each also runs as ``python benchmarks/X.py``. They measure the installed sharpguard."""
