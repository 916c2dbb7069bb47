"""The base layer: small helpers every other layer may use (ids, Deferred helpers, health, failures in words, units).

Imports nothing else of camgateway.
"""
