"""Make sure a Redis answers at RAGQ_REDIS_URL (default redis://localhost:6379/0).

If none answers and the URL points at this machine: start ``redis-server`` if it is
installed (append-only file on, data under .ragq/redis), else install Debian's
``redis-server`` package when running as root with apt-get, else explain exactly how
to get one and exit non-zero.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from common.config import Settings, mask_url


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def main() -> int:
    url = Settings().redis_dsn
    if answers(url):
        print(f"redis: answering at {mask_url(url)}")
        return 0
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    if host not in ("localhost", "127.0.0.1", "::1"):
        print(f"redis: nothing answers at {mask_url(url)}; start that server or set RAGQ_REDIS_URL", file=sys.stderr)
        return 1
    if not shutil.which("redis-server") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("redis: installing Debian's redis-server package")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False)
    if not shutil.which("redis-server"):
        print("redis: no Redis server answers and redis-server is not installed.\n"
              "  Debian/Ubuntu: sudo apt-get install redis-server   (then run make again)\n"
              "  macOS:         brew install redis && brew services start redis\n"
              "  Docker:        docker run -d -p 6379:6379 redis:7 redis-server --appendonly yes\n"
              "  or point RAGQ_REDIS_URL at a running server.", file=sys.stderr)
        return 1
    data = Path(".ragq/redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
           "--appendonly", "yes", "--dir", str(data), "--logfile", str(data / "redis.log")]
    if parts.password:
        cmd += ["--requirepass", parts.password]
    subprocess.run(cmd, check=True)
    for _ in range(50):
        if answers(url):
            print(f"redis: started redis-server on port {port} (AOF on, data in {data})")
            return 0
        time.sleep(0.1)
    print(f"redis: started redis-server but it does not answer; see {data / 'redis.log'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
