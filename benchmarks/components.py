"""
What one connection costs, piece by piece, in one process and without a
profiler: the CPU time of each step a dwtrust server or client takes beyond
plain TLS, next to the TLS handshake itself.  This is not a client/server
benchmark; it is the breakdown that explains the connection-rate figures.

    python -m benchmarks.components [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from . import _common


def _handshake(serverContext: SSL.Context, clientContext: SSL.Context) -> Any:
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    for _ in range(10):
        for this, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                this.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(this.bio_read(65536))
    return server, client


def timed(function: Callable[[], object], seconds: float) -> float:
    """
    Microseconds of CPU per call, the median of 5 batches.
    """
    function()
    count = 1
    while True:
        started = time.process_time()
        for _ in range(count):
            function()
        elapsed = time.process_time() - started
        if elapsed > seconds / 5:
            break
        count *= 2
    batches = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(count):
            function()
        batches.append((time.process_time() - started) / count * 1e6)
    return _common.median(batches)


def measure(algorithm: str, seconds: float, work: Path) -> dict[str, float]:
    from dwtrust import Identity, PeerIdentity
    from dwtrust._decision import SignedDecision, Signers
    from dwtrust._machine import buildServer
    from dwtrust._proof import makeProof, verifyProof
    from dwtrust._tls import channelOf, clearKeyCache, makeContext
    from dwtrust._wire import Challenge, FrameDecoder, Role, encodeFrame

    paths = _common.setUp(work, "ecdsa-p256")
    serverIdentity = Identity.generate("bench", "server", algorithm)
    clientIdentity = Identity.generate("bench", "client", algorithm)
    serverContext = makeContext(serverIdentity)
    clientContext = makeContext(clientIdentity)
    plainServer = _common.tlsOptions(
        Path(paths["serverPEM"]).read_bytes(), Path(paths["clientPEM"]).read_bytes()
    ).getContext()
    plainClient = _common.tlsOptions(
        Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
    ).getContext()
    server, _ = _handshake(serverContext, clientContext)
    channel = channelOf(server)
    challenge = os.urandom(32)
    proof = makeProof(clientIdentity, Role.client, challenge, channel.exporter)
    peer = PeerIdentity(clientIdentity.org, clientIdentity.service, channel.peerKey)
    decision = SignedDecision.make(
        serverIdentity, serverIdentity.name, peer, "approved", time.time(), "bench"
    )
    encoded = decision.encode()
    signers = Signers([serverIdentity.publicKey])
    frame = Challenge(
        challenge, makeProof(serverIdentity, Role.server, challenge, channel.exporter)
    )
    wire = encodeFrame(frame)

    def encodeDecode() -> None:
        encodeFrame(frame)
        decoder = FrameDecoder()
        decoder.feed(wire)
        decoder.next()

    def channelUncached() -> None:
        clearKeyCache()
        channelOf(server)

    class Effects:
        def sendFrame(self, frame: object) -> None:
            pass

        def requestDecision(self, peer: object) -> None:
            pass

        def cancelDecision(self) -> None:
            pass

        def connectApplication(self, peer: object) -> None:
            pass

        def established(self) -> None:
            pass

        def fail(self, *arguments: object) -> None:
            pass

    newServer = buildServer()
    from dwtrust._machine import Core

    def machine() -> None:
        # The machine's own cost: a connection's inputs with I/O and crypto
        # stubbed out (the tlsReady, hello and lost inputs only).
        handshake = newServer(Core(serverIdentity, Effects(), os.urandom))
        handshake.tlsReady(channel)
        handshake.lost()

    results = {
        "tls handshake, plain P-256 contexts (both sides)": timed(
            lambda: _handshake(plainServer, plainClient), seconds
        ),
        "tls handshake, dwtrust contexts (both sides)": timed(
            lambda: _handshake(serverContext, clientContext), seconds
        ),
        "channelOf (certificate key cached)": timed(lambda: channelOf(server), seconds),
        "channelOf (certificate key parsed)": timed(channelUncached, seconds),
        "makeProof (one signature)": timed(
            lambda: makeProof(clientIdentity, Role.client, challenge, channel.exporter),
            seconds,
        ),
        "verifyProof (one verification)": timed(
            lambda: verifyProof(proof, Role.client, challenge, channel), seconds
        ),
        "signed decision: decode and verify (policy, per lookup)": timed(
            lambda: signers.verify(SignedDecision.decode(encoded), serverIdentity.name),
            seconds,
        ),
        "frame: encode + decode a CHALLENGE": timed(encodeDecode, seconds),
        "Automat: a machine and 2 inputs": timed(machine, seconds),
    }
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.components")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    seconds = 0.5 if options.quick else 2.0
    results = {
        algorithm: measure(algorithm, seconds, work)
        for algorithm in ("ecdsa-p256", "ed25519")
    }
    for algorithm, values in results.items():
        for name, value in values.items():
            print(f"  {algorithm:10} {name:60} {value:8.1f} us", file=sys.stderr)
    _common.emit({"benchmark": "components", "results": results})


if __name__ == "__main__":
    main(sys.argv[1:])
