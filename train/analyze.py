"""``python -m train.analyze``: the paper's analyses of a trained workdir
(the tool is ``train.tools.analyze``)."""

if __name__ == "__main__":
    from train import signals

    signals.install("tool")  # before anything slow: a signal at any moment is one line
    signals.phase("imports")
    from train.tools import analyze

    __doc__ = analyze.__doc__  # what --help prints
    analyze.run_cli()
