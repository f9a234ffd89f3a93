"""`accel serve`: real servers (uvicorn on 127.0.0.1, 2 gloo workers, the tiny SDXL pipeline) driven by a real
HTTP client and a headless Chromium. Images equal `accel run`'s for the same seed, batched or not; bad input
gets a 4xx naming the field; a full queue gets 429; SIGTERM drains; a killed worker ends the server, or,
with --max-restarts, the worker group comes back and serves again.

Two servers start at once when the module starts (one is killed by the last test), together with the
`accel run` whose images are the reference."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from accel.cli import app as cli
from accel.launch import free_port
from accel.proctree import process_alive

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TIMEOUT_S = 10  # --timeout: one collective's limit; the idle test waits longer than this
SERVER_ARGS = ["--demo", "sdxl", "--devices", "2", "--accelerator", "cpu", "--steps", str(STEPS)]
SERVER_ARGS += ["--size", "128x128", "--size", "64x64", "--timeout", str(TIMEOUT_S), "--drain-timeout", "15"]
PROMPT = "a red fox in the snow"
SEED = 7


class Server:
    """An `accel serve` process of this test module (output to a log file, its own session)."""

    def __init__(self, args: list[str], folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"serve-{self.port}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "accel", "serve", *args, "--port", str(self.port)],
                cwd=folder,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.health: list[int] = []
        self.ready_at = 0.0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Poll /health until 200, recording every status seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited early:\n{self.output()[-4000:]}"
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            self.health.append(status)
            if status == 200:
                self.ready_at = time.monotonic()
                return
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout_s} s:\n{self.output()[-4000:]}")

    def workers(self) -> list[int]:
        """The worker processes (spawned children), in start order: rank 0 first."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        spawned = [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        return sorted(spawned)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The main server, the one the last test kills a worker of, and the reference `accel run` (started
    together: start-up dominates this module's time)."""
    folder = tmp_path_factory.mktemp("serve")
    main = Server([*SERVER_ARGS, "--queue", "3"], folder)
    doomed = Server([*SERVER_ARGS, "--max-steps", "400"], folder)
    reference = subprocess.Popen(
        [sys.executable, "-m", "accel", "run", "--demo", "sdxl", "--devices", "2", "--accelerator", "cpu"]
        # Seeds 7, 8, 9 in one call of 3 images, then seed 10 alone.
        + ["--steps", str(STEPS), "--seed", str(SEED), *["-p", PROMPT] * 4, "--batch-size", "3"]
        + ["-o", str(folder / "ref.png"), "--json"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield {"main": main, "doomed": doomed, "reference": reference, "folder": folder}
    finally:
        for server in (main, doomed):
            server.stop()
        if reference.poll() is None:
            reference.kill()
            reference.wait(30)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    """The main server, warm (and the other one too: it stays idle until the last tests)."""
    for name in ("main", "doomed"):
        if not servers[name].ready_at:
            servers[name].wait_ready()
    main: Server = servers["main"]
    return main


def _generate(server: Server, timeout: float = 120, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, **body}, timeout=timeout)


def _images(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]
    ]


