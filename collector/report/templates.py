"""The report's HTML and CSS, as Jinja2 templates kept in the package's code.

Kept as Python strings rather than files beside it, so an installed collector (a wheel, the offline
bundle) always has them without package-data settings. render.py fills them with autoescape on:
every value is escaped unless it is Markup made here or in svg.py. Print layout: A4 pages with
15 mm margins, table headers repeated on each page, sections, tables and charts kept whole where
they fit on a page. No script runs: the only <script> element is the JSON data block.
"""

from __future__ import annotations

from collector.report.i18n import FONT_STACK

MONO_STACK = '"Noto Sans Mono CJK SC", "WenQuanYi Micro Hei Mono", "DejaVu Sans Mono", monospace'

CSS = """
@page { size: A4; margin: 15mm; }
* { box-sizing: border-box; }
html { font-family: FONT_STACK; color: #111827; font-size: 10pt; line-height: 1.45;
       -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { margin: 0 auto; max-width: 180mm; padding: 10mm 0; background: #fff; }
@media print { body { max-width: none; padding: 0; } }
h1 { font-size: 22pt; margin: 0 0 4mm; line-height: 1.25; }
h2 { font-size: 14pt; margin: 8mm 0 3mm; padding-bottom: 1mm; border-bottom: 2px solid #1f2937;
     break-after: avoid; }
h3 { font-size: 11pt; margin: 5mm 0 2mm; break-after: avoid; }
h4 { font-size: 10pt; margin: 3mm 0 1mm; break-after: avoid; color: #374151; }
p { margin: 1mm 0 2mm; }
section, table, figure, .incident, .cover, .kv { break-inside: avoid; }
section.long { break-inside: auto; }
figure { margin: 2mm 0 4mm; }
figcaption { font-size: 9pt; color: #4b5563; }
svg.chart { width: 100%; height: auto; max-width: 180mm; display: block; }
table { border-collapse: collapse; width: 100%; font-size: 8.5pt; margin: 1mm 0 3mm; }
thead { display: table-header-group; }
tr { break-inside: avoid; }
th { text-align: left; font-weight: 600; background: #f3f4f6; border-bottom: 1px solid #9ca3af; }
th, td { padding: 1.2mm 1.5mm; vertical-align: top; border-bottom: 1px solid #e5e7eb; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.time { white-space: nowrap; font-variant-numeric: tabular-nums; }
.mono { font-family: MONO_STACK; font-size: 8pt; word-break: break-all; white-space: pre-wrap; }
.muted, .note { color: #6b7280; }
.note { font-size: 9pt; }
.cover { min-height: 240mm; display: flex; flex-direction: column; justify-content: center;
         break-after: page; }
.cover .subtitle { font-size: 12pt; color: #4b5563; margin-bottom: 12mm; }
.cover dl { display: grid; grid-template-columns: max-content 1fr; gap: 2mm 6mm; font-size: 11pt; }
.cover dt { color: #6b7280; }
.cover dd { margin: 0; }
.cover ol { font-size: 10.5pt; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 0.5mm 4mm; margin: 1mm 0 2mm;
      align-items: baseline; }
.kv dt { color: #6b7280; }
.kv dd { margin: 0; }
.figures { display: flex; gap: 8mm; margin: 2mm 0 4mm; }
.figures div { font-size: 9pt; color: #4b5563; }
.figures strong { display: block; font-size: 20pt; color: #111827; }
.incident { border-top: 1px solid #9ca3af; padding-top: 2mm; margin-top: 4mm; }
.incident h3 { margin-top: 0; }
.badge { display: inline-block; padding: 0 2mm; border-radius: 1mm; font-size: 8.5pt; color: #fff;
         white-space: nowrap; }
.sev-informational { background: #6b7280; } .sev-low { background: #2563eb; }
.sev-medium { background: #d97706; } .sev-high { background: #dc2626; } .sev-critical { background: #7f1d1d; }
.status { display: inline-block; padding: 0 2mm; border: 1px solid #9ca3af; border-radius: 1mm;
          font-size: 8.5pt; white-space: nowrap; }
.over { color: #b91c1c; font-weight: 600; }
""".replace("MONO_STACK", MONO_STACK).replace("FONT_STACK", FONT_STACK)

MACROS = """
{%- macro table(tb) -%}
<table{% if tb.css %} class="{{ tb.css }}"{% endif %}>
  <thead><tr>
  {%- for h in tb.headers %}<th{% if h.css %} class="{{ h.css }}"{% endif %}>{{ h.text }}</th>{% endfor -%}
  </tr></thead>
  <tbody>
  {%- for row in tb.rows %}
    <tr{% if row.css %} class="{{ row.css }}"{% endif %}>
    {%- for c in row.cells %}<td
      {%- if c.css %} class="{{ c.css }}"{% endif %}{% if c.span > 1 %} colspan="{{ c.span }}"{% endif %}>
      {{- c.text }}</td>{% endfor -%}
    </tr>
  {%- endfor %}
  </tbody>
</table>
{%- endmacro -%}

{%- macro listing(tb, empty) -%}
{%- if tb.rows %}{{ table(tb) }}{% if tb.more %}<p class="note">+{{ tb.more }}</p>{% endif %}
{%- else %}<p class="muted">{{ empty }}</p>{% endif %}
{%- endmacro -%}

{%- macro incident(v) -%}
<article class="incident" id="incident-{{ v.id }}">
  <h3><span class="badge sev-{{ v.severity }}">{{ v.severity_name }}</span>
      <span class="status">{{ v.status_name }}</span>
      {{ t.incident }} {{ v.id }}{{ t.colon }}{{ v.title }}</h3>
  <dl class="kv">
  {%- for label, value in v.facts %}<dt>{{ label }}</dt><dd>{{ value }}</dd>{% endfor %}
  </dl>
  {%- if v.events.rows %}
  <h4>{{ t.evidence }} ({{ v.events_note }})</h4>
  {{ table(v.events) }}
  {%- endif %}
  {%- if v.others %}
  <h4>{{ t.other_evidence }}</h4>
  <dl class="kv">
  {%- for key, value in v.others %}<dt>{{ key }}</dt><dd class="mono">{{ value }}</dd>{% endfor %}
  </dl>
  {%- endif %}
  {%- if v.processes.rows %}
  <h4>{{ t.processes }}</h4>
  {{ table(v.processes) }}
  {%- endif %}
  <h4>{{ t.lifecycle }}</h4>
  {{ listing(v.actions, t.no_actions) }}
</article>
{%- endmacro -%}
"""

