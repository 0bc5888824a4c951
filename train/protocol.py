"""``python -m train.protocol``: the multi-seed protocol in one command, each stage one sweep
(the tool is ``train.tools.protocol``)."""

if __name__ == "__main__":
    from train import signals

    signals.install("train")  # before anything slow: a signal at any moment is one line
    signals.phase("imports")
    from train.tools import protocol

    __doc__ = protocol.__doc__  # what --help prints
    protocol.run_cli()