def _metric(server: Server, line_start: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    return values[0] if values else 0.0


def _in_background(function: Any, *args: Any, **kwargs: Any) -> Any:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def _blocker(server: Server, steps: int = 60) -> Any:
    """A long request of its own shape, running while the test queues others behind it."""
    future = _in_background(_generate, server, num_inference_steps=steps, seed=1)
    deadline = time.monotonic() + 30
    while _health(server)["running"] == 0:
        assert time.monotonic() < deadline and not future.done(), future.result().text
        time.sleep(0.05)
    return future


def test_health_is_503_until_warm_then_the_endpoints_answer(server) -> None:
    assert server.health[0] == 503 and server.health[-1] == 200, server.health
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready", "queue": 0, "running": 0}
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert (model["id"], model["sizes"], model["n"], model["default_steps"]) == (
        "sdxl",
        ["128x128", "64x64"],
        [1, 2, 3, 4],
        STEPS,
    )
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("accel_serve_requests_total", "accel_serve_queue_depth", "accel_serve_phase_seconds_bucket"):
        assert name in metrics


def _health(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
    return body


def test_the_image_for_a_seed_equals_accel_runs_batched_or_not(servers, server) -> None:
    alone = _generate(server, seed=SEED + 3)
    assert alone.json()["batch_images"] == 1
    assert [d["seed"] for d in alone.json()["data"]] == [SEED + 3]
    assert set(alone.json()["timings"]) == {"queue", "loop", "decode", "encode"}
    # Queued behind a long request, in this order, these two share one call: seeds 7, 8 and 9.
    blocker = _blocker(server)
    pair = _in_background(_generate, server, n=2, seed=SEED)
    while _health(server)["queue"] < 1:
        time.sleep(0.02)
    single = _in_background(_generate, server, seed=SEED + 2)
    batched = _images(pair.result()) + _images(single.result())
    assert blocker.result().status_code == 200
    assert pair.result().json()["batch_images"] == single.result().json()["batch_images"] == 3
    assert [d["seed"] for d in pair.result().json()["data"]] == [SEED, SEED + 1]
    reference = servers["reference"]
    stdout, stderr = reference.communicate(timeout=240)
    assert reference.returncode == 0, stderr[-3000:]
    expected = [np.asarray(Image.open(servers["folder"] / f"ref-{i}.png")) for i in range(4)]
    assert expected[0].shape == (128, 128, 3)
    # The server runs the very calls `accel run` makes: the same images, pixel for pixel, alone or batched.
    np.testing.assert_array_equal(_images(alone)[0], expected[3])
    for got, want in zip(batched, expected[:3], strict=True):
        np.testing.assert_array_equal(got, want)
    # Across batch sizes an image keeps its noise (its own generator), but the kernels are not
    # batch-invariant (a call of 3 images sums in another order than a call of 1): rounding only.
    diff = np.abs(_images(_generate(server, seed=SEED))[0].astype(int) - expected[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_images_come_as_png_or_as_the_lossy_format_asked_for(server) -> None:
    """PNG by default (lossless: the pixels `accel run` writes); jpeg and webp at the quality asked for
    (OpenAI's output_format and output_compression), the same image up to compression."""
    png = _generate(server, seed=SEED)
    assert png.json()["output_format"] == "png"
    (pixels,) = _images(png)
    for fmt, name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        response = _generate(server, seed=SEED, output_format=fmt, output_compression=90)
        assert response.status_code == 200, response.text
        assert response.json()["output_format"] == fmt
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.format == name and image.size == (128, 128)
        # The lossless image, put through the same encoder at that quality here: the very same file.
        here = io.BytesIO()
        Image.fromarray(pixels).save(here, format=name, quality=90)
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(here)))


BAD_INPUT = [
    (b"{not json", 400, None, "not valid JSON"),
    (b'["a cat"]', 400, None, "must be a JSON object"),
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": "  "}, 400, "prompt", "must not be empty"),
    ({"prompt": "a cat", "size": "100x100"}, 400, "size", "valid values: 128x128, 64x64"),
    ({"prompt": "a cat", "size": "large"}, 400, "size", "valid values: 128x128, 64x64"),
    ({"prompt": "a cat", "num_inference_steps": 0}, 400, "num_inference_steps", "an integer 1-100"),
    ({"prompt": "a cat", "num_inference_steps": 101}, 400, "num_inference_steps", "an integer 1-100"),
    ({"prompt": "a cat", "n": 0}, 400, "n", "one of 1, 2, 3, 4"),
    ({"prompt": "a cat", "n": 5}, 400, "n", "one of 1, 2, 3, 4"),
    ({"prompt": "a cat", "n": "2"}, 400, "n", "one of 1, 2, 3, 4"),
    ({"prompt": "a cat", "response_format": "url"}, 400, "response_format", "valid values: b64_json"),
    ({"prompt": "a cat", "output_format": "gif"}, 400, "output_format", "valid values: png, jpeg, webp"),
    ({"prompt": "a cat", "output_compression": 50}, 400, "output_compression", "jpeg or webp, not png"),
    (
        {"prompt": "a cat", "output_format": "jpeg", "output_compression": 101},
        400,
        "output_compression",
        "an integer 0-100",
    ),
    ({"prompt": "a cat", "guidance_scale": -1}, 400, "guidance_scale", "a number 0-50"),
    ({"prompt": "a cat", "seed": -3}, 400, "seed", "an integer 0-"),
    ({"prompt": "a cat", "steps": 4}, 400, "steps", "accepted fields: prompt, n, size"),
    ({"prompt": "a cat", "model": "dall-e-3"}, 404, "model", "valid values: sdxl"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_INPUT)
def test_bad_input_gets_a_4xx_naming_the_field(server, body, status, param, message) -> None:
    images = _metric(server, "accel_serve_images_total")
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}/v1/images/generations", content=body, timeout=30)
    else:
        response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"], error
    assert _metric(server, "accel_serve_images_total") == images  # nothing reached the workers


def test_a_full_queue_gets_429_with_retry_after(server) -> None:
    blocker = _blocker(server)
    # Distinct step counts: none can share a batch, so 3 wait (--queue 3) and the others are refused.
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda steps: _generate(server, num_inference_steps=steps, seed=2), range(2, 8))
        )
    assert blocker.result().status_code == 200
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429, 429], [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["error"]["message"]


def test_a_client_that_disconnects_before_its_batch_starts_is_dropped(server) -> None:
    dropped = _metric(server, 'accel_serve_errors_total{kind="disconnected"}')
    # The client gives up well before the blocker ends (100 steps, the most a request may ask for, take
    # seconds on an idle machine too), so its request is still queued when it disconnects.
    blocker = _blocker(server, steps=100)
    with pytest.raises(httpx.ReadTimeout):
        _generate(server, timeout=0.3, seed=3)
    assert not blocker.done()
    assert blocker.result().status_code == 200
    # The server drops the request when its batch would start, just after the blocker's response.
    deadline = time.monotonic() + 10
    while _metric(server, 'accel_serve_errors_total{kind="disconnected"}') < dropped + 1:
        assert time.monotonic() < deadline, "the disconnected request was not dropped"
        time.sleep(0.05)
    assert _metric(server, 'accel_serve_errors_total{kind="disconnected"}') == dropped + 1


def test_the_page_generates_an_image_in_chromium(server, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install chromium and chromium-driver (scripts/setup-env --browser does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        browser.get(server.url)
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#size option"))
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a lighthouse at dusk")
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys("42")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 120).until(
            lambda b: (b.find_element(By.ID, "result").get_attribute("src") or "").startswith(
                "data:image/png"
            )
        )
        assert browser.find_element(By.ID, "error").text == ""
        assert "seed 42" in browser.find_element(By.ID, "status").text
        assert "loop" in browser.find_element(By.ID, "timings").text
        natural = browser.execute_script("return document.getElementById('result').naturalWidth")
        assert natural == 128
        shot = Path(os.environ.get("ACCEL_SERVE_SCREENSHOT", tmp_path / "page.png"))
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
    finally:
        browser.quit()


def test_sigterm_drains_then_exits_0(server) -> None:
    workers = server.workers()
    assert len(workers) == 2
    blocker = _blocker(server, steps=20)
    queued = _in_background(_generate, server, num_inference_steps=6, seed=4)
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = None
    try:
        late = _generate(server, seed=5, timeout=30)
    except httpx.TransportError:
        pass  # already closed: refused just as well
    assert blocker.result().status_code == 200
    assert queued.result().status_code == 200
    if late is not None:
        assert late.status_code == 503 and "draining" in late.text
    assert server.process.wait(60) == 0, server.output()[-3000:]
    assert "drained and stopped" in server.output()
    assert not [pid for pid in workers if process_alive(pid)]


def test_an_idle_period_longer_than_the_collective_timeout_does_not_stop_the_server(servers, server) -> None:
    doomed: Server = servers["doomed"]  # idle since it was warm, while the other tests ran
    time.sleep(max(0.0, doomed.ready_at + TIMEOUT_S + 2 - time.monotonic()))
    assert time.monotonic() - doomed.ready_at > TIMEOUT_S + 2
    assert len(_images(_generate(doomed, size="64x64", seed=5))[0]) == 64


def test_a_killed_worker_ends_the_server_with_503_and_a_clear_message(servers, server) -> None:
    doomed: Server = servers["doomed"]
    workers = doomed.workers()
    assert len(workers) == 2
    running = _blocker(doomed, steps=400)
    started = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)  # rank 1
    response = running.result()
    assert response.status_code == 503
    assert "worker group failed" in response.json()["error"]["message"]
    assert doomed.process.wait(TIMEOUT_S + 30) == 1
    assert time.monotonic() - started < TIMEOUT_S + 30
    message = " ".join(doomed.output().split())
    assert "the server stopped because a worker failed" in message, message[-3000:]
    assert "rank 1: stopped by signal 9 (SIGKILL)" in message, message[-3000:]
    assert not [pid for pid in workers if process_alive(pid)]


def _request(size: int = 64, n: int = 1, steps: int = 4) -> Any:
    from accel.serve.schema import ImageRequest

    return ImageRequest("a cat", n, size, size, steps, 5.0, None, 0)


def test_the_batcher_takes_the_oldest_request_and_same_shaped_ones_behind_it() -> None:
    from accel.serve.scheduler import QueueFullError, Scheduler
    from accel.serve.settings import ServeSettings

    scheduler = Scheduler(ServeSettings(sizes=((64, 64), (128, 128)), max_batch=4, batch_wait_ms=0, queue=5))
    requests = [_request(), _request(128), _request(n=2), _request(), _request(n=2)]
    a, b, c, d, e = (scheduler.submit(r, [10 * i + k for k in range(r.n)]) for i, r in enumerate(requests))
    with pytest.raises(QueueFullError):
        scheduler.submit(_request(), [9])
    first, second, third = (scheduler.next_batch(1) for _ in range(3))
    assert first is not None and first.requests == [a, c, d]  # 4 images; e would make 6
    assert second is not None and second.requests == [b]
    assert third is not None and third.requests == [e]
    assert scheduler.next_batch(0.01) is None
    assert first.call()["seeds"] == [0, 20, 21, 30] and first.call()["prompts"] == ["a cat"] * 4
    # A plan's batch sizes (1 and 4 here): three same-shaped images go one at a time.
    planned = Scheduler(ServeSettings(sizes=((64, 64),), batch_sizes=(1, 4), max_batch=4, batch_wait_ms=0))
    pending = [planned.submit(_request(), [i]) for i in range(3)]
    assert [planned.next_batch(1).requests for _ in range(3)] == [[p] for p in pending]  # type: ignore[union-attr]


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_serve_without_its_extra_names_the_install_command(monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "uvicorn" else find_spec(name)
    )
    result = CliRunner().invoke(cli.app, ["serve", "--demo", "sdxl"])
    assert result.exit_code == 2
    assert "accel serve needs uvicorn, which is not installed: pip install 'accel[serve]'" in " ".join(
        result.output.split()
    )


def test_serve_refuses_bad_command_lines(tmp_path) -> None:
    runner = CliRunner()
    sock, port = _busy_port()
    with sock:
        cases = [
            (["serve"], "either a TARGET"),
            (["serve", str(REPO / "examples" / "tiny_demo.py")], "not a script"),
            (["serve", "--demo", "sdxl", "--size", "large"], "not a size WIDTHxHEIGHT"),
            (["serve", "--demo", "sdxl", "--size", "100x60"], "multiples of 8"),
            (["serve", "--demo", "sdxl", "--steps", "30", "--max-steps", "20"], "above --max-steps 20"),
            (["serve", "--demo", "sdxl", "--drain-timeout", "60"], "--drain-timeout must be in (0, 25]"),
            (["serve", "--demo", "sdxl", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
        ]
        for args, message in cases:
            result = runner.invoke(cli.app, [*args, "--accelerator", "cpu"])
            assert result.exit_code == 2, (args, result.output)
            assert message in " ".join(result.output.split()), (args, result.output)


def test_max_restarts_brings_a_killed_worker_group_back(tmp_path) -> None:
    restarting = Server([*SERVER_ARGS, "--max-restarts", "1"], tmp_path)
    try:
        restarting.wait_ready()
        first = restarting.workers()
        os.kill(first[1], signal.SIGKILL)  # rank 1
        deadline = time.monotonic() + TIMEOUT_S + 60
        while time.monotonic() < deadline:  # down first: the group fails, then it is started again
            try:
                if httpx.get(f"{restarting.url}/health", timeout=5).status_code != 200:
                    break
            except httpx.TransportError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the server never went down after a worker was killed")
        restarting.wait_ready()
        again = restarting.workers()
        assert len(again) == 2 and not set(again) & set(first)  # a new group: every worker restarted
        (image,) = _images(_generate(restarting, size="64x64", seed=SEED))
        assert image.shape == (64, 64, 3)
        assert restarting.process.poll() is None
    finally:
        restarting.stop()
