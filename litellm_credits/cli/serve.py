"""``serve``: migrate, print how to use the proxy, then become the LiteLLM proxy with the plugin."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from cryptography.fernet import Fernet

from .. import db, migrations
from ..settings import Settings

_SERVE_HELP = """
litellm-credits: proxy starting on {url} (database: {db})

  export LITELLM_MASTER_KEY={key}

Web dashboard: {url}/credits/

Create an account (its API key is shown once) and give it credits:

  curl -s {url}/api/v1/admin/credits/accounts -H "Authorization: Bearer $LITELLM_MASTER_KEY" \\
       -H 'content-type: application/json' -d '{{"user_id": "alice"}}'
  curl -s {url}/api/v1/admin/credits/allocate -H "Authorization: Bearer $LITELLM_MASTER_KEY" \\
       -H 'content-type: application/json' -d '{{"user_id": "alice", "amount": "10"}}'

Call a model with alice's key, then look at her balance:

  curl -s {url}/v1/chat/completions -H "Authorization: Bearer sk-cr-..." \\
       -H 'content-type: application/json' \\
       -d '{{"model": "demo-chat", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl -s {url}/api/v1/credits/balance -H "Authorization: Bearer sk-cr-..."
"""


def _kept(settings: Settings, name: str, make: Callable[[], str]) -> str:
    """A secret generated once and kept (0600) in the data directory."""
    path = settings.data_dir / name
    if path.is_file():
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def master_key(settings: Settings) -> str:
    """LITELLM_MASTER_KEY, or one generated once and kept in the data directory."""
    return os.environ.get("LITELLM_MASTER_KEY") or _kept(
        settings, "master_key", lambda: "sk-" + secrets.token_urlsafe(32)
    )


def encryption_keys(settings: Settings) -> str:
    """CREDITS_ENCRYPTION_KEYS, or a Fernet key generated once and kept in the data directory
    (secrets at rest: webhook signing secrets, OpenRouter keys)."""
    return os.environ.get("CREDITS_ENCRYPTION_KEYS") or _kept(
        settings, "encryption_key", lambda: Fernet.generate_key().decode()
    )


def serve(
    config: Annotated[
        str, typer.Option(metavar="FILE", help="The LiteLLM proxy config file.")
    ] = "litellm_config.yaml",
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 4000,
    num_workers: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", help="Proxy worker processes (more than one wants CREDITS_REDIS_URL)."
        ),
    ] = 1,
) -> None:
    """Migrate, print the master key and how to start, then run the LiteLLM proxy with the plugin."""
    settings = Settings.load()
    dsn = asyncio.run(db.resolve_dsn(settings.database_url, settings.data_dir))

    async def _migrate() -> None:
        pool = await db.create_pool(dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as c:
                await migrations.migrate(c)
        finally:
            await pool.close()

    asyncio.run(_migrate())
    key = master_key(settings)
    url = f"http://{host}:{port}"
    where = "embedded, " + str(settings.data_dir) if not settings.database_url else "CREDITS_DATABASE_URL"
    print(_SERVE_HELP.format(url=url, key=key, db=where), flush=True)
    exe = shutil.which("litellm") or str(Path(sys.executable).parent / "litellm")
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": key,
        "CREDITS_DATABASE_URL": dsn,
        "CREDITS_ENCRYPTION_KEYS": encryption_keys(settings),
        "LITELLM_LOCAL_MODEL_COST_MAP": os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
        # LiteLLM serves Swagger UI at / unless told otherwise; /docs is where people look
        "DOCS_URL": os.environ.get("DOCS_URL", "/docs"),
    }
    # Prometheus multiprocess mode: every worker writes its metrics to files in this directory and
    # a scrape of any worker sums them all. Files of an earlier run would count again, so it starts
    # empty. An operator's own PROMETHEUS_MULTIPROC_DIR is left alone.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = settings.data_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    cmd = [exe, "--config", config, "--host", host, "--port", str(port)]
    if num_workers > 1:
        cmd += ["--num_workers", str(num_workers)]
        if not settings.redis_url:
            print(
                "warning: several workers without CREDITS_REDIS_URL: each counts rate limits and "
                "caches analytics on its own (balances, keys and holds are read from PostgreSQL "
                "and always current)",
                file=sys.stderr,
                flush=True,
            )
    os.execvpe(exe, cmd, env)  # noqa: S606 - replaces this process with the proxy


__all__ = ["encryption_keys", "master_key", "serve"]
