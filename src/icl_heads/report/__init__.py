"""The report of a ``reproduce`` run: :mod:`.build` reads the run folder and writes ``report.md``,
``report.html`` and ``verdicts.json``; :mod:`.document` is the small document model both render from."""

from .build import verdicts_json, write_report

__all__ = ["verdicts_json", "write_report"]
