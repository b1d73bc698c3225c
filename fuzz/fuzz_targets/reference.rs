//! Fuzz target: the image reference parser never panics, and whatever it accepts round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullgate::policy::Reference;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(r) = Reference::parse(s)
    {
        let shown = r.to_string();
        let again = Reference::parse(&shown).expect("a normalised reference must parse again");
        assert_eq!(again, r, "display then parse must be the identity");
        let _ = r.familiar();
    }
});
