"""Training of the NSynth classifiers: the loop and evaluation (``engine``), the loss (``objective``), metrics,
checkpoints (``checkpoint``, with the run's parts and progress in ``state``), RNG state (``rng``) and the pieces
that make one code path serve single-process and ``torchrun`` jobs (``distributed``)."""
