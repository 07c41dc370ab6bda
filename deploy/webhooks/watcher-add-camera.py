#!/usr/bin/env python3
"""Adds each camera to Flussonic Watcher the first time it comes online.

A webhook receiver for camera-relay (docs/events.md). The relay POSTs every event it
is configured to send; this checks the event's signature, and for `camera.online` of a
camera it has not added yet, creates the camera in Watcher through its API, as the
tunnel's documentation does by hand:

    curl -X POST http://flussonic-watcher/api/cameras -H "Content-Type: application/json" \\
      -d '{"name": "dahua-2449s-il-001",
           "url": "rtsp://127.0.0.1:8554/cam/realmonitor?channel=1&subtype=0",
           "username": "admin", "password": "admin"}'

The camera's URL is the relay's port for it (from the event) on --rtsp-host. If Watcher
cannot be reached or refuses, this answers the relay 502 and the relay tries again
later (with backoff, in order); Watcher answering 409 (the camera exists) counts as
added. Cameras added are remembered in --state, so a camera that reconnects is not
added twice. Python 3 standard library only.

    WEBHOOK_SECRET=... ./watcher-add-camera.py --listen 127.0.0.1:9000 \\
        --watcher-api http://flussonic-watcher/api/cameras

relay.toml:
    [[webhooks]]
    name = "watcher"
    url = "http://127.0.0.1:9000/events"
    secret = "..."   # the same as WEBHOOK_SECRET
    events = ["camera.online"]
"""
import argparse
import hashlib
import hmac
import http.server
import json
import os
import sys
import threading
import urllib.error
import urllib.request


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT to receive events on")
    p.add_argument("--watcher-api", default="http://flussonic-watcher/api/cameras",
                   help="Watcher's camera API (POST creates a camera)")
    p.add_argument("--watcher-token", default=os.environ.get("WATCHER_TOKEN"),
                   help="bearer token for Watcher's API (or WATCHER_TOKEN)")
    p.add_argument("--rtsp-host", default="127.0.0.1",
                   help="the relay host as Watcher reaches it (127.0.0.1: same host)")
    p.add_argument("--path", default="/cam/realmonitor?channel=1&subtype=0",
                   help="the camera's stream path")
    p.add_argument("--camera-user", default="admin")
    p.add_argument("--camera-password", default="admin")
    p.add_argument("--state", default="watcher-cameras.json",
                   help="file remembering the cameras added")
    args = p.parse_args()
    args.secret = os.environ.get("WEBHOOK_SECRET", "").encode()
    if not args.secret:
        sys.exit("set WEBHOOK_SECRET to the webhook's secret in relay.toml")
    return args


def load_added(path):
    try:
        with open(path) as f:
            return set(json.load(f))
    except FileNotFoundError:
        return set()


def save_added(path, added):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sorted(added), f)
    os.replace(tmp, path)


def add_to_watcher(args, event):
    """Creates the camera in Watcher; None if done, else why not."""
    camera = event["camera"]
    port = event["data"]["port"]
    body = json.dumps({
        "name": camera,
        "url": f"rtsp://{args.rtsp_host}:{port}{args.path}",
        "username": args.camera_user,
        "password": args.camera_password,
    }).encode()
    request = urllib.request.Request(args.watcher_api, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if args.watcher_token:
        request.add_header("Authorization", f"Bearer {args.watcher_token}")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return None
    except urllib.error.HTTPError as e:
        if e.code == 409:
            return None
        return f"Watcher answered {e.code}"
    except OSError as e:
        return f"Watcher not reached: {e}"


def main():
    args = parse_args()
    added = load_added(args.state)
    # Events of one camera come one at a time; of several cameras, at once.
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            signature = self.headers.get("X-Camera-Relay-Signature", "")
            expected = "sha256=" + hmac.new(args.secret, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(signature, expected):
                self.send_response(401)
                self.end_headers()
                return
            event = json.loads(body)
            status = 204
            if event["type"] == "camera.online" and event["camera"] not in added:
                why = add_to_watcher(args, event)
                if why is None:
                    with lock:
                        added.add(event["camera"])
                        save_added(args.state, added)
                    print(f"added {event['camera']} to Watcher", flush=True)
                else:
                    print(f"could not add {event['camera']}: {why}; the relay retries",
                          flush=True)
                    status = 502
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_):
            pass

    host, port = args.listen.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print(f"receiving camera-relay events on {args.listen}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
