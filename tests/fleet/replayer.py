"""A lying agent: answers every challenge with the same evidence it recorded earlier.

    python tests/fleet/replayer.py EVIDENCE.json IP PORT
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EVIDENCE = open(sys.argv[1], "rb").read()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(EVIDENCE)))
        self.end_headers()
        self.wfile.write(EVIDENCE)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), Handler).serve_forever()
