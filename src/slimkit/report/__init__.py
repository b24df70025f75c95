"""Reports: JSON written by the pipeline, rendered here to one self-contained HTML file."""

from .html import render_html, write_html

__all__ = ["render_html", "write_html"]
