"""The query path without torch: numpy twins of the maths a default query runs (checked against the torch reference
by tests/test_lean_maths.py). Nothing under retrieval/lean/ imports torch, directly or through another module."""
