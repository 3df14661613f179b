#!/usr/bin/env python3
"""A lean DmaBroker client for the sigkill benchmark, from Python's standard library alone: HTTP/2
framing (RFC 9113), request headers as HPACK literals (RFC 7541 section 6.2.2, no Huffman, no
dynamic table), gRPC's length-prefixed messages, and the few protobuf fields it needs, encoded by
hand as SPEC section 11 and the protos define them. It answers the broker's SETTINGS and keepalive
PINGs. One thread, ~10 MB: the kernel tears it down in about a millisecond (a .NET client's ~47 MB
of mappings take it 3-4 ms at the median on the benchmark machine, 5-10 ms at p99, before the broker
can see anything).

    lean_client.py hold <http://host:port> <group> <probe port>
        opens a session, claims the group (a TYPE1V2 container), opens a plain TCP socket to the
        probe port (whose EOF the benchmark times beside the release), prints
        `holding <group> session <id>`, pings the session every lease / 3 and exits when stdin closes.
"""
import select
import socket
import struct
import sys
import time

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def field_bytes(number, value):
    return varint(number << 3 | 2) + varint(len(value)) + value


def fields(message):
    """The (number, value) pairs of a protobuf message: varints as ints, length-delimited as bytes."""
    i = 0
    while i < len(message):
        key, i = read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(message, i)
        elif wire == 2:
            length, i = read_varint(message, i)
            value, i = message[i:i + length], i + length
        elif wire == 1:
            value, i = message[i:i + 8], i + 8
        elif wire == 5:
            value, i = message[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, value


def read_varint(data, i):
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def hpack_int(n, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if n < limit:
        return bytes([first | n])
    # The prefix full, the rest follows in 7-bit groups, least significant first: a protobuf varint.
    return bytes([first | limit]) + varint(n - limit)


def literal(name, value):
    """A header field as an HPACK literal without indexing, with a new name, neither Huffman-coded."""
    name, value = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(message):
    return b"\x00" + struct.pack(">I", len(message)) + message


class Connection:
    """One HTTP/2 connection to the broker, read and written from this one thread."""

    def __init__(self, host, port):
        self.authority = f"{host}:{port}"
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
        self.received = b""
        self.streams = {}
        self.ended = set()
        self.next_stream = 1

    def call(self, path, message, token=None, end=True):
        """Starts a call, sends its first message (and ends the request if `end`); returns its stream id."""
        stream = self.next_stream
        self.next_stream += 2
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        if token is not None:
            headers.append(("dmabroker-session-token", token))
        block = b"".join(literal(n, v) for n, v in headers)
        self.streams[stream] = b""
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream, block)
                          + frame(DATA, END_STREAM if end else 0, stream, grpc_message(message)))
        return stream

    def send(self, stream, message):
        self.sock.sendall(frame(DATA, 0, stream, grpc_message(message)))

    def take(self, stream):
        """The stream's next whole message if it has come, else None."""
        buffered = self.streams[stream]
        if len(buffered) >= 5:
            length = struct.unpack(">I", buffered[1:5])[0]
            if len(buffered) >= 5 + length:
                self.streams[stream] = buffered[5 + length:]
                return buffered[5:5 + length]
        return None

    def response(self, stream, path):
        """The call's next message; a call that ends without one failed (its status is in the trailers)."""
        while (message := self.take(stream)) is None:
            if stream in self.ended:
                raise SystemExit(f"lean_client: {path} failed (no response message; the broker's status is in its trailers)")
            self.pump(None)
        return message

    def pump(self, timeout):
        """Reads what has come (waiting up to `timeout` seconds, None: until something comes) and handles every whole frame."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return
        chunk = self.sock.recv(65536)
        if not chunk:
            raise SystemExit("lean_client: the broker closed the connection")
        self.received += chunk
        while len(self.received) >= 9:
            length = int.from_bytes(self.received[0:3], "big")
            if len(self.received) < 9 + length:
                break
            kind, flags = self.received[3], self.received[4]
            stream = struct.unpack(">I", self.received[5:9])[0] & 0x7FFFFFFF
            payload = self.received[9:9 + length]
            self.received = self.received[9 + length:]
            self.handle(kind, flags, stream, payload)

    def handle(self, kind, flags, stream, payload):
        if kind == SETTINGS and not flags & ACK:
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == DATA:
            if stream in self.streams:
                self.streams[stream] += payload
            if payload:
                # Give the flow-control credit back at once, to the connection and the stream.
                credit = struct.pack(">I", len(payload))
                self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, credit) + frame(WINDOW_UPDATE, 0, stream, credit))
            if flags & END_STREAM:
                self.ended.add(stream)
        elif kind == HEADERS and flags & END_STREAM or kind == RST_STREAM:
            self.ended.add(stream)
        elif kind == GOAWAY:
            raise SystemExit("lean_client: the broker sent GOAWAY")


def connect(address):
    host, port = address.removeprefix("http://").rsplit(":", 1)
    return Connection(host, int(port))


def hold(address, group, probe_port):
    connection = connect(address)

    # Session.Open: SessionRequest{hello{client_name}}; the first event is SessionEvent{opened{session_id, token, lease_ttl_ms}}.
    session = connection.call("/dmabroker.v1.Session/Open", field_bytes(1, field_bytes(1, b"sigkill-lean-holder")), end=False)
    event = dict(fields(connection.response(session, "Session.Open")))
    opened = dict(fields(event[1]))
    session_id, token, lease_ms = opened.get(1, 0), opened[2].decode(), opened.get(3, 3000)

    # Vfio.CreateContainer{type: CONTAINER_TYPE_TYPE1V2} -> {container_id}; Vfio.SetContainer{group_id, container_id}.
    path = "/dmabroker.v1.Vfio/CreateContainer"
    container = dict(fields(connection.response(connection.call(path, field_varint(1, 1), token), path))).get(1, 0)
    path = "/dmabroker.v1.Vfio/SetContainer"
    connection.response(connection.call(path, field_varint(1, group) + field_varint(2, container), token), path)

    probe = socket.create_connection(("127.0.0.1", probe_port))
    print(f"holding {group} session {session_id}", flush=True)

    # Until killed, or stdin closes: answer the broker, and ping the session every lease / 3.
    every = lease_ms / 3000
    due = time.monotonic() + every
    while True:
        readable, _, _ = select.select([connection.sock, sys.stdin], [], [], max(0.0, due - time.monotonic()))
        if sys.stdin in readable and not sys.stdin.buffer.read1(4096):
            break
        if connection.sock in readable:
            connection.pump(0)
        if time.monotonic() >= due:
            connection.send(session, field_bytes(2, b""))  # SessionRequest{ping{}}
            due += every
    probe.close()
    connection.sock.sendall(frame(DATA, END_STREAM, session))


def main():
    match sys.argv[1:]:
        case ["hold", address, group, probe_port]:
            hold(address, int(group), int(probe_port))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
