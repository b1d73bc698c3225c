//! The malloc settings the systemd unit runs pullgate with (`Environment=GLIBC_TUNABLES=…` in
//! systemd/pullgate.service), so that the benchmarks measure the daemon as it is deployed.

use std::process::Command;

/// The value of `GLIBC_TUNABLES` in the systemd unit.
pub fn unit_tunables() -> String {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/pullgate.service");
    let text = std::fs::read_to_string(unit).expect("read the systemd unit");
    text.lines()
        .find_map(|l| l.strip_prefix("Environment=GLIBC_TUNABLES="))
        .expect("the systemd unit sets GLIBC_TUNABLES")
        .to_owned()
}

/// Re-executes this benchmark with the unit's `GLIBC_TUNABLES` unless the variable is set already
/// (set it, even to nothing, to measure other settings); returns in the process that runs the
/// benchmark, after printing the setting.
pub fn run_as_deployed() {
    match std::env::var("GLIBC_TUNABLES") {
        Ok(t) => println!(
            "malloc: GLIBC_TUNABLES={t:?} (the systemd unit sets {:?})",
            unit_tunables()
        ),
        Err(_) => {
            use std::os::unix::process::CommandExt as _;
            let error = Command::new(std::env::current_exe().unwrap())
                .args(std::env::args_os().skip(1))
                .env("GLIBC_TUNABLES", unit_tunables())
                .exec();
            panic!("re-executing the benchmark failed: {error}");
        }
    }
}
