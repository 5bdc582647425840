"""Start and stop a real llama.cpp OpenAI-compatible server (llama-cpp-python) for tests.

Install it with ``pip install 'llama-cpp-python[server]'`` (builds llama.cpp from source,
a few minutes). Tests that need it skip with :data:`SKIP_REASON` when it is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SKIP_REASON = "llama_cpp is not installed: pip install 'llama-cpp-python[server]'"


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def free_port() -> int:
    """A localhost port nothing listens on right now (bound, then closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_llama_server(
    gguf_path: str | Path,
    port: int | None = None,
    *,
    n_ctx: int = 2048,
    startup_timeout_s: float = 120.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` on 127.0.0.1 and yield its base URL (``.../v1``).

    Waits until ``GET /v1/models`` answers; the server is terminated on exit. Its output
    goes to a temporary log whose tail is part of the error when it fails to start.
    """
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), *extra_args,
    ]
    with tempfile.TemporaryFile(mode="w+b") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(base_url, process, log, startup_timeout_s)
            _smoke_test(base_url, process, log)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if json.load(response).get("data"):
                    return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"llama.cpp server not ready at {base_url} after {timeout_s:g} s:\n{_tail(log)}")


def _smoke_test(base_url: str, process: subprocess.Popen[bytes], log: object) -> None:
    """One tiny multi-token completion, so a llama.cpp build that crashes on prompt
    evaluation fails here with its log rather than later as "server disconnected".

    Seen: a ``GGML_NATIVE`` build on a CPU advertising AMX, in a VM whose kernel doesn't
    grant AMX tile state, dies with a general protection fault on ``ldtilecfg``.
    """
    body = json.dumps({"prompt": "Hello world, how are you today?", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"{base_url}/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
    except OSError as exc:
        time.sleep(0.5)
        state = f"exited with {process.poll()}" if process.poll() is not None else "still running"
        raise RuntimeError(
            f"llama.cpp server failed its first completion ({exc}; server {state}). If it "
            "crashed, rebuild llama-cpp-python without CPU-specific kernels: "
            "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall "
            f"'llama-cpp-python[server]'\n{_tail(log)}"
        ) from exc


def _tail(log: object, size: int = 4000) -> str:
    log.seek(0)  # type: ignore[attr-defined]
    return log.read()[-size:].decode(errors="replace")  # type: ignore[attr-defined]
