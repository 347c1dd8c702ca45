"""Checkpoints: writing and reading what engines load, and asking the engines themselves."""
