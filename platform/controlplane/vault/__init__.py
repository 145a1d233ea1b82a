"""Envelope encryption of every stored blob (datasets, adapters, checkpoints). Issue 7."""
