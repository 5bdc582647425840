"""What the routes of one app share: settings, the client, the waiters, the secret scrubber."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis import asyncio as aioredis

from common.config import Settings
from common.files import FileStore
from producer.client import Client
from producer.http.calls import WorkerCalls
from producer.http.health import HealthCheck
from producer.http.notify import Notifier


@dataclass
class Context:
    settings: Settings
    client: Client
    token: str
    scrub: Callable[[str], str]
    probe: redis.Redis  # short timeouts, no retries: sorting out failures must answer fast
    aredis: aioredis.Redis
    notifier: Notifier
    calls: WorkerCalls
    health: HealthCheck
    files: FileStore
