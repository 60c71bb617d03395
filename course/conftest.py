"""pytest setup for course/: the repository root on the path, one marker per assignment of kit.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kit  # noqa: E402  (needs the path above)


def pytest_configure(config):
    for name, (teaches, blanks) in kit.ASSIGNMENTS.items():
        config.addinivalue_line("markers", f"{name}: course assignment '{name}', {teaches} ({', '.join(blanks)})")
