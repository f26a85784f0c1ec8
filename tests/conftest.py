"""Shared by host and VM runs: say where the suite runs, so a CI log is readable alone."""
import os

CONTROL = "/dev/ublk-control"


def pytest_report_header(config):
    where = "inside the test VM" if os.environ.get("UBLKSHELL_IN_VM") == "1" else "on the host"
    driver = "present" if os.path.exists(CONTROL) else "absent"
    return f"ublkshell: {where}, kernel {os.uname().release}, {CONTROL} {driver}"
