"""`python -m bench.gateway`: what capgate costs, side by side with a direct connection, an nginx
hop and the LiteLLM proxy. Writes results.json, results.md and latency.png (default into bench/results/)."""

import argparse
import sys
from pathlib import Path

from bench.common.locations import RESULTS
from bench.common.workloads import WORKLOADS
from bench.gateway.suite import Options, run


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _workers(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"at least 1 worker, not {count}")
    return count


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: bench/results)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny configuration: concurrency 1 and 4, short batches"
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of %(default)s")
    p.add_argument("--levels", type=_ints, help="concurrency levels (default 1,16,64,256)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per cell on the fast upstream (default 2)")
    p.add_argument("--duration", type=float, help="seconds per batch (default 3)")
    p.add_argument("--requests", type=int, help="requests per batch instead of a duration")
    p.add_argument("--token-interval-ms", type=float, default=1.0, help="fake upstream's token spacing")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy path")
    p.add_argument("--no-vllm", action="store_true", help="skip the real vLLM upstream")
    p.add_argument("--vllm-url", help="use the vLLM server at this URL instead of starting one")
    p.add_argument(
        "--vllm-workloads", default="one_token,stream_256", help="workloads on real vLLM (%(default)s)"
    )
    p.add_argument("--vllm-levels", type=_ints, default=[1, 16], help="concurrency levels on real vLLM")
    p.add_argument("--vllm-duration", type=float, default=4.0, help="seconds per batch on real vLLM")
    p.add_argument("--no-plot", action="store_true", help="write the JSON and the table only")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of capgate")
    p.add_argument("--gateway-core", default="1", help="core for the gateways (taskset list)")
    p.add_argument("--load-core", default="0", help="core for the load generator and fake upstream")
    p.add_argument(
        "--capgate-workers", type=_workers, default=1, help="capgate's uvicorn workers (%(default)s)"
    )
    p.add_argument("--note", action="append", default=[], help="a note to print in the report")
    return p


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    duration = args.duration if args.duration is not None else (1.0 if quick else 3.0)
    return Options(
        out=args.out,
        workloads=[name for name in args.workloads.split(",") if name],
        levels=args.levels or ([1, 4] if quick else [1, 16, 64, 256]),
        rounds=args.rounds or (1 if quick else 2),
        duration_s=None if args.requests is not None else duration,
        requests=args.requests,
        token_interval_ms=args.token_interval_ms,
        litellm=not args.no_litellm,
        vllm=not (args.no_vllm or quick) or args.vllm_url is not None,
        vllm_url=args.vllm_url,
        vllm_workloads=[name for name in args.vllm_workloads.split(",") if name],
        vllm_levels=args.vllm_levels,
        vllm_duration_s=args.vllm_duration,
        plot=not args.no_plot,
        profile=not (args.no_profile or quick),
        gateway_core=args.gateway_core,
        load_core=args.load_core,
        capgate_workers=args.capgate_workers,
        notes=args.note,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = f"{args.workloads},{args.vllm_workloads}".split(",")
    unknown = [name for name in names if name and name not in WORKLOADS]
    if unknown:
        parser().error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    run(options_from(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
