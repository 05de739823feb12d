"""Performance benchmarks of emo_assets extraction: `python -m benchmarks --help` (`make bench`)."""
