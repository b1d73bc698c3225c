//! Offline image fixtures: a busybox-static rootfs packed with umoci into an OCI layout, pushed to a
//! loopback registry with skopeo. Every build writes a distinct marker file, so every image (and every
//! rebuild) has its own digest: digests are always read back, never hard-coded.

use std::cell::Cell;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::process::run;
use super::stack::Registry;
use super::which;

/// Applets linked into every fixture's /bin (busybox itself is the only real file).
pub const APPLETS: &[&str] = &[
    "sh", "true", "false", "sleep", "cat", "echo", "ls", "env", "id", "hostname", "printf", "test",
    "wc", "grep",
];

/// Builds images into one OCI layout under `<tmp>/images` and pushes them.
pub struct ImageFactory {
    pub dir: PathBuf,
    pub layout: PathBuf,
    counter: Cell<usize>,
}

/// What goes into one fixture image.
#[derive(Clone, Debug, Default)]
pub struct Fixture {
    /// Written to /etc/pullgate-fixture; makes the image content (and digest) unique.
    pub marker: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// The image config's `User` (`1002`, `www-data`, `1003:1003`; `umoci config --config.user`);
    /// `None` leaves it unset (root).
    pub user: Option<String>,
}

impl ImageFactory {
    pub fn new(tmp: &Path) -> ImageFactory {
        let dir = tmp.join("images");
        std::fs::create_dir_all(&dir).expect("create images dir");
        let layout = dir.join("oci");
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout));
        ImageFactory {
            dir,
            layout,
            counter: Cell::new(0),
        }
    }

    /// Builds `fixture` into the layout and returns the layout tag it was stored under.
    pub fn build(&self, fixture: &Fixture) -> String {
        let n = self.counter.get();
        self.counter.set(n + 1);
        let tag = format!("img{n}");
        let rootfs = self.dir.join(format!("rootfs{n}"));
        make_rootfs(
            &rootfs,
            &format!("{}\nbuild {n} of {}\n", fixture.marker, self.dir.display()),
        );
        let image = format!("{}:{tag}", self.layout.display());
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(&rootfs)
            .arg("/"));
        let mut config = Command::new("umoci");
        config.args([
            "config",
            "--image",
            &image,
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/",
        ]);
        config.args([
            "--config.label",
            &format!("pullgate.fixture={}", fixture.marker),
        ]);
        for e in &fixture.entrypoint {
            config.args(["--config.entrypoint", e]);
        }
        for c in &fixture.cmd {
            config.args(["--config.cmd", c]);
        }
        if let Some(user) = &fixture.user {
            config.args(["--config.user", user]);
        }
        run(&mut config);
        let _ = std::fs::remove_dir_all(&rootfs);
        tag
    }

    /// The manifest digest of a layout tag, read from the layout's index.json.
    pub fn layout_digest(&self, tag: &str) -> String {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.layout.join("index.json")).expect("read index.json"),
        )
        .expect("parse index.json");
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .and_then(|m| m["digest"].as_str())
            .unwrap_or_else(|| panic!("tag {tag} not in the OCI layout"))
            .to_string()
    }

    /// Pushes a layout tag to `registry` as `repo_tag` (`library/busybox:1`); returns the manifest
    /// digest, checked against what the registry now serves.
    pub fn push_tag(&self, tag: &str, registry: &Registry, repo_tag: &str) -> String {
        let dest = format!("docker://{}/{repo_tag}", registry.host());
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", self.layout.display()))
            .arg(&dest));
        let digest = self.layout_digest(tag);
        let served = manifest_digest(&registry.host(), repo_tag);
        assert_eq!(
            served, digest,
            "{dest} serves a different manifest than the one pushed"
        );
        digest
    }

    /// Builds a fixture image (default command `/bin/sh`) with `marker` and pushes it; returns its digest.
    pub fn push_image(&self, registry: &Registry, repo_tag: &str, marker: &str) -> String {
        let tag = self.build(&Fixture {
            marker: format!("{marker} {repo_tag}"),
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            user: None,
        });
        self.push_tag(&tag, registry, repo_tag)
    }

    /// Builds a fixture image (default command `/bin/sh`) into the layout only (nothing pushed);
    /// returns the layout tag.
    pub fn build_image(&self, marker: &str) -> String {
        self.build(&Fixture {
            marker: marker.to_string(),
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            user: None,
        })
    }

    /// Writes layout tag `tag` as a docker-archive tarball at `tar` whose image is named `name`
    /// (`quay.io/evil/miner:1`), the format `ctr images import` reads with its name intact.
    pub fn export_docker_archive(&self, tag: &str, tar: &Path, name: &str) {
        let _ = std::fs::remove_file(tar);
        run(Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:{tag}", self.layout.display()))
            .arg(format!("docker-archive:{}:{name}", tar.display())));
    }

    /// Builds a fixture image (default command `/bin/sh`) whose config runs as `user`, and pushes it;
    /// returns its digest.
    pub fn push_image_as(
        &self,
        registry: &Registry,
        repo_tag: &str,
        marker: &str,
        user: &str,
    ) -> String {
        let tag = self.build(&Fixture {
            marker: format!("{marker} {repo_tag}"),
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            user: Some(user.to_string()),
        });
        self.push_tag(&tag, registry, repo_tag)
    }

    /// Builds and pushes a pause image (busybox `sleep infinity`; fine as the sandbox of host-network
    /// pods); returns its digest.
    pub fn push_pause(&self, registry: &Registry, repo_tag: &str) -> String {
        let tag = self.build(&Fixture {
            marker: format!("pause {repo_tag}"),
            entrypoint: vec!["/bin/sleep".into(), "infinity".into()],
            cmd: vec![],
            user: None,
        });
        self.push_tag(&tag, registry, repo_tag)
    }
}

