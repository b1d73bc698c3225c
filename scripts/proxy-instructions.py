#!/usr/bin/python3
"""Instructions a `pullgate serve` build executes per CRI call, counted by valgrind (callgrind).

On a shared, noisy VM the latency and CPU figures of `cargo bench --bench proxy` move by tens of
percent from run to run, so a change worth a few percent cannot be seen there. The number of
user-space instructions per call hardly moves (about 1% between runs of the same build) and shows
where they go: `callgrind_annotate --inclusive=yes <out>`.

Usage: /usr/bin/python3 scripts/proxy-instructions.py PULLGATE_BIN [CALL] [CALLS] [OUT]

CALL is one of:
  version        `Version`, forwarded (no bundle installed);
  status         `ImageStatus`, intercepted and forwarded unchanged (no bundle installed);
  status-bundle  `ImageStatus` of an approved image's public name with a signed 100,000-image
                 bundle installed: the name resolved to its pinned mirror, the answer's names shown
                 as the public ones;
  pull           `PullImage` of that name with the bundle: decided, rewritten, audited;
  create         `CreateContainer` of that image, by ID with the name as `user_specified_image`, in a
                 pod created through pullgate, after pulling it through pullgate: no lookup, the
                 decision cached, audited.

Runs a minimal gRPC upstream (Python grpcio, canned answers) on a unix socket, PULLGATE_BIN serve
in front of it under `valgrind --tool=callgrind`, makes 200 warm-up calls, zeroes the counters,
makes CALLS sequential calls (default 1000) and prints instructions per call. The callgrind profile
is written to OUT.1 when OUT is given; the run's temporary directory is removed either way. Needs
valgrind and the Debian python3-grpcio (hence /usr/bin/python3).
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


def field(number, value):
    """One length-delimited protobuf field (wire type 2)."""
    if isinstance(value, str):
        value = value.encode()
    key, size, out = number << 3 | 2, len(value), bytearray()
    for n in (key, size):
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out) + value


IMAGES = 100_000
# The measured image: one entry of the bundle, as a pod spec names it, and where it is mirrored.
APP = 77_777
PUBLIC = f"docker.io/library/app{APP}:1.0"


def app_digest(i):
    return f"sha256:{i * 0x9E3779B97F4A7C15 + 1:064x}"


MIRRORED = f"registry.corp/approved/library/app{APP}@{app_digest(APP)}"
IMAGE_ID = "sha256:" + "b0" * 32
POD = field(1, field(1, "bench") + field(3, "default") + field(2, "u"))  # PodSandboxConfig.metadata

PULL = ("/runtime.v1.ImageService/PullImage", field(1, field(1, PUBLIC)) + field(3, POD))
# RunPodSandboxRequest{config}
RUN_POD = ("/runtime.v1.RuntimeService/RunPodSandbox", field(1, POD))
SANDBOX_ID = "pod-1"

# call: (method path, request, needs the bundle, calls made once before the warm-up)
CALLS = {
    "version": ("/runtime.v1.RuntimeService/Version", field(1, "0.1"), False, []),
    "status": ("/runtime.v1.ImageService/ImageStatus", field(1, field(1, "busybox")), False, []),
    "status-bundle": ("/runtime.v1.ImageService/ImageStatus", field(1, field(1, PUBLIC)), True, []),
    # PullImageRequest{image, sandbox_config (field 3)}
    "pull": (*PULL, True, []),
    # CreateContainerRequest{pod_sandbox_id, config: {image: {image: the ID, user_specified_image
    # (field 18)}}, sandbox_config}: the pod created and the image pulled through pullgate first,
    # so the start needs no lookup; its decision is cached after the first call.
    "create": (
        "/runtime.v1.RuntimeService/CreateContainer",
        field(1, SANDBOX_ID) + field(2, field(2, field(1, IMAGE_ID) + field(18, PUBLIC))) + field(3, POD),
        True,
        [PULL, RUN_POD],
    ),
}
ANSWERS = {
    ("runtime.v1.RuntimeService", "Version"): field(1, "0.1") + field(2, "fake-cri") + field(3, "1.0.0") + field(4, "v1"),
    # ImageStatusResponse{image: {id, repo_digests: [the mirrored name]}}
    ("runtime.v1.ImageService", "ImageStatus"): field(1, field(1, IMAGE_ID) + field(3, MIRRORED)),
    ("runtime.v1.ImageService", "PullImage"): field(1, IMAGE_ID),
    ("runtime.v1.RuntimeService", "RunPodSandbox"): field(1, SANDBOX_ID),
    ("runtime.v1.RuntimeService", "CreateContainer"): field(1, "container-1"),
    # ReadContentResponse{data}: the mirrored manifest, whose config is the image, as containerd's
    # content store holds it. pullgate proves the image from it when first asked about it, as
    # on a node, so the calls measured are the steady state.
    ("containerd.services.content.v1.Content", "Read"): field(
        2, '{"schemaVersion":2,"config":{"digest":"%s"},"layers":[]}' % IMAGE_ID
    ),
}


def bundle_json():
    """A 100,000-image bundle mirroring docker.io into registry.corp/approved, as the proxy benchmark's."""
    now = time.time()
    stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    head = (
        f'{{"format":1,"version":1,"issued_at":"{stamp(now - 3600)}","expires_at":"{stamp(now + 30 * 86400)}",'
        '"issuer":"bench","private_registry":"registry.corp","mirrors":[{"source":"docker.io","target":"approved"}],'
        '"governance":{"organization":"corp","application_label":"app","mode":"enforce","programs":[]},'
        '"first_party":[],"images":['
    )
    images = ",".join(
        f'{{"source":"docker.io/library/app{i}","tags":{{"1.0":"{app_digest(i)}"}},"scope":"corp",'
        f'"provenance":{{"license":"MIT","scans":[{{"scanner":"trivy","version":"0.58.1","report":"{app_digest(i + IMAGES)}",'
        '"worst_severity":"low"}],"approved_by":"bench@corp","approved_at":"2026-01-01T00:00:00Z"}}'
        for i in range(IMAGES)
    )
    return head + images + "]}"


