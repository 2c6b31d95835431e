"""The `capgate` command: serve, check-config, users, keys, teams, usage, export, optimize."""

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from policies.keys import hash_key, mint_key
from policies.loader import ConfigError
from proxy.policy_store import read_policy
from proxy.settings import load_settings

M = TypeVar("M", bound=BaseModel)


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
    print(
        f"{args.file}: ok ({len(policy.tiers)} tiers, {len(policy.teams)} teams, {len(policy.users)} users)"
    )
    return 0


def _policy_key(user: str) -> int:
    key = mint_key()
    print(f"API key for {user} (shown once, store it now): {key}")
    print("Add this line under the user's `keys:` in the policy file:")
    print(f'      - "{hash_key(key)}"')
    return 0


def _redis(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from proxy.app import redis_client

    if args.config:
        os.environ["CAPGATE_CONFIG"] = args.config
    settings = load_settings()
    return settings, redis_client(settings)


def _accounts(args: argparse.Namespace, operation: Callable[[Any], Awaitable[dict]]) -> int:
    """Run one account operation against Redis (the server's settings) and print its answer."""
    from metering.accounts import AccountStore
    from metering.meter import Meter
    from proxy.admin.serving import AccountService, answered

    settings, redis = _redis(args)
    index = read_policy(Path(settings.policy_file))
    service = AccountService(AccountStore(redis), Meter(redis), lambda: index)

    async def run() -> dict:
        try:
            return await answered(operation(service))
        finally:
            await redis.aclose()

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


def _body(model: type[M], **fields: object) -> M:
    from proxy.admin.protocol import parse_body

    data = {name: value for name, value in fields.items() if value is not None}
    return parse_body(model, json.dumps(data).encode())


def _users(args: argparse.Namespace) -> int:
    from proxy.admin.protocol import CreateUser, UpdateUser

    command = args.users_command
    if command == "add":
        body = _body(CreateUser, id=args.user, tier=args.tier, team=args.team)
        return _accounts(args, lambda s: s.create_user(body))
    if command == "set":
        fields = {"tier": args.tier, "team": None if args.no_team else args.team}
        present = {k: v for k, v in fields.items() if v is not None or (k == "team" and args.no_team)}
        update = UpdateUser.model_validate(present)
        return _accounts(args, lambda s: s.update_user(args.user, update))
    if command == "list":
        return _accounts(args, lambda s: s.list_users(args.after, args.limit))
    if command == "show":
        return _accounts(args, lambda s: s.get_user(args.user))
    return _accounts(args, lambda s: s.delete_user(args.user))


def _keys(args: argparse.Namespace) -> int:
    from proxy.admin.protocol import CreateKey

    command = args.keys_command
    if command == "new":
        if args.policy_file:
            return _policy_key(args.user)
        body = _body(CreateKey, name=args.name, expires_at=args.expires_at)
        return _accounts(args, lambda s: s.create_key(args.user, body))
    if command == "list":
        return _accounts(args, lambda s: s.list_keys(args.user))
    return _accounts(args, lambda s: s.revoke_key(args.key_id))


def _teams(args: argparse.Namespace) -> int:
    from proxy.admin.protocol import CreateTeam
    from proxy.errors import APIError

    command = args.teams_command
    if command == "add":
        try:
            windows = None if args.windows is None else json.loads(args.windows)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"--windows is not JSON: {exc}") from exc
        body = _body(CreateTeam, id=args.team, tier=args.tier, windows=windows)
        return _accounts(args, lambda s: s.create_team(body))
    if command == "list":
        return _accounts(args, lambda s: s.list_teams(args.after, args.limit))
    if command == "show":
        return _accounts(args, lambda s: s.get_team(args.team))
    return _accounts(args, lambda s: s.delete_team(args.team))


def _usage(args: argparse.Namespace) -> int:
    from metering.usage import user_usage
    from proxy.directory import Directory
    from proxy.errors import APIError
    from proxy.settings import AccountSettings

    async def report(service: Any) -> dict:
        principal = await Directory(service.store, service.index, AccountSettings()).principal_for_user(
            args.user
        )
        if principal is None:
            raise APIError(404, f"no user {args.user!r}")
        return await user_usage(service.store.redis, principal, service.index().policy.currency)

    return _accounts(args, report)


