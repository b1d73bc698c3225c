//! Fuzz target: the bundle parser (format, validation, index) never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullgate::policy::parse_bundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = parse_bundle(data) {
        // Exercise the index of whatever parsed.
        for e in bundle.images() {
            let _ = bundle.entries(e.source());
            let _ = e.lifecycles().count();
        }
        for x in bundle.exceptions() {
            let _ = bundle.exceptions_for(&x.source);
        }
        let _ = pullgate::policy::rollout::wave(&bundle, b"node", bundle.issued_at);
        let _ = pullgate::policy::diff::diff(&bundle, &bundle);
    }
});
