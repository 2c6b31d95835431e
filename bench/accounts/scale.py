"""`python -m bench.accounts`: what accounts in Redis cost, at a million keys.

Four measurements on one machine, against a real `redis-server` (its own, on a free loopback port
with no persistence, unless `--redis-url` names one):

1. **load**: N API keys for M users written into Redis as the records `account_user.lua` and
   `account_key.lua` write (user hash, users zset, key hash by SHA-256, `kid:` string, the user's
   key set; not the changes stream, which is capped), as raw RESP piped to `redis-cli --pipe`
   (about 3 times faster than redis-py pipelines here). Key `i` belongs to user `i mod M`.
   Reports the load time, Redis `used_memory` per user and per key, and `MEMORY USAGE` of each
   kind of record. A few users and keys created through `AccountStore` then check the layout:
   same types and fields, and `Directory` resolves both.
2. **gateway**: `capgate serve` (one worker, `accounts.cache_size` C, an upstream port nothing
   listens on) against an empty database and against the loaded one, started alternately:
   time from spawn to `/healthz` answering (median of S starts each), resident memory (VmRSS)
   after start and after each quarter of L requests with distinct keys (`GET /v1/models`: a key
   lookup and no other Redis call), L being 4 times C by default.
3. **lookup**: `Directory.principal_for_key` in process (uvloop, the app's Redis client): a
   policy-file key, a cached account key, a miss whose user is cached (one Redis round trip), a
   cold miss (key and user: two), an unknown key (one); and SHA-256 alone.
4. **revocation**: two `Directory` instances over their own connections, each syncing every
   `accounts.sync_interval_s` as the app's background loop does (the second half an interval
   after the first, as replicas started apart); a revocation at a random moment, then the time
   from `revoke_key` returning until each refuses the key (polled every millisecond).

Reproduce:

    .venv/bin/python -m bench.accounts                                # 1M keys, 100k users
    .venv/bin/python -m bench.accounts --keys 100000 --users 10000    # a quick run

With `--redis-url` its database and the next one must be empty; both are flushed at the end.
Prints a table and writes `accounts.json` (default into bench/results/).
"""

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import uvloop
import yaml

from bench.common import machine, procstat
from bench.common.client import Connection
from bench.common.locations import REPO, RESULTS
from bench.common.quantiles import quantile
from metering.accounts import ACCOUNT_PREFIX, AccountStore
from policies.index import PolicyIndex
from policies.keys import hash_key, mint_key
from policies.loader import load_policy
from proxy import background
from proxy.app import redis_client
from proxy.directory import Directory
from proxy.settings import AccountSettings, Settings
from tests.harness.processes import ManagedProcess, free_port
from tests.harness.redis_server import RedisServer

HOST = "127.0.0.1"
PREFIX = ACCOUNT_PREFIX.encode()
ADMIN_KEY = "cg-bench-accounts-admin"
FILE_KEY = "cg-bench-accounts-file-user"
TIERS = ("basic", "pro")  # a bulk user has the policy's default (stored as '') or "pro"
CHUNK_USERS = 2000  # users per write to redis-cli


# -- identities: every run derives the same keys, users and key ids from the key's number --------


def key_of(i: int) -> str:
    """API key number `i` (as long as a minted key)."""
    return f"cg-acct-bench-{i:032d}"


def user_of(i: int, users: int) -> str:
    """The user who owns key `i`."""
    return f"bench-user-{i % users:07d}"


def kid_of(i: int) -> str:
    """The key id of key `i` (the admin API's form: `key_` and 16 hex digits)."""
    return f"key_{i:016x}"


def tier_of(user: int) -> str:
    """The tier stored in bulk user number `user`'s record ('' for the policy's default)."""
    return "" if user % 2 == 0 else TIERS[1]


def tier_name(user: int) -> str:
    """The tier bulk user number `user` is served in."""
    return tier_of(user) or TIERS[0]


def unknown_key(i: int) -> str:
    return f"cg-acct-unknown-{i:030d}"


# -- bulk load: RESP through redis-cli --pipe ----------------------------------------------------


def arguments(*args: bytes) -> bytes:
    """Arguments of a Redis command in RESP (bulk strings)."""
    return b"".join([b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args])


