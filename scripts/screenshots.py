"""The README's pictures, taken in the headless Chromium of tests/test_browser.py (`make screenshots`).

docs/report.png: the top of a report (``--report data/<exp>/report/report.html``; by
default a tiny ``tokens`` report made here by the real stages). docs/mlflow_compare.png:
the MLflow compare view of two runs of one experiment that differ in one param, on a
throwaway ``mlflow server`` (SQLite). Both are reduced to a 256-colour palette to stay
small.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_browser as tb  # noqa: E402  (the browser, the tiny report, the server and runs)


def save(driver, path: Path) -> None:
    from PIL import Image

    image = Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}: {image.width}x{image.height}, {path.stat().st_size // 1024} KB")


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, help="report.html to show (default: a tiny tokens report made here)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="attnlab-screens-") as tmp:
        tmp = Path(tmp)
        report = args.report.resolve() if args.report else tb.tiny_tokens_report(tmp) / "report" / "report.html"
        driver = tb.chrome(1100, 800)
        try:
            driver.get(report.as_uri())
            wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
            save(driver, args.out / "report.png")

            with tb.mlflow_server(tmp) as url:
                exp_id, run_ids = tb.log_two_runs(url, tmp)
                driver.set_window_size(1200, 900)
                driver.get(tb.compare_url(url, exp_id, run_ids))
                wait(driver, lambda d: d.find_elements("xpath", "//tr[th[normalize-space()='Duration:']]"))
                for close in driver.find_elements("css selector", "[aria-label*='lose' i]"):  # the Assistant panel
                    if close.is_displayed():
                        close.click()
                        break
                # scroll to the run details (params, metrics, durations) below the plots
                driver.execute_script("document.evaluate(\"//*[normalize-space()='Run details']\", document, null, "
                                      "9, null).singleNodeValue?.scrollIntoView()")
                time.sleep(1)
                save(driver, args.out / "mlflow_compare.png")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
