"""``python -m train.compare``: GAttANet against GALA, SE and GSA on the same frozen backbones
(the tool is ``train.tools.compare``)."""

if __name__ == "__main__":
    from train import signals

    signals.install("train")  # before anything slow: a signal at any moment is one line
    signals.phase("imports")
    from train.tools import compare

    __doc__ = compare.__doc__  # what --help prints
    compare.run_cli()
