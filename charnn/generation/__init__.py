"""Generating text from a model: the sampler."""
