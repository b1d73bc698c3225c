//! SPDX licence expressions: strict parsing against the SPDX licence list (format 2 bundles) and
//! evaluation of an image's expression against a scope's licence rule.
//!
//! Parsing and evaluation are the `spdx` crate's; this module owns what pullgate means by them:
//!
//! - identifiers must be on the SPDX list as the list writes them (case-sensitive), not deprecated
//!   (`GPL-2.0` is rejected: write `GPL-2.0-only` or `GPL-2.0-or-later`); `LicenseRef-…` (and
//!   `DocumentRef-…:LicenseRef-…`) stand for licences that are not on the list;
//! - a licence *requirement* is judged by its licence alone: `X WITH exception` as `X` (an exception
//!   only adds permissions) and `X+` as `X` (the licensee may choose `X` itself);
//! - `OR` is satisfied by any permitted choice, `AND` needs every part (the crate's evaluation).

use std::fmt;

use spdx::{Expression, LicenseItem, LicenseReq, ParseMode};

/// A licence expression that parsed strictly.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseExpression(Expression);

impl LicenseExpression {
    /// Parses `text` strictly: every identifier must be on the SPDX licence list, not deprecated.
    pub fn parse(text: &str) -> Result<LicenseExpression, String> {
        Expression::parse_mode(text, ParseMode::STRICT)
            .map(LicenseExpression)
            .map_err(|e| {
                let term = text.get(e.span.clone()).unwrap_or("").trim();
                let hint = match e.reason {
                    spdx::error::Reason::DeprecatedLicenseId => {
                        " (write the current identifier, e.g. GPL-2.0-only or GPL-2.0-or-later for GPL-2.0)"
                    }
                    spdx::error::Reason::UnknownLicense | spdx::error::Reason::UnknownTerm => {
                        " (not on the SPDX licence list; identifiers are case-sensitive, and a licence that is not on the list is written LicenseRef-<name>)"
                    }
                    _ => "",
                };
                if term.is_empty() {
                    format!("{}{hint}", e.reason)
                } else {
                    format!("{} \"{term}\"{hint}", e.reason)
                }
            })
    }

    /// True when the expression can be satisfied using only licences for which `permitted` holds.
    pub fn satisfied_by(&self, mut permitted: impl FnMut(&str) -> bool) -> bool {
        self.0.evaluate(|req| permitted(&licence_key(req)))
    }

    /// The licences of the expression (each once, in order of appearance), as rules name them.
    pub fn licences(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.0.requirements() {
            let k = licence_key(&r.req);
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }
}

impl fmt::Display for LicenseExpression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How a rule names the licence of a requirement: the SPDX identifier without `+` or `WITH …`, or
/// the `LicenseRef-…` as written.
fn licence_key(req: &LicenseReq) -> String {
    match &req.license {
        LicenseItem::Spdx { id, .. } => id.name.to_owned(),
        LicenseItem::Other(r) => r.to_string(),
    }
}

/// Checks one identifier of a licence rule: an SPDX licence identifier on the list (not deprecated,
/// without `+` or `WITH`), or a `LicenseRef-…`. Returns it as rules compare it.
pub fn parse_identifier(text: &str) -> Result<String, String> {
    let e = LicenseExpression::parse(text)?;
    let mut reqs = e.0.requirements();
    match (reqs.next(), reqs.next()) {
        (Some(r), None)
            if r.req.addition.is_none()
                && !matches!(r.req.license, LicenseItem::Spdx { or_later: true, .. })
                && licence_key(&r.req) == text.trim() =>
        {
            Ok(licence_key(&r.req))
        }
        _ => Err(
            "a rule lists single licence identifiers (e.g. \"MIT\", \"GPL-2.0-only\", \"LicenseRef-acme\"), not expressions, `+` or `WITH`"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(expr: &str, ok: &[&str]) -> bool {
        LicenseExpression::parse(expr)
            .unwrap()
            .satisfied_by(|l| ok.contains(&l))
    }

    #[test]
    fn or_needs_one_choice_and_needs_every_part() {
        assert!(allowed("MIT OR GPL-3.0-only", &["MIT"]));
        assert!(allowed("MIT OR GPL-3.0-only", &["GPL-3.0-only"]));
        assert!(!allowed("MIT OR GPL-3.0-only", &["Apache-2.0"]));
        assert!(!allowed("MIT AND GPL-3.0-only", &["MIT"]));
        assert!(allowed("MIT AND GPL-3.0-only", &["MIT", "GPL-3.0-only"]));
        assert!(allowed(
            "(MIT OR Apache-2.0) AND BSD-3-Clause",
            &["Apache-2.0", "BSD-3-Clause"]
        ));
        assert!(allowed("Apache-2.0 WITH LLVM-exception", &["Apache-2.0"]));
        assert!(allowed("LicenseRef-acme OR MIT", &["LicenseRef-acme"]));
        assert!(!allowed("LicenseRef-acme", &["LicenseRef-other", "MIT"]));
        let e = LicenseExpression::parse("MIT AND (Zlib OR MIT)").unwrap();
        assert_eq!(e.licences(), vec!["MIT", "Zlib"]);
    }

    #[test]
    fn the_documented_licence_list_is_the_one_used() {
        let doc = include_str!("../../docs/bundle.md");
        let v = spdx::license_version();
        assert!(
            doc.contains(&format!("list version {v}")),
            "docs/bundle.md should name SPDX licence list {v}"
        );
    }

    #[test]
    fn identifiers_must_be_on_the_list() {
        for bad in [
            "GPL-2.0",
            "mit",
            "NotALicence",
            "MIT OR",
            "",
            "Apache-2.0 WITH Nope",
        ] {
            assert!(LicenseExpression::parse(bad).is_err(), "{bad}");
        }
        let e = LicenseExpression::parse("GPL-2.0").unwrap_err();
        assert!(e.contains("GPL-2.0-only"), "{e}");
        let e = LicenseExpression::parse("MIT OR Foo").unwrap_err();
        assert!(e.contains("\"Foo\"") && e.contains("LicenseRef"), "{e}");
        assert_eq!(parse_identifier("MIT").unwrap(), "MIT");
        assert_eq!(
            parse_identifier("LicenseRef-acme-eula").unwrap(),
            "LicenseRef-acme-eula"
        );
        for bad in [
            "MIT OR Apache-2.0",
            "Apache-2.0+",
            "Apache-2.0 WITH LLVM-exception",
            "Foo",
        ] {
            assert!(parse_identifier(bad).is_err(), "{bad}");
        }
    }
}
