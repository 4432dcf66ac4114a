"""The report document: tables, plots, Markdown and HTML."""
