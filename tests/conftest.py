"""Shared by host and VM runs: say where the suite runs, so a CI log is readable alone."""
import os

CONTROL = "/dev/ublk-control"


def pytest_report_header(config):
    where = "inside the test VM" if os.environ.get("UBLKSHELL_IN_VM") == "1" else "on the host"
    driver = "present" if os.path.exists(CONTROL) else "absent"
    return f"ublkshell: {where}, kernel {os.uname().release}, {CONTROL} {driver}"


try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves without it
    settings = None
if settings is not None:
    # the default run tries the same examples every time, so that a red run is a finding
    # anyone can reproduce; UBLKSHELL_HYPOTHESIS=explore draws new ones (and keeps failures)
    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("UBLKSHELL_HYPOTHESIS", "repeatable"))
