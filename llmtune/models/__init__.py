"""Models: load a causal LM from a local directory or the hub, and build tiny ones for tests and the demo.

Submodules import torch/transformers; this package itself imports nothing heavy.
"""
