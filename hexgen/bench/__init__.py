"""Benchmarks: the engine against Hugging Face generate and the memory roofline (`hexgen bench`)."""
