"""The web dashboard: operators' users and audit pages, tenants' VMs, over the wire contract."""

from hero_deployer.web.app import create_app
from hero_deployer.web.server import run_web, web_server

__all__ = ["create_app", "run_web", "web_server"]
