"""The report of a run directory: tables, plots, report.{md,json,html}."""
