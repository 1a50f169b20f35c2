"""A local OpenAI-compatible upstream whose behaviour the test's prompt chooses.

The last user message is a list of directives, for example ``"usage=120,40 cached=20"``:

    usage=P,C     report P prompt and C completion tokens (default 11,7)
    cached=N      report N of the prompt tokens as cached
    reasoning=N   report N of the completion tokens as reasoning
    error=CODE    answer with that HTTP status
    sleep=S       wait S seconds before answering
    words=N       stream N one-word chunks (default 5)
    chunkdelay=S  wait S seconds after each streamed chunk
    die=clean     stream, then drop the connection on a stream with no chunked encoding
                  (the client sees an ordinary end of stream, with no usage chunk)
    die=chunked   stream with chunked encoding, then drop the connection mid-chunk

Images (``/images/generations``) come back as ``n`` tiny images, speech (``/audio/speech``) as a
few bytes, a transcription (``/audio/transcriptions``, multipart) as a line of text.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _directives(body: dict[str, Any]) -> dict[str, str]:
    messages = body.get("messages") or []
    text = ""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            break
    out = {}
    for part in text.split():
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeUpstream  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        if self.path.endswith("/audio/transcriptions"):  # multipart: the file, not JSON
            self.server.requests.append({"path": self.path, "bytes": len(raw)})
            self._json({"text": "hello from the audio"})
            return
        body = json.loads(raw or b"{}")
        body["path"] = self.path
        self.server.requests.append(body)
        self.server.authorizations.append(self.headers.get("authorization", ""))
        d = _directives(body)
        if "sleep" in d:
            time.sleep(float(d["sleep"]))
        if "error" in d:
            payload = json.dumps({"error": {"message": "upstream failure", "type": "server_error"}}).encode()
            self.send_response(int(d["error"]))
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path.endswith("/images/generations"):
            n = int(body.get("n") or 1)
            self._json({"created": int(time.time()), "data": [{"b64_json": "aGVsbG8="} for _ in range(n)]})
            return
        if self.path.endswith("/audio/speech"):
            payload = b"ID3" + b"\x00" * 64
            self.send_response(200)
            self.send_header("content-type", "audio/mpeg")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path.endswith("/embeddings"):
            self._json(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "model": body.get("model"),
                    "usage": {"prompt_tokens": 9, "total_tokens": 9},
                }
            )
            return
        prompt, completion = (int(x) for x in d.get("usage", "11,7").split(","))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if "cached" in d:
            usage["prompt_tokens_details"] = {"cached_tokens": int(d["cached"])}
        if "reasoning" in d:
            usage["completion_tokens_details"] = {"reasoning_tokens": int(d["reasoning"])}
        if body.get("stream"):
            self._stream(body, d, usage)
            return
        self._json(
            {
                "id": "chatcmpl-" + uuid.uuid4().hex,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    def _json(self, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, body: dict[str, Any], d: dict[str, str], usage: dict[str, Any]) -> None:
        die = d.get("die")
        words = int(d.get("words", "5"))
        chunked = die != "clean"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("connection", "close")
        self.end_headers()
        cid = "chatcmpl-" + uuid.uuid4().hex

        def send(obj: dict[str, Any] | str) -> None:
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            if chunked:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            else:
                self.wfile.write(data)
            self.wfile.flush()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        send(chunk({"role": "assistant", "content": ""}))
        delay = float(d.get("chunkdelay", "0"))
        for i in range(words):
            send(chunk({"content": f"word{i} "}))
            if delay:
                time.sleep(delay)
        if die == "clean":
            self.close_connection = True
            return
        if die == "chunked":
            # a chunk header that promises more than ever arrives, then the connection drops
            self.wfile.write(b'400\r\ndata: {"partial')
            self.wfile.flush()
            self.close_connection = True
            return
        send(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            send(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [],
                    "usage": usage,
                }
            )
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
