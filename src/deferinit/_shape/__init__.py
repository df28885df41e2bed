"""The shape-only pass: ``di.build``."""
