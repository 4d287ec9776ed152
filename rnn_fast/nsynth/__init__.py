"""The NSynth instrument-family classifier, rnn_fast's first user: an application built on the library.

It imports ``rnn_fast`` and never the reverse: ``import rnn_fast`` loads none of it.

* ``data``: NSynth's jsonwav layout, the prepared cache, the synthetic stand-in and the batch loader
* ``audio``, ``models``, ``recipes``: the front end, the classifiers and what trains them
* ``training``: the training and evaluation loop, its loss, metrics, checkpoints and distributed pieces
* ``plots``: the figures and report.md of a run; ``predict``: probabilities of audio files from a checkpoint,
  read by ``audio_files`` (any format, rate and channel count, as the 16 kHz mono clip the model reads)
* ``cli``: the entry points of ``examples/train_nsynth.py`` and ``examples/predict.py``
* ``atomic``: how files are written; ``recipe_study``: the development-set study behind ``--recipe robust``
"""
