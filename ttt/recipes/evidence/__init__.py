"""Experiments that check the seed papers' claims at small scale (see docs/results.md)."""
