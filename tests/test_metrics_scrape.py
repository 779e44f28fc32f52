"""The container's entry command, run outside Docker, and a real scrape of its metrics.

``apcm serve`` starts as a subprocess with the environment the Dockerfile sets
(only the model, data directory, ports and bind address are pointed at test
values), passes the image's health check, serves real calls, exports metrics
that ``promtool check metrics`` accepts and that the alerts and dashboard
query, and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_deploy_files import (
    SERVER_METRICS,
    alert_exprs,
    dashboard_exprs,
    dockerfile_env,
    metric_family,
    metric_names,
)
from test_security import healthcheck_module

from apcm.client import MemoryClient

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = re.compile(r"serving gRPC on (\S+):(\d+), metrics on \S*:(\d+)")


@dataclass
class Served:
    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()


def _container_env(model: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APCM_")}
    image_env = dockerfile_env()
    image_env.pop("PATH")
    env.update(image_env)
    env.update(APCM_MODEL=str(model), APCM_DATA_DIR=str(data_dir), APCM_GRPC_PORT="0",
               APCM_METRICS_PORT="0", APCM_METRICS_HOST="127.0.0.1", APCM_DEVICE="cpu",
               APCM_SHUTDOWN_GRACE_S="1")
    return env


@pytest.fixture(scope="module")
def served(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    apcm = shutil.which("apcm", path=str(Path(sys.executable).parent))
    assert apcm is not None, "the apcm console script is not installed in this environment"
    env = _container_env(model_path, tmp_path_factory.mktemp("var-lib-apcm"))
    process = subprocess.Popen([apcm, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    seen: list[str] = []
    match = None
    while match is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = READY_LINE.search(line)
    if match is None:
        process.kill()
        pytest.fail("apcm serve did not report its ports:\n" + "".join(seen))
    # Keep draining the log so a chatty server never blocks on a full pipe.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    served = Served(process, int(match.group(2)), int(match.group(3)))
    yield served
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def test_entry_command_passes_the_image_health_check(served: Served) -> None:
    assert healthcheck_module().check({"APCM_GRPC_PORT": str(served.grpc_port)})


def test_scrape_passes_promtool_and_counts_calls(served: Served, digits: np.ndarray) -> None:
    x = digits[1200:1204]
    with MemoryClient(f"127.0.0.1:{served.grpc_port}", timeout=30) as client:
        client.wait_until_serving(timeout=30)
        for _ in range(3):
            client.decompress(client.compress(x))
    text = served.scrape()
    ok = re.search(r'^apcm_requests_total\{code="OK",method="Compress"\} (\S+)$', text, re.M)
    assert ok is not None and float(ok.group(1)) >= 3
    assert re.search(r"^apcm_serving 1\.0$", text, re.M)
    assert re.search(r'^apcm_model_info\{.*device="cpu".*\} 1\.0$', text, re.M)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_scrape_exports_every_metric_the_alerts_and_dashboard_query(served: Served) -> None:
    families = set(re.findall(r"^# TYPE (\S+) ", served.scrape(), flags=re.M))
    queried = {metric_family(n) for e in alert_exprs() + dashboard_exprs() for n in metric_names(e)}
    assert queried <= SERVER_METRICS
    assert queried <= families, queried - families


def test_sigterm_stops_the_entry_command_cleanly(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
