"""Turning runs into comparisons: curves, tables and figures (``lrc-collect``)."""
