"""`lad serve`: parse options, apply the security checks that must pass before binding, run uvicorn.

`services.cli` wires `add_arguments` / `main` as the `serve` subcommand; `python -m services.server ...` runs the
same thing without the CLI.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional

from services.security import SecurityError, check_bind, load_token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs an API token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--registry", default="runs/registry.sqlite", metavar="PATH",
                        help="SQLite run registry (default runs/registry.sqlite)")
    parser.add_argument("--runs-root", default="runs", metavar="DIR",
                        help="run directories go here, a folder or s3://BUCKET/PREFIX (gs:// too); a posted output_dir must "
                             "resolve under it (default runs)")
    parser.add_argument("--data-root", action="append", default=None, metavar="DIR",
                        help="datasets and checkpoints a run may read must resolve under one of these or the "
                             "runs root (repeatable; default: data)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="Ray job server, e.g. http://ray-head:8265: runs become Ray jobs "
                             "(default: local subprocesses)")
    parser.add_argument("--ray-token-file", default=None, metavar="F",
                        help="Ray cluster auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                             "~/.ray/auth_token)")
    parser.add_argument("--token-file", default=None, metavar="F",
                        help="API token file (else $LAD_API_TOKEN); with a token, POST/PUT need "
                             "'Authorization: Bearer <token>'")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="runs executing at once; more wait as pending (default: usable cores / 2 locally, "
                             "4 on Ray)")
    parser.add_argument("--stop-grace", type=float, default=30.0, metavar="S",
                        help="local runs: seconds between SIGTERM and SIGKILL on stop (default 30)")
    parser.add_argument("--run-command", default=None, metavar="CMD",
                        help="advanced: the command a run's config path is appended to (default: "
                             f"'{sys.executable} -m pipeline.run --quiet' locally, 'python -m pipeline.run --quiet' "
                             "as a Ray job entrypoint)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = load_token(args.token_file)
        check_bind(args.host, token)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SecurityError("--max-concurrent must be at least 1")
        ray_token = _ray_token(args)
    except SecurityError as e:
        print(f"lad serve: {e}", file=sys.stderr)
        return 2

    # imported after the checks so a refused start is instant
    import uvicorn

    from services.app import Settings, create_app
    from services.registry import RegistryError
    from schemas.storage import StorageError

    settings = Settings(host=args.host, port=args.port, registry_path=args.registry, runs_root=args.runs_root,
                        data_roots=args.data_root or ["data"], ray_address=args.ray_address, ray_token=ray_token,
                        api_token=token, max_concurrent=args.max_concurrent,
                        run_command=shlex.split(args.run_command) if args.run_command else None,
                        stop_grace_s=args.stop_grace)
    try:
        app = create_app(settings)
    except (RegistryError, OSError, StorageError) as e:
        print(f"lad serve: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _ray_token(args: argparse.Namespace) -> Optional[str]:
    if not args.ray_address:
        return None
    from services.launcher import load_ray_token
    try:
        return load_ray_token(args.ray_token_file)
    except OSError as e:
        raise SecurityError(f"cannot read the Ray auth token: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lad serve", description="Run the LAD control plane (REST API).")
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
