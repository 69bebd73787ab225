"""Tests of ttt.ops.ttt_mlp (a package so that test_triton.py here and in ../ttt_linear do not clash)."""