fn make_rootfs(rootfs: &Path, marker: &str) {
    let _ = std::fs::remove_dir_all(rootfs);
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("create rootfs dirs");
    }
    let busybox =
        which("busybox").expect("busybox (Debian package busybox-static) is not installed");
    assert!(
        is_static_elf(&busybox),
        "{} is not statically linked: install busybox-static",
        busybox.display()
    );
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).expect("symlink applet");
    }
    std::fs::write(rootfs.join("etc/pullgate-fixture"), marker).expect("write marker");
    // `www-data` (33): the user name fixtures may run as.
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nwww-data:x:33:33:www-data:/:/bin/sh\n",
    )
    .expect("write passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nwww-data:x:33:\n").expect("write group");
}

/// The sha256 digest of the manifest `host/repo_ref` serves (`repo:tag` or `repo@sha256:…`),
/// computed over the raw manifest bytes.
pub fn manifest_digest(host: &str, repo_ref: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/{repo_ref}"))
        .output()
        .expect("run skopeo inspect");
    assert!(
        out.status.success(),
        "skopeo inspect {host}/{repo_ref} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout)))
}

/// Copies `src_host/src_repo@digest` to `dst_host/dst_repo@digest`, keeping the digest (the manifest
/// bytes are copied unchanged), and verifies the destination serves that exact digest.
pub fn copy_by_digest(
    src_host: &str,
    src_repo: &str,
    digest: &str,
    dst_host: &str,
    dst_repo: &str,
) {
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{src_host}/{src_repo}@{digest}"))
        .arg(format!("docker://{dst_host}/{dst_repo}@{digest}")));
    let served = manifest_digest(dst_host, &format!("{dst_repo}@{digest}"));
    assert_eq!(
        served, digest,
        "copy of {src_repo}@{digest} to {dst_host}/{dst_repo} changed the digest"
    );
}

/// Whether `path` is an ELF executable without a program interpreter (i.e. statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false; // not ELF64
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3: a dynamic executable names its loader.
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

/// Adds `count` layers of `size` incompressible bytes each to layout tag `tag` (one `umoci insert`
/// each), so the image has several layers of real size.
pub fn add_layers(factory: &ImageFactory, tag: &str, count: usize, size: usize) {
    let image = format!("{}:{tag}", factory.layout.display());
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ (size as u64) ^ (tag.len() as u64);
    for i in 0..count {
        let dir = factory.dir.join(format!("layer-{tag}-{i}"));
        std::fs::create_dir_all(&dir).expect("create layer dir");
        let mut data = vec![0u8; size];
        for chunk in data.chunks_mut(8) {
            // xorshift64*: fast, deterministic, incompressible enough for gzip.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        std::fs::write(dir.join("data.bin"), &data).expect("write layer data");
        run(Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(&dir)
            .arg(format!("/extra{i}")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Writes an OCI image index into the layout that references the layout tags in `entries` with the
/// given (os, architecture), and tags it `name`; returns its digest.
pub fn make_index(factory: &ImageFactory, entries: &[(&str, &str, &str)], name: &str) -> String {
    let index_path = factory.layout.join("index.json");
    let mut layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("read index.json"))
            .expect("parse index.json");
    let find = |tag: &str| -> serde_json::Value {
        layout["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .unwrap_or_else(|| panic!("tag {tag} not in the OCI layout"))
    };
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(tag, os, arch)| {
            let m = find(tag);
            serde_json::json!({
                "mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"],
                "platform": {"architecture": arch, "os": os}
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests
    }))
    .expect("index json");
    let hex = hex::encode(Sha256::digest(&body));
    std::fs::write(factory.layout.join("blobs/sha256").join(&hex), &body)
        .expect("write index blob");
    let digest = format!("sha256:{hex}");
    layout["manifests"].as_array_mut().expect("manifests").push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": body.len(),
        "annotations": {"org.opencontainers.image.ref.name": name}
    }));
    std::fs::write(
        &index_path,
        serde_json::to_vec(&layout).expect("layout json"),
    )
    .expect("write index.json");
    digest
}

/// Pushes layout tag `name` (an index) with every platform image to `registry` as `repo_tag`, keeping
/// the digests; returns the digest the registry serves.
pub fn push_index(
    factory: &ImageFactory,
    name: &str,
    registry: &Registry,
    repo_tag: &str,
) -> String {
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{name}", factory.layout.display()))
        .arg(format!("docker://{}/{repo_tag}", registry.host())));
    manifest_digest(&registry.host(), repo_tag)
}
