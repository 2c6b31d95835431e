"""The `capgate` command: serve, check-config, keys new, usage, export, optimize."""

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from policies.keys import hash_key, mint_key
from policies.loader import ConfigError
from proxy.policy_store import read_policy
from proxy.settings import load_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.config:
        os.environ["CAPGATE_CONFIG"] = args.config
    try:
        settings = load_settings()
        read_policy(Path(settings.policy_file))
    except ConfigError as exc:
        detail = str(exc) or f"{exc.source}: cannot read: {exc.__cause__}"
        print(f"capgate: refusing to start:\n{detail}", file=sys.stderr)
        return 2
    workers = args.workers or settings.workers
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="capgate-metrics-")
    uvicorn.run(
        "proxy.app:app_from_environment",
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        index = read_policy(Path(args.file))
    except ConfigError as exc:
        if exc.problems:
            print(exc, file=sys.stderr)
        else:
            print(f"{args.file}: cannot read: {exc.__cause__}", file=sys.stderr)
        return 1
    policy = index.policy
    print(f"{args.file}: ok ({len(policy.tiers)} tiers, {len(policy.users)} users)")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    key = mint_key()
    print(f"API key for {args.user} (shown once, store it now): {key}")
    print("Add this line under the user's `keys:` in the policy file:")
    print(f'      - "{hash_key(key)}"')
    return 0


def _redis(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from proxy.app import redis_client

    if args.config:
        os.environ["CAPGATE_CONFIG"] = args.config
    settings = load_settings()
    return settings, redis_client(settings)


def _usage(args: argparse.Namespace) -> int:
    from metering.usage import user_usage

    settings, redis = _redis(args)
    index = read_policy(Path(settings.policy_file))
    principal = index.principal_for_user(args.user)
    if principal is None:
        print(f"capgate: no user {args.user!r} in {settings.policy_file}", file=sys.stderr)
        return 1

    async def run() -> dict:
        try:
            return await user_usage(
                redis, args.user, principal.tier_name, principal.tier, index.policy.currency
            )
        finally:
            await redis.aclose()

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from metering.usage import export_text, ledger_events

    _, redis = _redis(args)

    async def run() -> str:
        try:
            return export_text(await ledger_events(redis, args.since_ms, args.until_ms), args.format)
        finally:
            await redis.aclose()

    text = asyncio.run(run())
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _optimize(args: argparse.Namespace) -> int:
    import yaml

    from policies.menu_report import format_menu_report, menu_to_policy_tiers
    from policies.optimizer import solve_menu
    from policies.types_file import parse_types_file

    try:
        types = parse_types_file(Path(args.types).read_text(), args.types)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"capgate: cannot read {args.types}: {exc}", file=sys.stderr)
        return 1
    result = solve_menu(types.to_problem())
    print(format_menu_report(result))
    tiers = menu_to_policy_tiers(
        result, period=types.period, currency=types.currency, base_priority=args.priority
    )
    section = (
        f"# Tiers from `capgate optimize {args.types}`: paste under the policy file's top level,\n"
        "# then give users these tiers and keys (`capgate keys new USER`).\n"
        + yaml.safe_dump(tiers, sort_keys=False)
    )
    if args.out:
        Path(args.out).write_text(section)
        print(f"\ntier section written to {args.out}")
    else:
        print("\n" + section, end="")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="capgate", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="settings YAML (default: $CAPGATE_CONFIG, then defaults)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="mint a key for a user")
    new.add_argument("user")
    new.set_defaults(run=_keys_new)

    usage = commands.add_parser("usage", help="a user's budget left, usage and value")
    usage.add_argument("user")
    usage.add_argument("--config")
    usage.set_defaults(run=_usage)

    export = commands.add_parser("export", help="export the usage ledger for billing")
    export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    export.add_argument("--since-ms", type=int, default=0)
    export.add_argument("--until-ms", type=int)
    export.add_argument("--output")
    export.add_argument("--config")
    export.set_defaults(run=_export)

    optimize = commands.add_parser("optimize", help="compute the revenue-optimal cap menu of a TYPES file")
    optimize.add_argument("types", help="user types YAML (see deploy/policies/types.example.yaml)")
    optimize.add_argument("--out", help="write the policy tier section here (default: print it)")
    optimize.add_argument("--priority", type=int, default=10, help="vLLM priority of the plan tiers")
    optimize.set_defaults(run=_optimize)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