def command(*args: bytes) -> bytes:
    """One Redis command in RESP, as `redis-cli --pipe` sends it."""
    return b"*%d\r\n%b" % (len(args), arguments(*args))


def key_record(digest: bytes, kid: bytes, uid: bytes, tail: bytes) -> list[bytes]:
    """`HSET k:<digest> id <kid> user <uid> ...tail` and `SET kid:<kid> <digest>` in RESP, each
    formatted at once (the load's hot path: half the time of `command`); `tail` is the rest of
    the key's fields as `arguments`."""
    return [
        b"*14\r\n$4\r\nHSET\r\n$%d\r\n%bk:%b\r\n$2\r\nid\r\n$%d\r\n%b\r\n$4\r\nuser\r\n$%d\r\n%b\r\n%b"
        % (len(PREFIX) + 2 + len(digest), PREFIX, digest, len(kid), kid, len(uid), uid, tail),
        b"*3\r\n$3\r\nSET\r\n$%d\r\n%bkid:%b\r\n$%d\r\n%b\r\n"
        % (len(PREFIX) + 4 + len(kid), PREFIX, kid, len(digest), digest),
    ]


def user_commands(first: int, last: int, now_ms: int) -> list[bytes]:
    """The records `account_user.lua` writes on `create` for users `first..last-1` (no team)."""
    created = str(now_ms).encode()
    out = []
    members: list[bytes] = []
    for user in range(first, last):
        uid = f"bench-user-{user:07d}".encode()
        tier = tier_of(user).encode()
        out.append(
            command(b"HSET", PREFIX + b"u:" + uid, b"tier", tier, b"team", b"", b"created_ms", created)
        )
        members += (b"0", uid)
    if members:
        out.append(command(b"ZADD", PREFIX + b"users", *members))
    return out


def key_commands(first_user: int, last_user: int, keys: int, users: int, now_ms: int) -> list[bytes]:
    """The records `account_key.lua` writes on `add` for every key of users `first..last-1`."""
    created = str(now_ms).encode()
    tail = arguments(b"name", b"bench", b"created_ms", created, b"expires_ms", b"0", b"last_used_ms", b"0")
    out = []
    for user in range(first_user, last_user):
        uid = user_of(user, users).encode()
        kids = []
        for i in range(user, keys, users):
            kid = kid_of(i).encode()
            out += key_record(hashlib.sha256(key_of(i).encode()).hexdigest().encode(), kid, uid, tail)
            kids.append(kid)
        if kids:
            out.append(command(b"SADD", PREFIX + b"u:" + uid + b":keys", *kids))
    return out


def pipe(url: str, batches: Iterator[list[bytes]]) -> int:
    """Send every batch of commands through `redis-cli --pipe`; the number of commands. Raises
    when Redis answered any with an error or not all were answered."""
    sent = 0
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            ["redis-cli", "-u", url, "--pipe"], stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            assert process.stdin is not None
            for batch in batches:
                process.stdin.write(b"".join(batch))
                sent += len(batch)
            process.stdin.close()
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output.seek(0)
        text = output.read().decode(errors="replace")
    found = re.search(r"errors: (\d+), replies: (\d+)", text)
    if process.returncode != 0 or found is None or int(found[1]) != 0 or int(found[2]) != sent:
        raise RuntimeError(f"redis-cli --pipe: {sent} commands sent, it said:\n{text[-2000:]}")
    return sent


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])  # type: ignore[index]


