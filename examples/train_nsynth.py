#!/usr/bin/env python
"""Train an NSynth instrument-family classifier with rnn_fast: ``python examples/train_nsynth.py --help``.

The application lives in ``rnn_fast.nsynth``; this is its command line (``rnn_fast.nsynth.cli.train_main``).
"""
from rnn_fast.nsynth.cli import train_main

if __name__ == "__main__":
    train_main()