def usage(why):
    sys.exit(f"proxy-instructions: {why}\nusage: {sys.argv[0]} PULLGATE_BIN [CALL] [CALLS] [OUT]")


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

    # Everything but the profile named by OUT (the bundle alone is tens of MiB) goes with the run.
    work = tempfile.mkdtemp(prefix="pullgate-instr-")
    try:
        measure(binary, method, calls, work, os.path.abspath(sys.argv[4]) if len(sys.argv) > 4 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(binary, method, calls, work, keep):
    out = keep or os.path.join(work, "callgrind.out")
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
    path, body, needs_bundle, setup = CALLS[method]
    if needs_bundle:
        bundle = os.path.join(work, "bundle.json")
        with open(bundle, "w") as f:
            f.write(bundle_json())
        for step in (["bundle", "sign", "--key", os.path.join(work, "k.key"), bundle],
                     ["bundle", "install", "--config", config, bundle]):
            done = subprocess.run([binary, *step], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                sys.exit(f"proxy-instructions: pullgate {' '.join(step[:2])} failed: {done.stderr.strip()}")

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
                log.flush()
                with open(log.name) as f:
                    sys.exit(f"proxy-instructions: pullgate did not start; valgrind printed:\n{f.read()[-4000:]}")
            time.sleep(0.1)
        # `localhost`, as grpc-go sends from Kubernetes 1.30 on: no header block is re-encoded.
        channel = grpc.insecure_channel("unix:" + listen, options=[("grpc.default_authority", "localhost")])
        call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
        for setup_path, setup_body in setup:
            channel.unary_unary(setup_path, request_serializer=ident, response_deserializer=ident)(setup_body, timeout=30)
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
    kept = f"; profile {out}.1" if keep else "; name OUT to keep the profile"
    print(f"{method}: {total / calls:,.0f} instructions per call ({calls} calls{kept})")


if __name__ == "__main__":
    main()
