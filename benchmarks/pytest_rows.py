"""A pytest plugin used by `gpu_report`'s tests step: each test's outcome is appended to the report's
results.jsonl as the test finishes (failures with their short traceback), so that a session killed at
its time limit keeps the rows of every test it finished and names the test it was in.

Loaded as `-p pytest_rows` (with `benchmarks/` on the path) and configured by the environment variable
`LIME_REPORT`: JSON with the report folder `dir`, the `run` name, its `start` time and the `session` name.
"""

from __future__ import annotations

import json
import os

import pytest
from report_files import ReportDir

ENVIRONMENT = "LIME_REPORT"
MAX_TRACEBACK = 4000  # characters kept per failure (its end, where the error is)


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"  # a fixture's setup or teardown failed
    return report.outcome


class RowWriter:
    def __init__(self, report: ReportDir, session: str):
        self.report, self.session = report, session

    def _row(self, kind: str, **fields) -> None:
        self.report.row("tests", kind, session=self.session, **fields)

    def pytest_collectreport(self, report):
        if report.failed:
            self._row("test-collection-error", nodeid=report.nodeid, message=report.longreprtext[-MAX_TRACEBACK:])

    def pytest_collection_finish(self, session):
        self._row("test-collection", collected=len(session.items))

    def pytest_runtest_logstart(self, nodeid, location):
        self._row("test-start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report):
        # One row per test: its call, or the setup that failed or skipped it, or a teardown that failed.
        if not (report.when == "call" or (report.when == "setup" and not report.passed)
                or (report.when == "teardown" and report.failed)):
            return
        fields = dict(nodeid=report.nodeid, outcome=_outcome(report), phase=report.when,
                      seconds=round(report.duration, 3))
        if report.failed:
            fields["message"] = report.longreprtext[-MAX_TRACEBACK:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            fields["message"] = str(report.longrepr[2])
        self._row("test", **fields)


def pytest_configure(config):
    spec = os.environ.get(ENVIRONMENT)
    if not spec:
        raise pytest.UsageError(f"-p pytest_rows needs the environment variable {ENVIRONMENT} (set by gpu_report)")
    settings = json.loads(spec)
    report = ReportDir(settings["dir"], settings["run"], settings["start"])
    config.pluginmanager.register(RowWriter(report, settings["session"]), "lime-report-rows")
