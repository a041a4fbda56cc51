"""Conformance tests against the real PyTorch and Keras 3 (see conftest.py)."""
