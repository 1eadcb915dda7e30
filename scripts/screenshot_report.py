"""Open a report in headless Chromium, fail on console errors, save a screenshot.

    python scripts/screenshot_report.py [out/report.html] [docs/report_screenshot.png]
"""
import sys
from pathlib import Path

import viz

html = Path(sys.argv[1] if len(sys.argv) > 1 else "out/report.html")
png = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/report_screenshot.png")
png.parent.mkdir(parents=True, exist_ok=True)
errors = viz.screenshot(html, png, width=1400, height=2400)
print(f"{png}: {'no console errors' if not errors else errors}")
sys.exit(1 if errors else 0)
