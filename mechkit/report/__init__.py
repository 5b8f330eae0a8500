"""Every analysis in one command: ``mechkit report`` / :func:`mechkit.report.report`, an HTML page,
a cache that reuses finished analyses and resumes interrupted runs."""

from mechkit.report.analyses import ANALYSES, resolve_settings
from mechkit.report.run import ALL, report, versions

__all__ = ["ALL", "ANALYSES", "report", "resolve_settings", "versions"]
