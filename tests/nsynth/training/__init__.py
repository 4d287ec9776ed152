"""Tests of training: the engine, its objective, metrics, checkpoints and distributed pieces."""
