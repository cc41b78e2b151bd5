"""Human and machine output: aligned text tables and JSON, from the same rows; text made safe to print."""

from host_tools.report.safe_text import escape_for_terminal
from host_tools.report.table import Column, format_bytes, render_table

__all__ = ["Column", "escape_for_terminal", "format_bytes", "render_table"]
