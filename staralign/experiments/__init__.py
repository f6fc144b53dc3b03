"""Experiments on synthetic faces: the one-command demo and the ambiguity study."""
