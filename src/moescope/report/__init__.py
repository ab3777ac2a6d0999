"""One self-contained HTML report of a routing study: verdicts first, then the evidence as interactive figures.

>>> from moescope.report import build_report
>>> Path("report.html").write_text(build_report(trace, gguf="model.gguf").html)
"""

from moescope.report.build import Report, build_report

__all__ = ["Report", "build_report"]
