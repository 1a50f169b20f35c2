"""The credits API, mounted on the LiteLLM proxy."""

from .routes import SECURITY_HEADERS, CreditsRoute, build_router

__all__ = ["SECURITY_HEADERS", "CreditsRoute", "build_router"]
