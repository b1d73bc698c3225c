#!/usr/bin/python3
"""Instructions a `pullgate serve` build executes per CRI call, counted by valgrind (callgrind).

On a shared, noisy VM the latency and CPU figures of `cargo bench --bench proxy` move by tens of
percent from run to run, so a change worth a few percent cannot be seen there. The number of
user-space instructions per call hardly moves (about 1% between runs of the same build) and shows
where they go: `callgrind_annotate --inclusive=yes <out>`.

Usage: /usr/bin/python3 scripts/proxy-instructions.py PULLGATE_BIN [version|status] [CALLS] [OUT]

Runs a minimal gRPC upstream (Python grpcio, canned answers) on a unix socket, PULLGATE_BIN serve
in front of it under `valgrind --tool=callgrind` (no bundle: `Version` is forwarded, `ImageStatus`
intercepted and forwarded), makes 200 warm-up calls, zeroes the counters, makes CALLS sequential
calls (default 1000) and prints instructions per call. OUT (default: a temporary directory)
receives the callgrind profile. Needs valgrind and the Debian python3-grpcio (hence /usr/bin/python3).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures

try:
    import grpc
except ImportError:
    sys.exit("proxy-instructions: needs python3-grpcio; run with /usr/bin/python3, not a pyenv python")

CALLS = {
    "version": ("/runtime.v1.RuntimeService/Version", b"\n\x020.1"),
    # ImageStatusRequest{image: {image: "busybox"}}
    "status": ("/runtime.v1.ImageService/ImageStatus", b"\n\t\n\x07busybox"),
}
ANSWERS = {
    ("runtime.v1.RuntimeService", "Version"): b'\n\x020.1\x12\x08fake-cri\x1a\x051.0.0"\x02v1',
    ("runtime.v1.ImageService", "ImageStatus"): b"",
}


def usage(why):
    sys.exit(f"proxy-instructions: {why}\nusage: {sys.argv[0]} PULLGATE_BIN [version|status] [CALLS] [OUT]")


def main():
    if len(sys.argv) < 2:
        usage("name the pullgate binary to measure")
    binary = os.path.abspath(sys.argv[1])
    if not os.access(binary, os.X_OK):
        usage(f"{binary} is not an executable file")
    method = sys.argv[2] if len(sys.argv) > 2 else "version"
    if method not in CALLS:
        usage(f"unknown call {method!r}: choose one of {', '.join(CALLS)}")
    try:
        calls = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    except ValueError:
        usage(f"CALLS must be a number, not {sys.argv[3]!r}")
    if calls < 1:
        usage("CALLS must be at least 1")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            usage(f"{tool} is not installed (Debian package valgrind)")

    work = tempfile.mkdtemp(prefix="pullgate-instr-")
    out = sys.argv[4] if len(sys.argv) > 4 else os.path.join(work, "callgrind.out")
    upstream, listen = os.path.join(work, "up.sock"), os.path.join(work, "pg.sock")
    subprocess.run([binary, "keygen", "--out", os.path.join(work, "k")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(work, "k.pub")) as f:
        public = f.read().strip()
    with open(os.path.join(work, "trust.toml"), "w") as f:
        f.write(f'threshold = 1\n[[keys]]\nname = "k"\npublic_key = "{public}"\n')
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(
            f'[server]\nworker_threads = 1\n[log]\nlevel = "error"\n'
            f'[policy]\nstate_dir = "{work}/state"\ntrust = "{work}/trust.toml"\n'
            f'[metrics]\nlisten = "off"\n[admin]\nsocket = "{work}/admin.sock"\n'
        )

    ident = lambda b: b  # noqa: E731
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    for (service, name), answer in ANSWERS.items():
        handler = grpc.unary_unary_rpc_method_handler(
            lambda req, ctx, a=answer: a, request_deserializer=ident, response_serializer=ident
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: handler}),))
    server.add_insecure_port("unix:" + upstream)
    server.start()

    log = open(os.path.join(work, "valgrind.log"), "w")
    pg = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve",
         "--config", config, "--listen", listen, "--upstream", upstream],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.time() + 60
        while not os.path.exists(listen):
            if pg.poll() is not None or time.time() > deadline:
                sys.exit(f"proxy-instructions: pullgate did not start; see {log.name}")
            time.sleep(0.1)
        # `localhost`, as grpc-go sends from Kubernetes 1.30 on: no header block is re-encoded.
        channel = grpc.insecure_channel("unix:" + listen, options=[("grpc.default_authority", "localhost")])
        path, body = CALLS[method]
        call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
        for _ in range(200):
            call(body, timeout=30)
        subprocess.run(["callgrind_control", "-z", str(pg.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(calls):
            call(body, timeout=30)
        subprocess.run(["callgrind_control", "-d", str(pg.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        pg.terminate()
        pg.wait()
        server.stop(0)
    # The dump requested above is the first part written after the zeroing: OUT.1.
    with open(out + ".1") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
    print(f"{method}: {total / calls:,.0f} instructions per call ({calls} calls; profile {out}.1)")


if __name__ == "__main__":
    main()
