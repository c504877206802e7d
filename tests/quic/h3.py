"""HTTP/3 peers for sniplex's QUIC tests and benches, built on aioquic (an independent QUIC stack).

    h3.py server --cert C --key K --name NAME [--port P]
        Serves HTTP/3 on 127.0.0.1:P (0: any); prints "READY <port>" once listening.
        GET /anything answers "<NAME> /anything"; GET /bytes/N answers N bytes.
    h3.py client --connect HOST:PORT --name SNI --ca CA [--path /x] [--requests N]
                 [--v2] [--quantum] [--rebind]
        Prints one JSON line: {"ok": true, "bodies": [...], "seconds": s} or
        {"ok": false, "error_code": n, "reason": "...", "seconds": s}.
"""
import argparse
import asyncio
import json
import socket
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated
from aioquic.quic.packet import QuicProtocolVersion


class ServerProtocol(QuicConnectionProtocol):
    name = "server"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                path = dict(ev.headers).get(b":path", b"/").decode()
                if path.startswith("/bytes/"):
                    body = b"x" * int(path[len("/bytes/"):])
                else:
                    body = f"{self.name} {path}".encode()
                self.h3.send_headers(ev.stream_id, [
                    (b":status", b"200"),
                    (b"content-length", str(len(body)).encode()),
                ])
                self.h3.send_data(ev.stream_id, body, end_stream=True)
                self.transmit()


async def run_server(args):
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN,
                            max_datagram_frame_size=65536)
    cfg.supported_versions = [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2]
    cfg.load_cert_chain(args.cert, args.key)
    ServerProtocol.name = args.name
    server = await serve("127.0.0.1", args.port, configuration=cfg,
                         create_protocol=ServerProtocol)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"READY {port}", flush=True)
    await asyncio.Future()


class ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiters = {}
        self.bodies = {}
        self.closed = None

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.closed = event
        for ev in self.h3.handle_event(event):
            if isinstance(ev, DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if ev.stream_ended:
                    self.waiters.pop(ev.stream_id).set_result(bytes(self.bodies.pop(ev.stream_id)))
            elif isinstance(ev, HeadersReceived) and ev.stream_ended:
                self.waiters.pop(ev.stream_id).set_result(b"")

    async def get(self, authority, path):
        sid = self._quic.get_next_available_stream_id()
        self.h3.send_headers(sid, [
            (b":method", b"GET"), (b":scheme", b"https"),
            (b":authority", authority.encode()), (b":path", path.encode()),
        ], end_stream=True)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        self.transmit()
        return await fut

    async def rebind(self):
        """Moves the connection to a new local UDP port, keeping its connection IDs: what a NAT
        rebinding looks like from the server's side."""
        loop = asyncio.get_running_loop()
        proto = self

        class Shim(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                proto.datagram_received(data, addr)

        old = self._transport
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0, 0, 0))
        new, _ = await loop.create_datagram_endpoint(Shim, sock=sock)
        self._transport = new
        old.close()
        return new.get_extra_info("sockname")[1]


async def run_client(args):
    host, port = args.connect.rsplit(":", 1)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=args.name,
                            idle_timeout=args.timeout)
    cfg.load_verify_locations(args.ca)
    if args.v2:
        cfg.supported_versions = [QuicProtocolVersion.VERSION_2]
        cfg.original_version = QuicProtocolVersion.VERSION_2
    cfg.quantum_readiness_test = args.quantum
    start = time.monotonic()
    out = {"ok": False}
    proto_ref = {}

    def make(*a, **kw):
        p = ClientProtocol(*a, **kw)
        proto_ref["p"] = p
        return p

    try:
        async with connect(host, int(port), configuration=cfg, create_protocol=make,
                           local_port=0) as client:
            bodies, ports = [], []
            for i in range(args.requests):
                if args.rebind and i == 1:
                    ports.append(await client.rebind())
                body = await asyncio.wait_for(client.get(args.name, args.path), args.timeout)
                bodies.append(body.decode() if len(body) < 256 else f"<{len(body)} bytes>")
            out = {"ok": True, "bodies": bodies, "rebound_to": ports,
                   "version": client._quic._version}
    except Exception as e:  # noqa: BLE001 - reported to the test as data
        p = proto_ref.get("p")
        out = {"ok": False, "exception": type(e).__name__}
        if p is not None and p.closed is not None:
            out["error_code"] = p.closed.error_code
            out["reason"] = p.closed.reason_phrase
    out["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--path", default="/")
    c.add_argument("--requests", type=int, default=1)
    c.add_argument("--v2", action="store_true")
    c.add_argument("--quantum", action="store_true")
    c.add_argument("--rebind", action="store_true")
    c.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    asyncio.run(run_server(args) if args.cmd == "server" else run_client(args))


if __name__ == "__main__":
    main()
