"""The Celery application: ``celery -A workers.app worker`` (``ragq worker`` runs this).

Settings are read once here, at the worker's entry point, and handed to the tasks
through :data:`runtime`.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from common.config import Settings
from common.devices import apply_cuda_env
from common.limits import check_visibility_timeout
from workers.celeryconfig import build_config


def create_app(settings: Settings) -> Celery:
    app = Celery("ragq", include=["workers.tasks"], set_as_current=False)
    app.config_from_object(build_config(settings))
    return app


apply_cuda_env(os.environ)  # before torch is imported anywhere: pool processes inherit it
settings = Settings()
check_visibility_timeout(settings)  # a worker must never run past its message's visibility
app = create_app(settings)
logging.getLogger("ragq").setLevel(logging.INFO)
