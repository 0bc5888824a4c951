"""Tools that read workdirs, apart from the training library: ``summary`` (parameter counts and
sites of a config), ``compare`` (GAttANet against GALA, SE and GSA on the same frozen backbones),
``trained`` (a trained workdir, loaded), ``analyze`` and ``plots`` (the paper's analyses). Run
them as ``python -m train.summary``, ``python -m train.compare`` and ``python -m train.analyze``."""
