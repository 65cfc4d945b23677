"""A report as one self-contained HTML file, in Chinese or English.

One file an operator can mail, archive and print: the CSS and the charts (SVG) are inline, fonts
are the ones installed where it is opened, nothing is fetched, and no script runs. Its figures
are also embedded as JSON (``<script type="application/json" id="zonewatch-report-data">``, keys
in data.py's docstring) for programs, and for the tests that hold each one against the CLI.

Agents' text (host names, command lines, evidence) is untrusted: Jinja2 escapes every value
(autoescape), svg.py escapes what it draws, and the JSON block has ``<``, ``>`` and ``&`` written
as \\u escapes so that no string can end the script element.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup

from collector.report import views
from collector.report.data import ReportData, incident_json, report_json
from collector.report.i18n import HTML_LANG, check_lang
from collector.report.templates import CSS, TEMPLATES
from collector.store.incidents import IncidentDetail

# Autoescape everywhere; a name the template misspells fails the render instead of printing "".
_ENV = Environment(loader=DictLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)


def render_html(data: ReportData, lang: str) -> str:
    """The period's report (see data.gather) in lang: "zh" or "en"."""
    f = views.Formats(check_lang(lang))
    t = f.t
    scope = " / ".join(v for v in (data.department, data.county) if v) or t["all_hosts"]
    period = f"{f.when(data.since_ms)} {t['to']} {f.when(data.until_ms)}"
    link_notes, links = views.links(data, f)
    omitted = ""
    if data.incidents_omitted:
        omitted = t["incidents_omitted"].format(
            count=views.num(data.incidents_omitted), shown=views.num(len(data.incidents))
        )
    context = {
        "t": t,
        "html_lang": HTML_LANG[lang],
        "page_title": f"{t['title']} ({period})",
        "css": Markup(CSS),
        "period": period,
        "scope": scope,
        "generated": f.when(data.generated_ms),
        "contents": [
            (anchor, t[anchor]) for anchor in ("summary", "incidents", "links", "migration", "coverage")
        ],
        "summary": views.summary(data, f),
        "incidents": [views.incident(e.detail, f, views.EVENTS_IN_SUMMARY) for e in data.incidents],
        "omitted": omitted,
        "link_notes": link_notes,
        "links": links,
        "migration": views.migration(data.migration, f),
        "coverage": views.coverage(data.coverage, scope, data.filtered, f),
        "json_block": json_block(report_json(data, lang)),
    }
    return _ENV.get_template("report.html").render(context)


def render_incident_html(detail: IncidentDetail, lang: str, *, generated_ms: int | None = None) -> str:
    """One incident's report: all `incidents show` prints, every evidence event included.

    generated_ms: the time the cover gives (default now).
    """
    f = views.Formats(check_lang(lang))
    generated = generated_ms if generated_ms is not None else time.time_ns() // 1_000_000
    document = {
        "report": "zonewatch-incident",
        "version": 1,
        "lang": lang,
        "generated_ms": generated,
        "incident": incident_json(detail),
    }
    context = {
        "t": f.t,
        "html_lang": HTML_LANG[lang],
        "page_title": f"{f.t['incident_title']} {detail.id}: {detail.title}",
        "css": Markup(CSS),
        "generated": f.when(generated),
        "v": views.incident(detail, f, None),
        "json_block": json_block(document),
    }
    return _ENV.get_template("incident.html").render(context)


def json_block(document: Any) -> Markup:
    """JSON safe inside <script>: no "<", ">" or "&" as such (so no "</script>" and no "<!--"), every
    other character as it is. json.loads reads it back unchanged."""
    text = json.dumps(document, ensure_ascii=False, default=str)
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(raw, escaped)
    return Markup(text)
