"""Kernels and their launch settings: what runs the model math fast on a device."""
