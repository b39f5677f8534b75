"""HTTP/1.1 over a plain socket, for bytes that aiohttp, httpx and urllib refuse to send.

`exchange` writes one request (`Connection: close`) and reads the answer to EOF, so it works
whatever framing the server picks. `RawUpstream` is a fake LLM provider that answers every
request with the same raw bytes (response headers no HTTP library would produce).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        want = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == want:
                return v.decode("latin-1")
        return None


def request_bytes(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [k + b": " + v for k, v in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(port: int, data: bytes, timeout: float = 60.0) -> Answer | None:
    """Send `data`, read to EOF; None when the server closed without an HTTP answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (400) and close before it read everything
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip(), v.strip()))
    return Answer(status, headers, body)


class RawUpstream:
    """A fake provider answering every request with `response` (raw bytes), in a thread."""

    def __init__(self, response: bytes, *, close: bool = False) -> None:
        self.response = response
        self.close_after = close  # end the connection after each answer (a close-delimited body)
        self.heads: list[bytes] = []  # each request's head, as it arrived
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            buf = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        c = conn.recv(65536)
                        if not c:
                            return
                        buf += c
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.heads.append(head)
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v.strip())
                    while len(buf) < length:
                        c = conn.recv(65536)
                        if not c:
                            return
                        buf += c
                    buf = buf[length:]
                    conn.sendall(self.response)
                    if self.close_after:
                        return
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self.sock.close()
