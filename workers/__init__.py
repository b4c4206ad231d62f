"""The running system: Ray Serve scoring, stream consumers, publishing and reading results.

Uses `trainer` for the model and `schemas` for the contract; never imports `cluster`.
"""
