#!/usr/bin/python3
"""A simulated Dahua camera: a real RTSP server (GStreamer's gst-rtsp-server) with a
live test pattern, Digest authentication, and Dahua's URL scheme:

    rtsp://admin:admin@HOST:PORT/cam/realmonitor?channel=1&subtype=0   main stream, H.265
    rtsp://admin:admin@HOST:PORT/cam/realmonitor?channel=1&subtype=1   sub stream, H.264

Stock gst-rtsp-server matches mount points on the path only, so one factory is mounted
at /cam/realmonitor and picks the stream from the query string.

Prints `READY port=N` on stdout once it listens (port 0 picks a free one), then serves
until SIGTERM or SIGINT. Needs Debian's python3-gi, gir1.2-gst-rtsp-server-1.0 and
gstreamer1.0-plugins-{base,good,bad,ugly}; run it with /usr/bin/python3.
"""
import argparse
import re
import signal
import socket
import sys
import threading
from urllib.parse import parse_qs

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def size(text):
    w, h = text.lower().split("x")
    return int(w), int(h)


class RealMonitor(GstRtspServer.RTSPMediaFactory):
    """Builds the pipeline of the stream the query asks for."""

    def __init__(self, streams):
        super().__init__()
        self.streams = streams
        self.current = {}  # the stream's cache key -> Current
        # Watchers of one stream share one encoder, as on a real camera. The default
        # media key is the full request URI, query included, so subtypes stay apart.
        self.set_shared(True)

    def do_gen_key(self, url):
        """The cache key of the stream `url` asks for; gst-rtsp-server looks the key up
        in its cache of shared medias, and prepares what it finds for the client.

        Stock gst-rtsp-server answers 503 when a client finds a media that its last
        client is tearing down (it cannot prepare a media being unprepared). A real
        camera's encoder never refuses a viewer for that, and tests open one client
        right after another, so: a media torn down (or broken) gets a new key, and with
        it the next client a new media; a live one is held prepared for a moment, so
        that a client leaving now cannot tear it down under the one arriving (`prepare`
        counts its callers, and the hold is one of them).
        """
        stream = GstRtspServer.RTSPMediaFactory.do_gen_key(self, url)
        current = self.current.setdefault(stream, Current())
        if current.media is not None and not current.hold():
            self.current[stream] = current = Current(current.generation + 1)
        return f"{stream}#{current.generation}"

    def do_construct(self, url):
        media = GstRtspServer.RTSPMediaFactory.do_construct(self, url)
        stream = GstRtspServer.RTSPMediaFactory.do_gen_key(self, url)
        if media is not None:
            self.current.setdefault(stream, Current()).track(media)
        return media

    def do_create_element(self, url):
        query = parse_qs(url.query or "")
        subtype = query.get("subtype", ["0"])[0]
        launch = self.streams.get(subtype)
        if launch is None:
            print(f"unknown subtype {subtype!r} in {url.abspath}?{url.query}", file=sys.stderr, flush=True)
            return None
        return Gst.parse_launch(launch)


class Current:
    """The media a stream's clients share now, and its generation (see `gen_key`)."""

    def __init__(self, generation=0):
        self.generation = generation
        self.media = None
        self.prepared = False

    def track(self, media):
        self.media = media
        media.connect("prepared", lambda _media: setattr(self, "prepared", True))

    def hold(self):
        """Holds the media prepared for a second if it is live; False if it is torn
        down or broken and must not be handed out again."""
        status = self.media.get_status()  # waits while another client prepares it
        if status == GstRtspServer.RTSPMediaStatus.UNPREPARED:
            return not self.prepared  # new, the client prepares it; or torn down
        if status not in (GstRtspServer.RTSPMediaStatus.PREPARED, GstRtspServer.RTSPMediaStatus.SUSPENDED):
            return False  # being torn down, or failed
        if not self.media.prepare(None):
            return False  # its teardown began since the look above
        GLib.timeout_add_seconds(1, self.release, self.media)
        return True

    @staticmethod
    def release(media):
        media.unprepare()
        return GLib.SOURCE_REMOVE