HEAD = """<!DOCTYPE html>
<html lang="{{ html_lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="zonewatch">
<title>{{ page_title }}</title>
<style>{{ css }}</style>
</head>
"""

REPORT = (
    HEAD
    + """{% import "macros.html" as m with context %}
<body>
<header class="cover">
  <h1>{{ t.title }}</h1>
  <div class="subtitle">{{ t.subtitle }}</div>
  <dl>
    <dt>{{ t.period }}</dt><dd>{{ period }}</dd>
    <dt>{{ t.filters }}</dt><dd>{{ scope }}</dd>
    <dt>{{ t.generated }}</dt><dd>{{ generated }}</dd>
  </dl>
  <h3>{{ t.contents }}</h3>
  <ol>
  {%- for anchor, heading in contents %}
    <li><a href="#{{ anchor }}">{{ heading }}</a></li>
  {%- endfor %}
  </ol>
  <p class="note">{{ t.data_note }}</p>
</header>

<section id="summary">
  <h2>{{ t.summary }}</h2>
  <div class="figures">
    <div><strong>{{ summary.incidents }}</strong>{{ t.incidents_seen }}</div>
    <div><strong>{{ summary.new }}</strong>{{ t.incidents_new }}</div>
  </div>
  {{ m.table(summary.by_severity) }}
  {{ m.table(summary.by_status) }}
  <figure>{{ summary.chart }}<figcaption>{{ t.per_day }}</figcaption></figure>
</section>

<section id="incidents" class="long">
  <h2>{{ t.incidents }}</h2>
  {%- if not incidents %}<p class="muted">{{ t.no_incidents }}</p>{% endif %}
  {%- if omitted %}<p class="note">{{ omitted }}</p>{% endif %}
  {%- for v in incidents %}
  {{ m.incident(v) }}
  {%- endfor %}
</section>

<section id="links" class="long">
  <h2>{{ t.links }}</h2>
  {%- for note in link_notes %}<p class="note">{{ note }}</p>{% endfor %}
  {%- if not links %}<p class="muted">{{ t.no_links }}</p>{% endif %}
  {%- for link in links %}
  <section class="link">
    <h3>{{ link.heading }}</h3>
    <figure>{{ link.chart }}</figure>
    {{ m.table(link.table) }}
  </section>
  {%- endfor %}
</section>

<section id="migration" class="long">
  <h2>{{ t.migration }}</h2>
  {%- for group in migration.groups %}
  <section>
    <h3>{{ group.heading }}</h3>
    <figure>{{ group.chart }}</figure>
    {{ m.table(group.table) }}
  </section>
  {%- endfor %}
  <section>
    <h3>{{ t.trend }}</h3>
    {%- if migration.trend %}<figure>{{ migration.trend }}</figure>
    {%- else %}<p class="note">{{ t.trend_filtered }}</p>{% endif %}
  </section>
  <section>
    <h3>{{ t.regressed_hosts }}</h3>
    {{ m.listing(migration.regressed, t.no_regressed) }}
  </section>
  <section>
    <h3>{{ t.expiring }}</h3>
    {{ m.listing(migration.expiring, t.no_expiring) }}
  </section>
</section>

<section id="coverage" class="long">
  <h2>{{ t.coverage }}</h2>
  {{ m.table(coverage.agents) }}
  <section>
    <h3>{{ t.silent }}</h3>
    {{ m.listing(coverage.silent, t.no_silent) }}
  </section>
  <section>
    <h3>{{ t.capture }}</h3>
    <p>{{ coverage.capture_summary }}</p>
    {{ m.listing(coverage.losses, t.no_capture_loss) }}
  </section>
  <section>
    <h3>{{ t.rejected }}</h3>
    {%- if coverage.rejected_note %}<p class="note">{{ coverage.rejected_note }}</p>{% endif %}
    {{ m.listing(coverage.rejected, t.no_rejected) }}
  </section>
</section>
<script type="application/json" id="zonewatch-report-data">{{ json_block }}</script>
</body>
</html>
"""
)

INCIDENT = (
    HEAD
    + """{% import "macros.html" as m with context %}
<body>
<header>
  <h1>{{ t.incident_title }}{{ t.colon }}{{ t.incident }} {{ v.id }}</h1>
  <dl class="kv"><dt>{{ t.generated }}</dt><dd>{{ generated }}</dd></dl>
  <p class="note">{{ t.subtitle }}</p>
</header>
{{ m.incident(v) }}
<script type="application/json" id="zonewatch-report-data">{{ json_block }}</script>
</body>
</html>
"""
)

TEMPLATES = {"macros.html": MACROS, "report.html": REPORT, "incident.html": INCIDENT}
