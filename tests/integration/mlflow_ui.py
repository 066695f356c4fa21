"""Headless Chromium (Debian's package) against a real MLflow UI: the page's DOM after its scripts ran, and a
screenshot. Flags as this workplace's machines need them (no sandbox as root, no background networking)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.integration.pipeline_helpers import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = ROOT / "test-output" / "mlflow-ui"
"""Where the UI test leaves its screenshots (the test output folder; git-ignored)."""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1100", "--virtual-time-budget=25000"]


def render(url: str, screenshot: Path | None = None, timeout: int = 120) -> str:
    """The DOM of ``url`` after its scripts ran (and a PNG at ``screenshot``); a fresh browser profile each time."""
    with tempfile.TemporaryDirectory(prefix="rift-chromium-") as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run(cmd + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout).stdout
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(cmd + [f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout)
    return dom
