"""``taskd init``, ``taskd serve`` and ``taskd schemas``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from taskd.cli.settings import config_path, configure_logging, server_settings, warn_misspelt_env
from taskd.config import (
    ServerSettings,
    write_default_server_config,
)


async def _init_database(settings: ServerSettings) -> str | None:
    from taskd.auth import ensure_super_token
    from taskd.store import Store

    async with Store(settings.database_url, pool_size=2) as store:
        await store.migrate()
        return await ensure_super_token(store)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the config (if missing), the schema and the super token."""
    warn_misspelt_env()
    path = config_path(args)
    created = not path.exists()
    if created:
        write_default_server_config(path)
    settings = server_settings(args)
    if settings.is_sqlite:
        db_file = Path(settings.database_url.split("///", 1)[1])
        db_file.parent.mkdir(parents=True, exist_ok=True)
    super_token = asyncio.run(_init_database(settings))
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(path),
                    "server_uuid": settings.server_uuid,
                    "super_token": super_token,
                }
            )
        )
        return 0
    print(f"{'wrote' if created else 'using'} config {path}")
    print(f"server uuid: {settings.server_uuid}")
    if super_token is None:
        print("a super token already exists; it was not replaced")
    else:
        print(f"super token (shown once, keep it safe): {super_token}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT."""
    from taskd.config import ensure_node_id
    from taskd.server import serve

    settings = ensure_node_id(server_settings(args))
    configure_logging(settings.log_level)
    warn_misspelt_env()
    return 0 if serve(settings) else 1


def cmd_schemas(args: argparse.Namespace) -> int:
    """Write (or with --check, verify) the JSON Schemas and openrpc.json."""
    import taskd.methods  # noqa: F401 - registers every method the document describes
    from taskd import schemas

    directory = Path(args.dir)
    if args.check:
        stale = schemas.stale(directory)
        if stale:
            print(
                f"stale schema files in {directory}: {', '.join(stale)}; run `taskd schemas`",
                file=sys.stderr,
            )
            return 1
        print(f"{directory} is up to date")
        return 0
    changed = schemas.write(directory)
    print(
        f"wrote {len(changed)} file(s) to {directory}"
        + (f": {', '.join(changed)}" if changed else "")
    )
    return 0
