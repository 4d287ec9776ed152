#!/usr/bin/env python
"""Instrument-family probabilities of audio files from a checkpoint of examples/train_nsynth.py:
``python examples/predict.py --help``.

The application lives in ``rnn_fast.nsynth``; this is its command line (``rnn_fast.nsynth.cli.predict_main``).
"""
from rnn_fast.nsynth.cli import predict_main

if __name__ == "__main__":
    raise SystemExit(predict_main())
