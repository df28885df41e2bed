"""Declaring and inferring: placeholders, rules, the deferred class (``di.defer``)."""
