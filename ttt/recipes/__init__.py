"""Importable, typed recipes: train, eval, generate, bench (each also behind `ttt <command>`)."""
