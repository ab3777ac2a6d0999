"""moescope: measure how a Mixture-of-Experts model routes tokens, and decide deployment with numbers."""
__version__ = "0.1.0"
