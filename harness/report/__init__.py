"""What people look at: saved maps, the HTML report, exported maps.

- :mod:`harness.report.maps` — the saved maps a run keeps next to each record
  (``--save-maps none|sample|all``) and how to read them back;
- :mod:`harness.report.html` — ``harness report --out DIR``, a static page from records and
  saved maps;
- :mod:`harness.report.export` — ``harness export-maps``, the saved maps in the official MVTec
  evaluation layout;
- :mod:`harness.report.overlay` and :mod:`harness.report.figures` — the heat overlays and the
  matplotlib figures;
- :mod:`harness.report.commands` — the two commands' functions for :mod:`harness.cli`.

Nothing here is imported by ``harness list`` or ``harness --help``: matplotlib and safetensors
load only when a report, an export or a sink needs them.
"""
