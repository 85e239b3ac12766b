"""What people look at: saved maps, the HTML report, exported maps.

- :mod:`harness.results.report.maps` — the saved maps a run keeps next to each record
  (``--save-maps none|sample|all``) and how to read them back;
- :mod:`harness.results.report.html` — ``harness report --out DIR``, a static page from records and
  saved maps;
- :mod:`harness.results.report.export` — ``harness export-maps``, the saved maps in the official MVTec
  evaluation layout;
- :mod:`harness.results.report.overlay` and :mod:`harness.results.report.figures` — the heat overlays and the
  matplotlib figures;
- :mod:`harness.results.report.commands` — the two commands' functions for :mod:`harness.cli`.

Nothing here is imported by ``harness list`` or ``harness --help``: matplotlib and safetensors
load only when a report, an export or a sink needs them.
"""
