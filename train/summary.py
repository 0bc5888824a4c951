"""``python -m train.summary``: parameter counts and sites of a config, as JSON
(the tool is ``train.tools.summary``)."""

if __name__ == "__main__":
    from train import signals

    signals.install("tool")  # before anything slow: a signal at any moment is one line
    signals.phase("imports")
    from train.tools import summary

    __doc__ = summary.__doc__  # what --help prints
    summary.run_cli()