def _export(args: argparse.Namespace) -> int:
    from metering.usage import export_lines

    _, redis = _redis(args)

    async def run(out: Any) -> None:
        try:
            async for line in export_lines(redis, args.format, args.since_ms, args.until_ms):
                out.write(line)
        finally:
            await redis.aclose()

    if args.output:
        with open(args.output, "w", newline="") as out:
            asyncio.run(run(out))
    else:
        asyncio.run(run(sys.stdout))
    return 0


def _exporter(args: argparse.Namespace) -> int:
    from proxy.exporter import run_exporter

    if args.config:
        os.environ["CAPGATE_CONFIG"] = args.config
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"capgate: refusing to start:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(run_exporter(settings))
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


def _with_config(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_argument("--config", help="settings YAML (default: $CAPGATE_CONFIG, then defaults)")
    return command


def _paged(command: argparse.ArgumentParser) -> None:
    command.add_argument("--after", help="list from after this id")
    command.add_argument("--limit", type=int, default=100)


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

    users = commands.add_parser("users", help="user accounts (in Redis)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    add = _with_config(user_commands.add_parser("add", help="create a user"))
    add.add_argument("user")
    add.add_argument("--tier", help="default: the policy's default_tier")
    add.add_argument("--team")
    change = _with_config(user_commands.add_parser("set", help="change a user's tier or team"))
    change.add_argument("user")
    change.add_argument("--tier")
    team_choice = change.add_mutually_exclusive_group()
    team_choice.add_argument("--team")
    team_choice.add_argument("--no-team", action="store_true", help="take the user out of their team")
    for name, what in (("show", "show a user"), ("rm", "delete a user and their keys")):
        one = _with_config(user_commands.add_parser(name, help=what))
        one.add_argument("user")
    _paged(_with_config(user_commands.add_parser("list", help="list users")))
    users.set_defaults(run=_users)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = _with_config(key_commands.add_parser("new", help="mint a key for a user (shown once)"))
    new.add_argument("user")
    new.add_argument("--name", help="a label for the key")
    new.add_argument("--expires-at", help="Unix seconds or ISO 8601 with a time zone")
    new.add_argument(
        "--policy-file",
        action="store_true",
        help="for a user of the policy file: print the key and the hash line to paste there",
    )
    listed = _with_config(key_commands.add_parser("list", help="a user's keys (never the keys)"))
    listed.add_argument("user")
    revoke = _with_config(key_commands.add_parser("revoke", help="revoke a key by its id"))
    revoke.add_argument("key_id")
    keys.set_defaults(run=_keys)

    teams = commands.add_parser("teams", help="team accounts (in Redis)")
    team_commands = teams.add_subparsers(dest="teams_command", required=True)
    add_team = _with_config(team_commands.add_parser("add", help="create a team"))
    add_team.add_argument("team")
    add_team.add_argument("--tier", help="take the windows of this tier's caps")
    add_team.add_argument(
        "--windows", help='its own windows, as JSON: \'[{"per": "day", "tokens": 100000}]\''
    )
    for name, what in (("show", "show a team"), ("rm", "delete a team (it must have no members)")):
        one = _with_config(team_commands.add_parser(name, help=what))
        one.add_argument("team")
    _paged(_with_config(team_commands.add_parser("list", help="list teams")))
    teams.set_defaults(run=_teams)

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

    exporter = commands.add_parser(
        "exporter", help="move the ledger from Redis into the configured sink (a service; see `exporter`)"
    )
    exporter.add_argument("--config", help="settings YAML (default: $CAPGATE_CONFIG, then defaults)")
    exporter.set_defaults(run=_exporter)

    optimize = commands.add_parser("optimize", help="compute the revenue-optimal cap menu of a TYPES file")
    optimize.add_argument("types", help="user types YAML (see deploy/policies/types.example.yaml)")
    optimize.add_argument("--out", help="write the policy tier section here (default: print it)")
    optimize.add_argument("--priority", type=int, default=10, help="vLLM priority of the plan tiers")
    optimize.set_defaults(run=_optimize)
    return root


def main(argv: list[str] | None = None) -> int:
    from proxy.errors import APIError

    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except APIError as error:
        print(f"capgate: {error.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