class LanAddressFront:
    """Makes the camera answer like one on its own LAN: a front proxy that rewrites the
    RTSP server's `Content-Base` and turns SDP `a=control` entries into absolute URLs
    naming `advertise` (e.g. 192.168.1.108:554), as real cameras do. Logs every request
    line it forwards as `REQUEST <line>`, so tests can see which URLs clients used."""

    def __init__(self, host, port, backend_port, advertise):
        self.listener = socket.create_server((host, port))
        self.backend = ("127.0.0.1", backend_port)
        self.advertise = advertise

    @property
    def port(self):
        return self.listener.getsockname()[1]

    def serve_forever(self):
        while True:
            client, _ = self.listener.accept()
            backend = socket.create_connection(self.backend)
            for sock in (client, backend):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.requests, args=(client, backend), daemon=True).start()
            threading.Thread(target=self.responses, args=(backend, client), daemon=True).start()

    def requests(self, src, dst):
        buf = b""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                buf = (buf + data)[-4096:]
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    if line.endswith(b" RTSP/1.0"):
                        print(f"REQUEST {line.decode(errors='replace')}", flush=True)
        except OSError:
            pass
        finally:
            close(dst)

    def responses(self, src, dst):
        reader = src.makefile("rb")
        try:
            while first := reader.read(1):
                if first == b"$":
                    header = reader.read(3)
                    dst.sendall(first + header + reader.read(int.from_bytes(header[1:3], "big")))
                    continue
                head = first + read_head(reader)
                length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1)) if re.search(
                    rb"(?im)^content-length:", head) else 0
                body = reader.read(length) if length else b""
                head, body = self.rewrite(head, body)
                dst.sendall(head + body)
        except (OSError, AttributeError, ValueError):
            pass
        finally:
            close(dst)

    def rewrite(self, head, body):
        base = re.search(rb"(?im)^content-base:\s*rtsp://[^/\r\n]+(\S*)", head)
        if base:
            lan_base = b"rtsp://" + self.advertise.encode() + base.group(1)
            head = head[: base.start()] + b"Content-Base: " + lan_base + head[base.end():]
            if body:
                prefix = lan_base if lan_base.endswith(b"/") else lan_base + b"/"
                body = re.sub(rb"(?m)^a=control:(?!rtsp://)(?!\*)(\S+)", lambda m: b"a=control:" + prefix + m.group(1), body)
                head = re.sub(rb"(?im)^content-length:\s*\d+", b"Content-Length: %d" % len(body), head)
        return head, body


def read_head(reader):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            raise OSError("closed")
        head += line
    return head


def close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def log_setup(_client, ctx):
    _, transport = ctx.request.get_header(GstRtsp.RTSPHeaderField.TRANSPORT, 0)
    print(f"SETUP transport={transport}", flush=True)
    return GstRtsp.RTSPStatusCode.OK


def pipeline(codec, width, height, fps, bitrate_kbps, pattern):
    source = (
        f"videotestsrc is-live=true pattern={pattern} ! "
        f"video/x-raw,width={width},height={height},framerate={fps}/1 ! "
        f"videoconvert ! video/x-raw,format=I420 ! "
    )
    if codec == "h265":
        enc = (
            f"x265enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate_kbps} "
            f"key-int-max={fps * 2} ! video/x-h265,profile=main ! "
            f"rtph265pay name=pay0 pt=96 config-interval=-1"
        )
    else:
        enc = (
            f"x264enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate_kbps} "
            f"key-int-max={fps * 2} ! video/x-h264,profile=baseline ! "
            f"rtph264pay name=pay0 pt=96 config-interval=-1"
        )
    return f"( {source}{enc} )"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="RTSP port; 0 picks a free one")
    p.add_argument("--main-size", type=size, default=(640, 360), help="main stream WxH (H.265)")
    p.add_argument("--sub-size", type=size, default=(320, 240), help="sub stream WxH (H.264)")
    p.add_argument("--fps", type=int, default=20)
    p.add_argument("--pattern", default="ball",
                   help="videotestsrc pattern; 'snow' (noise) makes the encoders use their whole bitrate")
    p.add_argument("--main-kbps", type=int, default=1024)
    p.add_argument("--sub-kbps", type=int, default=256)
    p.add_argument("--user", default="admin")
    p.add_argument("--password", default="admin")
    p.add_argument("--no-auth", action="store_true", help="serve without Digest authentication")
    p.add_argument("--tcp-only", action="store_true", help="refuse RTP over UDP (461), as some cameras do")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="answer with absolute URLs naming this LAN address, like a real camera (e.g. 192.168.1.108:554)")
    args = p.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    if args.advertise:
        # The RTSP server hides behind a front that rewrites its answers (see above).
        server.set_address("127.0.0.1")
        server.set_service("0")
    else:
        server.set_address(args.host)
        server.set_service(str(args.port))

    factory = RealMonitor(
        {
            "0": pipeline("h265", *args.main_size, args.fps, args.main_kbps, args.pattern),
            "1": pipeline("h264", *args.sub_size, args.fps, args.sub_kbps, args.pattern),
        }
    )
    # Like a real camera, offer RTP over UDP and over TCP (interleaved) unless told not to.
    if args.tcp_only:
        factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)

    if not args.no_auth:
        auth = GstRtspServer.RTSPAuth()
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", args.user)
        auth.add_digest(args.user, args.password, token)
        server.set_auth(auth)
        factory.add_role_from_structure(
            Gst.Structure.new_from_string(
                f"{args.user},media.factory.access=(boolean)true,media.factory.construct=(boolean)true"
            )
        )

    server.get_mount_points().add_factory("/cam/realmonitor", factory)
    # One line per SETUP with the transport the client asked for, so tests can tell
    # what reached the camera.
    server.connect("client-connected", lambda _server, client: client.connect("pre-setup-request", log_setup))
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    port = server.get_bound_port()
    if args.advertise:
        front = LanAddressFront(args.host, args.port, port, args.advertise)
        threading.Thread(target=front.serve_forever, daemon=True).start()
        port = front.port
    print(f"READY port={port}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
