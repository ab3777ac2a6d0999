"""Routing analyses: pure functions from counts or traces to typed results (each with `to_dict()`).

- `concentration`: the "should we build a per-expert cache?" gate (coverage, entropy, Gini per layer).

    >>> from moescope.analyze import concentration
    >>> concentration(trace.counts()).cache_helps
"""

from moescope.analyze.concentration import Concentration, LayerConcentration, concentration

__all__ = ["Concentration", "LayerConcentration", "concentration"]
