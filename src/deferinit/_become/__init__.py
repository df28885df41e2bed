"""Becoming: the build at the first forward, the mismatch guard, initializers, reset."""
