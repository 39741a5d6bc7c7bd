"""Benchmark: the viewer as a new user meets it (issue 26), in headless Chromium on this CPU.

`vq3d view --model vq3d-tiny-synth` is started; once its port answers, a page opens and is timed:
the first picture in the 3D view (the first "Resolution: WxHpx" nerfstudio prints with W > 0,
after a frame was sent), the first still at least 256 px wide, and, after "Splats (browser)" is switched on, the
time until the splats are built and sent (the panel's Status line), with their count and bytes.

    .venv/bin/python benchmarks/viewer_latency.py [--runs 3]

Needs Debian's chromium (`make test` installs it) and Playwright (a test dependency).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import time

from common import BIN, git_revision, machine, update_section

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise SystemExit(f"vq3d view exited: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("vq3d view did not open its port")


def status_value(page) -> str:
    row = page.locator("label", has_text="Status").first.locator("xpath=ancestor::div[contains(@class, 'mantine-Flex-root')][1]")
    return row.locator("input").first.input_value()


def one_run() -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([str(BIN / "vq3d"), "view", "--model", "vq3d-tiny-synth", "--websocket-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            start = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}")
            first = still = None
            width = 0
            while still is None and time.perf_counter() - start < 120:
                found = re.search(r"Resolution: (\d+)x(\d+)px", page.inner_text("body"))
                if found and int(found.group(1)) > 0:  # nerfstudio shows "0x0px" until a frame arrives
                    first = first if first is not None else time.perf_counter() - start
                    width = int(found.group(1))
                    if width >= 256:
                        still = time.perf_counter() - start
                time.sleep(0.05)
            page.get_by_text("Splats (browser)").first.click()
            clicked = time.perf_counter()
            text = ""
            while time.perf_counter() - clicked < 180:
                text = status_value(page)
                if re.match(r"\d+ splats", text):
                    break
                time.sleep(0.1)
            splat_seconds = time.perf_counter() - clicked
            browser.close()
        count = re.match(r"(\d+) splats \(([\d.]+) MB\)", text)
        return {"first": first, "still": still, "still_width": width, "splats": splat_seconds,
                "count": int(count.group(1)) if count else 0, "mb": float(count.group(2)) if count else 0.0}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="page openings timed (each with a fresh server)")
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    med = {key: statistics.median(r[key] for r in runs) for key in ("first", "still", "splats", "count", "mb")}
    body = (
        "## The viewer on a CPU: first picture, still frame, splats (`vq3d-tiny`, issue 26)\n\n"
        "| what | median of runs | target |\n|---|---|---|\n"
        f"| first picture in the 3D view, after the page opens | {med['first']:.1f} s | <= 5 s |\n"
        f"| a still at least 256 px wide, after the page opens | {med['still']:.1f} s | <= 30 s |\n"
        f"| 'Splats (browser)' switched on -> splats built and sent | {med['splats']:.1f} s | (report) |\n"
        f"| splats | {med['count']:.0f}, {med['mb']:.1f} MB (float32 centres, covariances, colours, opacities) | (report) |\n\n"
        "`vq3d view --model vq3d-tiny-synth` (the shipped model; a fresh server per run, timed from `page.goto` "
        "once its port answers), headless Chromium 1280x800 with software WebGL, on the same 2 cores as the server. "
        "Per run: " + "; ".join(f"{r['first']:.1f} / {r['still']:.1f} / {r['splats']:.1f} s" for r in runs) + ".\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/viewer_latency.py --runs {args.runs}`\n"
    )
    print(body)
    update_section("viewer-latency", body)


if __name__ == "__main__":
    main()