def load(url: str, keys: int, users: int) -> dict[str, Any]:
    """Write `users` users, then `keys` keys, into the empty database at `url`."""
    client = redis.Redis.from_url(url)
    try:
        now_ms = int(time.time() * 1000)
        empty = used_memory(client)
        started = time.perf_counter()
        spans = [(a, min(a + CHUNK_USERS, users)) for a in range(0, users, CHUNK_USERS)]
        commands = pipe(url, (user_commands(a, b, now_ms) for a, b in spans))
        users_s = time.perf_counter() - started
        with_users = used_memory(client)
        started = time.perf_counter()
        commands += pipe(url, (key_commands(a, b, keys, users, now_ms) for a, b in spans))
        keys_s = time.perf_counter() - started
        loaded = used_memory(client)
        dbsize = int(client.dbsize())  # type: ignore[arg-type]
        sizes = record_sizes(client, users)
    finally:
        client.close()
    return {
        "keys": keys,
        "users": users,
        "method": "RESP piped to redis-cli --pipe",
        "commands": commands,
        "users_s": users_s,
        "keys_s": keys_s,
        "total_s": users_s + keys_s,
        "keys_per_s": keys / keys_s,
        "used_memory_empty": empty,
        "used_memory_users": with_users,
        "used_memory_loaded": loaded,
        "bytes_per_user": (with_users - empty) / users,
        "bytes_per_key": (loaded - with_users) / keys,
        "bytes_per_key_all": (loaded - empty) / keys,
        "dbsize": dbsize,
        "records": sizes,
    }


def record_sizes(client: redis.Redis, users: int) -> dict[str, dict[str, Any]]:
    """`MEMORY USAGE` and encoding of bulk user 0's records and of its first key's (the
    keyspace's own table is not included)."""
    p = ACCOUNT_PREFIX
    digest = client.get(p + "kid:" + kid_of(0)).decode()  # type: ignore[union-attr]
    names = {
        "user_hash": p + "u:" + user_of(0, users),
        "user_keys_set": p + "u:" + user_of(0, users) + ":keys",
        "key_hash": p + "k:" + digest,
        "kid_string": p + "kid:" + kid_of(0),
    }
    return {
        what: {
            "bytes": int(client.memory_usage(name, samples=0)),  # type: ignore[arg-type]
            "encoding": client.object("encoding", name).decode(),  # type: ignore[union-attr]
        }
        for what, name in names.items()
    }


# -- layout check: records written by the scripts and by the bulk load look alike ----------------


def policy_document() -> dict[str, Any]:
    return {
        "default_tier": TIERS[0],
        "admin_keys": [hash_key(ADMIN_KEY)],
        "tiers": {TIERS[0]: {}, TIERS[1]: {"priority": 5}},
        "users": [{"id": "file-user", "tier": TIERS[1], "keys": [hash_key(FILE_KEY)]}],
    }


def policy_index() -> PolicyIndex:
    return PolicyIndex(load_policy(json.dumps(policy_document()), "bench-accounts-policy"))


def settings_for(url: str, cache_size: int = AccountSettings().cache_size) -> Settings:
    return Settings(redis_url=url, policy_file="unused", accounts=AccountSettings(cache_size=cache_size))


def directory_for(url: str, index: PolicyIndex, cache_size: int = AccountSettings().cache_size) -> Directory:
    """A `Directory` over its own Redis client, built as the app builds it."""
    settings = settings_for(url, cache_size)
    return Directory(AccountStore(redis_client(settings)), lambda: index, settings.accounts)


async def close(store: AccountStore) -> None:
    """Close a store's client and its connections."""
    await store.redis.aclose()
    await store.redis.connection_pool.disconnect()


def shape(client: redis.Redis, name: str) -> tuple[str, tuple[str, ...]]:
    """A Redis key's type and, for a hash, its field names."""
    kind = client.type(name).decode()  # type: ignore[union-attr]
    fields = tuple(sorted(f.decode() for f in client.hkeys(name))) if kind == "hash" else ()  # type: ignore[union-attr]
    return kind, fields


async def create_through_store(url: str) -> list[tuple[str, str, str, str]]:
    """Two users (default tier, "pro") with a key each through `AccountStore`: (user, tier, key,
    key id) of each."""
    directory = directory_for(url, policy_index())
    store, now_ms = directory.store, int(time.time() * 1000)
    created = []
    try:
        for n, tier in enumerate((None, TIERS[1])):
            user, key, kid = f"api-user-{n}", mint_key(), "key_" + secrets.token_hex(8)
            await store.create_user(user, tier, None, now_ms)
            await store.add_key(user, hash_key(key)[7:], kid, "api", now_ms, 0)
            created.append((user, tier or TIERS[0], key, kid))
    finally:
        await close(store)
    return created


