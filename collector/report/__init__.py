"""Reports for people who do not run the CLI: one HTML file per period or per incident.

``gather`` reads the figures through the store functions the CLI prints from (data.py),
``render_html`` and ``render_incident_html`` write them as one self-contained HTML file
(render.py), in Chinese or English (i18n.py), with inline SVG charts (svg.py).
"""

from collector.report.data import ReportData, gather
from collector.report.render import render_html, render_incident_html

__all__ = ["ReportData", "gather", "render_html", "render_incident_html"]
