"""Human and machine output: aligned text tables and JSON, from the same rows."""

from host_tools.report.table import Column, format_bytes, render_table

__all__ = ["Column", "format_bytes", "render_table"]