def compare_layout(url: str, api_user: str, api_kid: str, bulk: int, users: int) -> None:
    """Raise unless the records of the API-created user and key have the bulk ones' types and
    fields, and both link key id, key, user and users set alike."""
    client = redis.Redis.from_url(url)
    p = ACCOUNT_PREFIX
    try:
        pairs = []
        for user, kid in ((api_user, api_kid), (user_of(bulk, users), kid_of(bulk))):
            digest = client.get(p + "kid:" + kid).decode()  # type: ignore[union-attr]
            record = {k.decode(): v.decode() for k, v in client.hgetall(p + "k:" + digest).items()}  # type: ignore[union-attr]
            linked = (
                record.get("id") == kid
                and record.get("user") == user
                and client.sismember(p + "u:" + user + ":keys", kid)
                and client.zscore(p + "users", user) == 0
            )
            names = (p + "u:" + user, p + "u:" + user + ":keys", p + "k:" + digest, p + "kid:" + kid)
            pairs.append((linked, [shape(client, name) for name in names]))
    finally:
        client.close()
    (api_linked, api_shapes), (bulk_linked, bulk_shapes) = pairs
    if not (api_linked and bulk_linked and api_shapes == bulk_shapes):
        raise RuntimeError(f"layout differs: API {api_linked} {api_shapes}, bulk {bulk_linked} {bulk_shapes}")


async def resolve_both(url: str, created: list[tuple[str, str, str, str]], users: int) -> dict[str, Any]:
    """Resolve the API-created keys, two bulk keys (one per tier) and an unknown key through a
    `Directory`; raise on any wrong answer."""
    directory = directory_for(url, policy_index())
    expected = [(key, user, tier) for user, tier, key, _ in created]
    expected += [(key_of(i), user_of(i, users), tier_name(i % users)) for i in (0, 1)]
    try:
        for key, user, tier in expected:
            found = await directory.principal_for_key(key)
            if found is None or (found.user_id, found.tier_name) != (user, tier):
                raise RuntimeError(f"key of {user} resolved to {found}, not {user} in {tier}")
        if await directory.principal_for_key(unknown_key(0)) is not None:
            raise RuntimeError("an unknown key resolved")
    finally:
        await close(directory.store)
    return {"api_keys": len(created), "bulk_keys": 2, "unknown_refused": True, "ok": True}


def verify(url: str, users: int) -> dict[str, Any]:
    created = uvloop.run(create_through_store(url))
    for n, (user, _, _, kid) in enumerate(created):
        compare_layout(url, user, kid, n, users)
    return uvloop.run(resolve_both(url, created, users))


# -- gateway: capgate serve against an empty and a loaded database --------------------------------


def healthz(port: int) -> bool:
    """Whether `GET /healthz` answers 200 now (a raw socket: cheap enough to poll every 10 ms)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of `pid`'s process tree, in MiB."""
    total_kib = 0
    for member in procstat.tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total_kib += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total_kib / 1024


