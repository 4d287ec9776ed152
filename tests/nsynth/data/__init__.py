"""Tests of the classifier's data: NSynth's jsonwav layout, the cache, the synthetic set and the loader."""
