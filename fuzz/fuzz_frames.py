#!/usr/bin/env python3
"""
An atheris target for the dwtrust frame codec (L{dwtrust._wire}).

Each input is split, at points the input chooses, into pieces fed one after
another to a L{FrameDecoder}, with every whole frame taken as soon as it is
there.  A finding is anything other than frames or a L{WireError}, and any
of these broken:

- split-invariance: the pieces give the same frames, and the same error
  code, as the whole input fed at once;
- canonical encoding: every frame but C{ERROR} (whose text is made safe
  on parsing) encodes back to exactly the bytes it was decoded from;
- bounded buffer: once the decoder has given all the frames it can, it holds
  less than one largest frame;
- an C{ERROR} frame's text is printable, and its code always maps to an
  L{ErrorCode}.

Each frame type's C{parse} is also fed the rest of the input as a body.

Run with C{fuzz/run}; or C{python fuzz/fuzz_frames.py -atheris_runs=N} or
C{python fuzz/fuzz_frames.py CRASH-FILE} to replay one input.
"""

from __future__ import annotations

import contextlib
import itertools
import sys

import atheris

with atheris.instrument_imports(include=["dwtrust"]):
    from dwtrust._wire import (
        HEADER,
        MAX_BODY,
        Accept,
        Challenge,
        Error,
        ErrorCode,
        Frame,
        FrameDecoder,
        Hello,
        ProofFrame,
        WireError,
        encodeFrame,
    )

PARSERS = (Hello, Challenge, ProofFrame, Accept, Error)


class Finding(AssertionError):
    """
    An invariant of the codec does not hold.
    """


def decode(pieces: list[bytes]) -> tuple[list[Frame], ErrorCode | None, bytes]:
    """
    Feed C{pieces} one at a time, taking every whole frame after each; return
    the frames, the code of the first error (or L{None}) and what is left.
    """
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for piece in pieces:
        decoder.feed(piece)
        while True:
            try:
                frame = decoder.next()
            except WireError as e:
                if not isinstance(e.code, ErrorCode):
                    raise Finding(f"a WireError with code {e.code!r}") from e
                return frames, e.code, b""
            if frame is None:
                break
            frames.append(frame)
        # Everything whole has been taken: less than one largest frame is held.
        rest = decoder.remainder()
        if len(rest) >= HEADER.size + MAX_BODY:
            raise Finding(f"the decoder holds {len(rest)} bytes after draining")
        decoder.feed(rest)
    return frames, None, decoder.remainder()


def checkCanonical(data: bytes, frames: list[Frame]) -> None:
    offset = 0
    for frame in frames:
        length = HEADER.unpack_from(data, offset)[2]
        raw = data[offset : offset + HEADER.size + length]
        offset += len(raw)
        if isinstance(frame, Error):
            if not (frame.code.isprintable() and frame.message.isprintable()):
                raise Finding(f"unprintable ERROR text {frame!r}")
            frame.errorCode  # noqa: B018 - must not raise
            frame.explanation  # noqa: B018
            continue
        if encodeFrame(frame) != raw:
            raise Finding(f"{frame!r} does not re-encode to {raw!r}")


def testOneInput(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    cuts = [
        provider.ConsumeIntInRange(0, 1 << 16)
        for _ in range(provider.ConsumeIntInRange(0, 8))
    ]
    body = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 256))
    stream = provider.ConsumeBytes(provider.remaining_bytes())

    whole = decode([stream])
    points = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(points)]
    split = decode(pieces)
    if whole[:2] != split[:2]:
        raise Finding(f"split {points} gives {split[:2]!r}, whole gives {whole[:2]!r}")
    checkCanonical(stream, whole[0])

    for parser in PARSERS:
        with contextlib.suppress(WireError):
            parser.parse(body)


def main() -> None:
    atheris.Setup(sys.argv, testOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
