"""Shared pytest configuration.

Under CI (``CI`` set in the environment) hypothesis runs derandomized, so a CI verdict is
repeatable; locally it explores new examples on every run.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
