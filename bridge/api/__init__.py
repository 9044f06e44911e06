"""The local REST API (`/api/v1`), mirroring the hosted product's paths and JSON shapes."""

from bridge.api.ports import CallControl
from bridge.api.server import create_api_app

__all__ = ["CallControl", "create_api_app"]
