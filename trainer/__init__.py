"""The method: data, patches, networks, losses, training, scoring, calibration and metrics.

Torch and numpy; no Redis. Imports only from `schemas`.
"""
