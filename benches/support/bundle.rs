//! The benchmarks' large bundle: `n` images spread over 20 programs × 10 projects, signed by two
//! administrators (threshold 2), written with its signature and trust files into a temporary
//! directory. Shared by the policy and footprint benchmarks (`#[path]`-included).

use pullgate::policy::{self, Digest, PrivateKey, Trust, load};

pub const PROGRAMS: usize = 20;
pub const PROJECTS: usize = 10;

pub fn digest_of(kind: &str, i: usize) -> Digest {
    Digest::sha256_of(format!("{kind}-{i}").as_bytes())
}

/// A realistic bundle of `n` images spread over 20 programs × 10 projects.
pub fn generate(n: usize) -> String {
    use std::fmt::Write as _;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut s = String::with_capacity(n * 420 + 100_000);
    let _ = write!(
        s,
        r#"{{"format":1,"version":7,"issued_at":"{}","expires_at":"{}","issuer":"bench@corp.example","private_registry":"registry.corp","mirrors":[{{"source":"docker.io","target":"approved"}},{{"source":"ghcr.io","target":"approved-ghcr"}},{{"source":"registry.k8s.io","target":"approved-k8s"}}],"governance":{{"organization":"corp","application_label":"corp.example/application","programs":["#,
        fmt(now - time::Duration::hours(1)),
        fmt(now + time::Duration::days(30))
    );
    for p in 0..PROGRAMS {
        let _ = write!(
            s,
            r#"{}{{"name":"prog{p}","projects":["#,
            if p > 0 { "," } else { "" }
        );
        for q in 0..PROJECTS {
            let _ = write!(
                s,
                r#"{}{{"name":"proj{q}","namespaces":["ns-{p}-{q}"],"applications":["web","api"]}}"#,
                if q > 0 { "," } else { "" }
            );
        }
        s.push_str("]}");
    }
    s.push_str(r#"]},"first_party":[{"prefix":"registry.corp/apps/","scope":"corp","require_digest":true}],"images":["#);
    let licenses = [
        "Apache-2.0",
        "MIT",
        "BSD-3-Clause",
        "GPL-2.0-only",
        "MPL-2.0",
    ];
    let approvers = [
        "alice@corp.example",
        "bob@corp.example",
        "carol@corp.example",
    ];
    for i in 0..n {
        let registry = ["docker.io", "ghcr.io", "registry.k8s.io"][i % 3];
        let scope = match i % 4 {
            0 => "corp".to_owned(),
            1 => format!("corp/prog{}", i % PROGRAMS),
            2 => format!(
                "corp/prog{}/proj{}",
                i % PROGRAMS,
                (i / PROGRAMS) % PROJECTS
            ),
            _ => format!(
                "corp/prog{}/proj{}/web",
                i % PROGRAMS,
                (i / PROGRAMS) % PROJECTS
            ),
        };
        let _ = write!(
            s,
            r#"{}{{"source":"{registry}/team{}/app{i}","tags":{{"v1.{}":"{}"}},"scope":"{scope}","provenance":{{"license":"{}","scans":[{{"scanner":"trivy","version":"0.58.1","report":"{}","worst_severity":"low"}}],"approved_by":"{}","approved_at":"2026-01-15T10:00:00Z"}}}}"#,
            if i > 0 { "," } else { "" },
            i % 500,
            i % 40,
            digest_of("image", i),
            licenses[i % licenses.len()],
            digest_of("report", i),
            approvers[i % approvers.len()],
        );
    }
    s.push_str("]}");
    s
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub trust: Trust,
}

pub fn write_signed(n: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let json = generate(n);
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, &json).unwrap();
    let keys = [
        PrivateKey::from_seed([1; 32]),
        PrivateKey::from_seed([2; 32]),
    ];
    let mut sigs = policy::SignatureFile::new();
    let mut trust = String::from("threshold = 2\n");
    for (i, k) in keys.iter().enumerate() {
        sigs.add(k.sign_bundle(json.as_bytes()));
        trust.push_str(&format!(
            "[[keys]]\nname = \"admin{i}\"\npublic_key = \"{}\"\n",
            k.public()
        ));
    }
    std::fs::write(load::signature_path(&bundle), sigs.to_json()).unwrap();
    std::fs::write(dir.path().join("trust.toml"), &trust).unwrap();
    Fixture {
        dir,
        trust: Trust::from_toml(&trust).unwrap(),
    }
}
