"""Presentation: ``di.summary``, its rendering, the demo."""
