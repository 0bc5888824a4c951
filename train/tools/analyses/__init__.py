"""The analyses of ``python -m train.analyze``, one module each (``train.tools.analyze`` is the
command line)."""
