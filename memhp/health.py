"""``memhp health``: a gRPC health probe for scripts and container health checks.

    memhp health ADDR [--service NAME] [--timeout S] [--wait S]

Asks ``grpc.health.v1.Health/Check`` at ``ADDR`` (``memhp hypervisor`` and ``memhp
guest`` both serve it), prints the status (``SERVING``, ``NOT_SERVING``,
``SERVICE_UNKNOWN``, or ``UNREACHABLE`` with the gRPC code) and exits 0 when it is
``SERVING``, 1 otherwise, 2 for bad arguments. ``--wait S`` asks again until the
answer is ``SERVING`` or S seconds have passed. The probe never goes through an HTTP
proxy: it asks the address it is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_BAD_INPUT = 2
#: Seconds between two probes under ``--wait``.
RETRY_INTERVAL = 0.2
#: A probe dials the address itself, whatever ``http_proxy`` says.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


@dataclass(frozen=True)
class Probe:
    """One answer: the status name and, when the call failed, why."""

    status: str
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def probe(address: str, service: str = "", timeout: float = 3.0) -> Probe:
    """One ``Health/Check`` of ``service`` ("" is the server as a whole)."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return Probe("SERVICE_UNKNOWN", f"{service!r} is not registered")
            name = code.name if code is not None else "UNKNOWN"
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            return Probe("UNREACHABLE", f"{name}: {details}")
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Probe(status)


def wait_serving(
    address: str, service: str = "", *, timeout: float = 3.0, wait: float = 0.0
) -> Probe:
    """Probe until SERVING or ``wait`` seconds have passed; the last answer."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        answer = probe(address, service, timeout=max(0.1, min(timeout, left)) if wait else timeout)
        if answer.serving or time.monotonic() + RETRY_INTERVAL > deadline:
            return answer
        time.sleep(RETRY_INTERVAL)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text}")
    return value


def add_subparser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "health",
        help="ask a server's gRPC health (exit 0 when SERVING)",
        description="Ask grpc.health.v1.Health/Check at ADDR; print the status and exit 0 "
        "when it is SERVING, 1 otherwise, 2 for bad arguments. For container health "
        "checks and scripts.",
    )
    p.add_argument("address", metavar="ADDR", help="HOST:PORT of the server")
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help='the service to ask about, e.g. memhp.v1.Control (default "": the server)',
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=3.0,
        metavar="S",
        help="deadline of one check (default %(default)s)",
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="ask again until SERVING, for at most S seconds (default: ask once)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        sys.stderr.write("memhp health: --timeout must be > 0\n")
        return EXIT_BAD_INPUT
    answer = wait_serving(args.address, args.service, timeout=args.timeout, wait=args.wait)
    sys.stdout.write(f"{answer}\n")
    return EXIT_SERVING if answer.serving else EXIT_NOT_SERVING
