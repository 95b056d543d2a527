"""The HTTP/1.1 protocol the server runs on: uvicorn's h11 one, with its own errors in JSON.

uvicorn answers a request it cannot parse (an over-long header, a malformed request line)
itself, before any route runs, with a plain-text 400. Clients of these APIs expect JSON errors,
so this subclass sends the same 400 in OpenAI's error shape (the route is unknown at that point,
and OpenAI's shape is also what the named-caches API speaks).
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class JSONErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"message": f"invalid HTTP request: {msg}", "type": "invalid_request_error",
                                     "param": None, "code": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
