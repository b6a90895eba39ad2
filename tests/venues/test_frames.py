"""``BufferedWebSocket`` cuts whole data frames out of its read buffer itself and leaves
everything else to websocket-client. Over a real socket, in any split into reads, it
must hand over the same messages as websocket-client alone: fragments, pings between
fragments, 7-, 16- and 64-bit lengths, empty frames and the close."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
import websocket

from tasks.venues.connection import BufferedWebSocket

TEXT, BINARY, CONT, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def stream(rng: random.Random) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Frames a venue could send, and the messages a reader must get from them."""
    out, want = [], []
    for _ in range(rng.randint(5, 40)):
        size = rng.choice([0, 1, 2, 3, 60, 125, 126, 127, 4000, 65535, 65536, 70000])
        body = rng.randbytes(size) if rng.random() < 0.3 else ("é" * size).encode()[:size]
        kind = rng.random()
        if kind < 0.6:
            op = rng.choice([TEXT, BINARY])
            out.append(frame(op, body))
            want.append((op, body))
        elif kind < 0.8:  # a fragmented message, a ping in the middle
            cut = rng.randint(0, size)
            out += [frame(TEXT, body[:cut], fin=False), frame(PING, b"hi"),
                    frame(CONT, body[cut:])]  # fmt: skip
            want.append((TEXT, body))
        else:
            out.append(frame(PING, rng.randbytes(rng.randint(0, 125))))
    out.append(frame(CLOSE, struct.pack("!H", 1000)))
    return b"".join(out), want


def read_all(ws: websocket.WebSocket, data: bytes, rng: random.Random) -> list[tuple[int, bytes]]:
    a, b = socket.socketpair()
    b.settimeout(10)  # liveness bound: a reader out of step with the stream fails, not hangs
    ws.sock, ws.connected = b, True

    def write() -> None:  # in pieces of any size, sometimes pausing so reads come up short
        at = 0
        while at < len(data):
            step = rng.choice([1, 2, 3, 7, 100, 5000, 70000])
            a.sendall(data[at : at + step])
            at += step
            if rng.random() < 0.05:
                time.sleep(0.001)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = []
    try:
        while True:
            opcode, payload = ws.recv_data()
            if opcode == CLOSE:
                break
            got.append((opcode, bytes(payload)))
    finally:
        writer.join(30)
        a.close()
        b.close()
    return got


@pytest.mark.parametrize("seed", range(40))
def test_the_buffered_reader_gets_what_websocket_client_gets(seed: int) -> None:
    data, want = stream(random.Random(seed))
    plain = read_all(websocket.WebSocket(skip_utf8_validation=True), data, random.Random(seed))
    fast = read_all(BufferedWebSocket(skip_utf8_validation=True), data, random.Random(~seed))
    assert plain == want
    assert fast == want
