"""Federated DP training from the command line: ``python train.py [group=option] [key=value ...]``.

The same app as ``python -m fl_dp_lightning`` (and ``fl-dp-train``) once the package is installed."""

from fl_dp_lightning.__main__ import main

if __name__ == "__main__":
    main()