class Gateway:
    """One `capgate serve` process with the bench policy and `cache_size`, on a free port."""

    def __init__(self, workdir: Path, redis_url: str, policy: Path, cache_size: int) -> None:
        self.port = free_port()
        settings = {
            "host": HOST,
            "port": self.port,
            "upstreams": [{"url": f"http://{HOST}:{free_port()}"}],  # nothing listens: /healthz only
            "redis_url": redis_url,
            "policy_file": str(policy),
            "spool_dir": str(workdir / f"spool-{self.port}"),
            "accounts": {"cache_size": cache_size},
        }
        config = workdir / f"capgate-{self.port}.yaml"
        config.write_text(yaml.safe_dump(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
        self.process = ManagedProcess(argv, log_path=workdir / f"capgate-{self.port}.log", env=env, cwd=REPO)

    def start(self) -> float:
        """Spawn the process; seconds until `/healthz` answers."""
        started = time.perf_counter()
        self.process.start()
        self.process.wait_until(lambda: healthz(self.port), 60.0, interval=0.01, what="capgate /healthz")
        return time.perf_counter() - started

    @property
    def rss_mib(self) -> float:
        assert self.process.pid is not None
        return rss_mib(self.process.pid)

    def stop(self) -> None:
        self.process.stop()


async def lookups(port: int, first: int, last: int, concurrency: int) -> Counter[int]:
    """`GET /v1/models` with keys `first..last-1`, each once, over `concurrency` connections."""
    statuses: Counter[int] = Counter()
    numbers = iter(range(first, last))

    async def worker() -> None:
        connection = Connection(HOST, port)
        try:
            for i in numbers:
                head = f"GET /v1/models HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {key_of(i)}\r\n\r\n"
                statuses[(await connection.request(head.encode())).status] += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def serve_lookups(gateway: Gateway, count: int, steps: int, concurrency: int) -> dict[str, Any]:
    """RSS after start and after each of `steps` equal parts of `count` distinct-key requests."""
    time.sleep(0.5)  # let start-up settle
    rss = [gateway.rss_mib]
    statuses: Counter[int] = Counter()
    started = time.perf_counter()
    bounds = [count * n // steps for n in range(steps + 1)]
    for first, last in itertools.pairwise(bounds):
        statuses += uvloop.run(lookups(gateway.port, first, last, concurrency))
        rss.append(gateway.rss_mib)
    elapsed = time.perf_counter() - started
    return {
        "rss_after_mib": dict(zip(bounds, rss, strict=True)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lookups_per_s": count / elapsed,
    }


def gateway_figures(workdir: Path, urls: dict[str, str], policy: Path, args: argparse.Namespace) -> dict:
    """Start-up times over `args.starts` alternating starts, and memory over the last start, of
    a gateway against each database of `urls`."""
    figures: dict[str, dict[str, Any]] = {name: {"startup_s": []} for name in urls}
    for round_ in range(args.starts):
        for name, url in urls.items():
            gateway = Gateway(workdir, url, policy, args.cache_size)
            try:
                figures[name]["startup_s"].append(gateway.start())
                if round_ == args.starts - 1:
                    figures[name].update(serve_lookups(gateway, args.lookups, args.steps, args.concurrency))
            finally:
                gateway.stop()
    for entry in figures.values():
        entry["startup_median_s"] = quantile(entry["startup_s"], 0.5)
    return figures


# -- lookup: Directory.principal_for_key in process ----------------------------------------------


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    values = [s / 1000 for s in samples_ns]
    return {"n": len(values), "median_us": quantile(values, 0.5), "p99_us": quantile(values, 0.99)}


async def timed(calls: list[Callable[[], Awaitable[object]]]) -> list[int]:
    """Nanoseconds each call took, in turn."""
    out = []
    for call in calls:
        started = time.perf_counter_ns()
        await call()
        out.append(time.perf_counter_ns() - started)
    return out


async def lookup_figures(url: str, keys: int, users: int, iterations: int, misses: int) -> dict:
    index = policy_index()
    directories: list[Directory] = []

    def fresh() -> Directory:
        directories.append(directory_for(url, index))
        return directories[-1]

    def resolving(directory: Directory, key: str) -> Callable[[], Awaitable[object]]:
        return lambda: directory.principal_for_key(key)

    try:
        figures: dict[str, Any] = {}
        durations = []
        for key in [key_of(i) for i in range(iterations)]:
            started = time.perf_counter_ns()
            hash_key(key)
            durations.append(time.perf_counter_ns() - started)
        figures["sha256"] = summary_us(durations)

        directory = fresh()
        figures["policy_file_key"] = summary_us(await timed([resolving(directory, FILE_KEY)] * iterations))

        hot = [key_of(i) for i in range(min(1000, keys))]
        for key in hot:
            await directory.principal_for_key(key)
        calls = [resolving(directory, hot[n % len(hot)]) for n in range(iterations)]
        figures["cached_key"] = summary_us(await timed(calls))

        directory, count = fresh(), min(misses, keys)
        for i in range(count):
            await directory.principal_for_user(user_of(i, users))
        figures["miss_user_cached"] = summary_us(
            await timed([resolving(directory, key_of(i)) for i in range(count)])
        )

        directory, count = fresh(), min(misses, keys, users)  # distinct users: none cached
        figures["miss_cold"] = summary_us(
            await timed([resolving(directory, key_of(i)) for i in range(count)])
        )

        directory = fresh()
        figures["unknown_key"] = summary_us(
            await timed([resolving(directory, unknown_key(i)) for i in range(min(misses, keys))])
        )
    finally:
        for directory in directories:
            await close(directory.store)
    return figures


# -- revocation: two instances syncing as the app does ---------------------------------------------


async def refused(directory: Directory, key: str, started: float, timeout_s: float = 10.0) -> float:
    """Seconds from `started` until `directory` refuses `key` (polled every millisecond)."""
    while await directory.principal_for_key(key) is not None:
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"a revoked key still resolves after {timeout_s} s")
        await asyncio.sleep(0.001)
    return time.perf_counter() - started


async def sync_loop(directory: Directory, interval: float, offset: float) -> None:
    """The app's account sync loop, started `offset` seconds late (replicas start at any time)."""
    await asyncio.sleep(offset)
    await background.every("account_sync", interval, directory.sync)


async def revocation_figures(url: str, keys: int, users: int, trials: int) -> dict[str, Any]:
    index = policy_index()
    interval = AccountSettings().sync_interval_s
    directories = [directory_for(url, index) for _ in range(2)]
    admin = AccountStore(redis_client(settings_for(url)))
    loops = [asyncio.create_task(sync_loop(d, interval, n * interval / 2)) for n, d in enumerate(directories)]
    rng = random.Random(0)
    per_instance: list[list[float]] = [[], []]
    try:
        await asyncio.sleep(3 * interval)  # each has read the stream's position
        for i in range(keys - trials, keys):
            for directory in directories:
                if await directory.principal_for_key(key_of(i)) is None:
                    raise RuntimeError(f"key {i} does not resolve before its revocation")
            await asyncio.sleep(rng.uniform(0, interval))  # revoke at any phase of the loops
            await admin.revoke_key(kid_of(i))
            started = time.perf_counter()
            found = await asyncio.gather(*(refused(d, key_of(i), started) for d in directories))
            for n, seconds in enumerate(found):
                per_instance[n].append(seconds * 1000)
    finally:
        for loop in loops:
            await background.stop(loop)
        for directory in directories:
            await close(directory.store)
        await close(admin)
    every = per_instance[0] + per_instance[1]
    return {
        "trials": trials,
        "instances": 2,
        "sync_interval_s": interval,
        "median_ms": quantile(every, 0.5),
        "max_ms": max(every),
        "per_instance_ms": per_instance,
    }


# -- the run ---------------------------------------------------------------------------------------


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


def require_empty(*urls: str) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            if client.dbsize():
                raise SystemExit(f"{url} is not empty: this bench loads and flushes it")
        finally:
            client.close()


def flush(*urls: str) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()


@contextmanager
def redis_urls(given: str | None) -> Iterator[tuple[str, str]]:
    """The database to load and an empty one: of `given` (db and db+1, flushed on leaving), or
    of a `redis-server` started here."""
    if given is not None:
        loaded, empty = given, with_db(given, db_of(given) + 1)
        require_empty(loaded, empty)
        try:
            yield loaded, empty
        finally:
            flush(loaded, empty)
        return
    server = RedisServer()
    try:
        server.start()
        yield with_db(server.url, 0), with_db(server.url, 1)
    finally:
        server.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine.describe(), "options": vars(args).copy()}
    results["options"]["out"] = str(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="capgate-bench-accounts-"))
    try:
        with redis_urls(args.redis_url) as (loaded, empty):
            results["load"] = load(loaded, args.keys, args.users)
            results["verify"] = verify(loaded, args.users)
            policy = workdir / "policy.yaml"
            policy.write_text(yaml.safe_dump(policy_document(), sort_keys=False))
            results["gateway"] = gateway_figures(workdir, {"empty": empty, "loaded": loaded}, policy, args)
            results["lookup"] = uvloop.run(
                lookup_figures(loaded, args.keys, args.users, args.iterations, args.misses)
            )
            results["revocation"] = uvloop.run(revocation_figures(loaded, args.keys, args.users, args.trials))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["load_average_at_end"] = list(os.getloadavg())
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    load_, gateways, lookup, revoke = (results[k] for k in ("load", "gateway", "lookup", "revocation"))
    empty, full = gateways["empty"], gateways["loaded"]
    records = load_["records"]
    mib = 1024 * 1024
    cache = results["options"]["cache_size"]
    rows = [
        ("load (RESP via redis-cli --pipe)",
         f"{load_['total_s']:.1f} s: users {load_['users_s']:.1f} s, keys {load_['keys_s']:.1f} s "
         f"({load_['keys_per_s']:,.0f} keys/s)"),
        ("Redis used_memory",
         f"{load_['used_memory_empty'] / mib:.1f} → {load_['used_memory_loaded'] / mib:.1f} MiB "
         f"({load_['dbsize']:,} Redis keys)"),
        ("Redis bytes per key / per user",
         f"{load_['bytes_per_key']:.0f} B / {load_['bytes_per_user']:.0f} B "
         f"({load_['bytes_per_key_all']:.0f} B per key, users included)"),
        ("Redis MEMORY USAGE: key hash / kid string / user's key set",
         f"{records['key_hash']['bytes']} B ({records['key_hash']['encoding']}) / "
         f"{records['kid_string']['bytes']} B ({records['kid_string']['encoding']}) / "
         f"{records['user_keys_set']['bytes']} B ({records['user_keys_set']['encoding']}, "
         f"{-(-load_['keys'] // load_['users'])} keys)"),
        ("layout check (AccountStore vs bulk, Directory resolves both)",
         "ok" if results["verify"]["ok"] else "FAILED"),
        ("capgate spawn → /healthz, median (empty / loaded)",
         f"{empty['startup_median_s']:.2f} s / {full['startup_median_s']:.2f} s "
         f"(of {len(empty['startup_s'])} each)"),
        ("capgate RSS after start (empty / loaded)",
         f"{empty['rss_after_mib'][0]:.1f} / {full['rss_after_mib'][0]:.1f} MiB"),
    ]  # fmt: skip
    for name, entry in gateways.items():
        counts = " / ".join(f"{k:,}" for k in entry["rss_after_mib"] if k)
        values = " / ".join(f"{v:.1f}" for k, v in entry["rss_after_mib"].items() if k)
        label = f"capgate RSS after {counts} distinct keys, cache {cache:,}: {name}"
        statuses = f"statuses {entry['statuses']}, {entry['lookups_per_s']:,.0f}/s"
        rows.append((label, f"{values} MiB ({statuses})"))
    names = {
        "sha256": "sha256 alone",
        "policy_file_key": "lookup: policy-file key",
        "cached_key": "lookup: cached account key",
        "miss_user_cached": "lookup: miss, user cached (1 round trip)",
        "miss_cold": "lookup: cold miss (key + user: 2 round trips)",
        "unknown_key": "lookup: unknown key (1 round trip)",
    }
    for key, label in names.items():
        entry = lookup[key]
        rows.append(
            (
                f"{label}, median / p99",
                f"{entry['median_us']:.2f} / {entry['p99_us']:.2f} µs (n={entry['n']:,})",
            )
        )
    rows.append(
        (f"revocation seen by 2 instances, sync every {revoke['sync_interval_s']} s",
         f"median {revoke['median_ms']:.0f} ms, max {revoke['max_ms']:.0f} ms ({revoke['trials']} trials)")
    )  # fmt: skip
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.accounts", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="API keys to load (default %(default)s)")
    p.add_argument("--users", type=int, default=100_000, help="users owning them (default %(default)s)")
    p.add_argument("--redis-url", help="an existing Redis (its db and the next must be empty)")
    p.add_argument("--cache-size", type=int, default=10_000, help="the gateways' accounts.cache_size")
    p.add_argument("--lookups", type=int, default=40_000, help="distinct keys sent to each gateway")
    p.add_argument("--steps", type=int, default=4, help="RSS readings over the lookups")
    p.add_argument("--concurrency", type=int, default=8, help="connections sending them")
    p.add_argument("--starts", type=int, default=3, help="starts of each gateway for the start-up time")
    p.add_argument("--iterations", type=int, default=100_000, help="in-memory lookups per figure")
    p.add_argument("--misses", type=int, default=20_000, help="Redis lookups per figure")
    p.add_argument("--trials", type=int, default=20, help="revocations")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.users <= 0 or args.lookups + args.trials > args.keys:
        raise SystemExit("need users > 0 and keys >= lookups + trials")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "accounts.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {path}")
    return 0
