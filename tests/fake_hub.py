"""A local stand-in for the Hub's HTTP API on 127.0.0.1 that records every request, so the real
huggingface_hub client code runs in tests. Every file is accepted as a "regular" (inline) upload."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
                if self.path.startswith("/api/whoami"):
                    return self._reply(200, {"name": "tester", "type": "user", "auth": {}})
                self._reply(200, {})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec = {"method": "POST", "path": self.path, "auth": self.headers.get("authorization"), "body": body}
                hub.requests.append(rec)
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    return self._reply(200, {"url": f"{hub.url}/{payload.get('organization')}/{payload['name']}",
                                             "name": payload["name"]})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            hub.files[v["path"]] = base64.b64decode(v["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/org/x/commit/" + "a" * 40, "commitOid": "a" * 40,
                                             "pullRequestUrl": None})
                if self.path.startswith("/api/validate-yaml"):
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/branch/" in self.path:
                    return self._reply(200, {})
                self._reply(404, {"error": "unknown"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
