"""Reports: the typed ``report.json`` schema and its renderings (Markdown, HTML, charts).
Never imports torch."""
