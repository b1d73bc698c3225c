//! Refusals at the protocol level: requests and connections answered before any CRI handling
//! ([`super::conn`], [`super::Proxy::refuse`], [`super::relay`]). Each is counted in
//! `pullgate_protocol_refusals_total{reason}` and logged at warn, at most one line per reason every
//! [`LOG_EVERY`], with the number held back.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::node::metrics::Metrics;
use crate::node::ratelimit::LogLimiter;

/// At most one warn line per reason this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a client was refused: the fixed set of `reason` labels of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// An HTTP/1 request on the CRI socket (answered `505`).
    Http1,
    /// A connection that did not start with the HTTP/2 preface (answered `GOAWAY`).
    BadPreface,
    /// A `:path` that is not a gRPC method path (answered `UNIMPLEMENTED`).
    BadMethodPath,
    /// A request without `:method`, `:scheme` or `:path` (stream reset).
    MissingPseudoHeader,
    /// A pseudo-header that is repeated, unknown, out of place, or has a value `h2` cannot parse.
    BadPseudoHeader,
    /// A connection-specific header (`connection`, `upgrade`, `te` other than `trailers`, …).
    ConnectionHeader,
    /// A header name or value with bytes HTTP/2 does not allow (the whole connection is closed).
    InvalidHeader,
    /// A header list larger than the server's limit.
    HeaderListTooLarge,
    /// A header block that cannot be framed or decoded: CONTINUATION rules broken, padding wrong,
    /// HPACK invalid (the whole connection is closed).
    BadHeaderBlock,
    /// A stream over the per-connection limit of concurrent streams (`REFUSED_STREAM`).
    StreamRefused,
    /// Any other stream reset with an error code (flow control, stream state, …).
    StreamError,
    /// Any other connection closed with an error code (`GOAWAY`).
    ConnectionError,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Http1 => "http1",
            Refusal::BadPreface => "bad_preface",
            Refusal::BadMethodPath => "bad_method_path",
            Refusal::MissingPseudoHeader => "missing_pseudo_header",
            Refusal::BadPseudoHeader => "bad_pseudo_header",
            Refusal::ConnectionHeader => "connection_header",
            Refusal::InvalidHeader => "invalid_header",
            Refusal::HeaderListTooLarge => "header_list_too_large",
            Refusal::BadHeaderBlock => "bad_header_block",
            Refusal::StreamRefused => "stream_refused",
            Refusal::StreamError => "stream_error",
            Refusal::ConnectionError => "connection_error",
        }
    }

    /// Every reason, for documentation and tests.
    pub const ALL: [Refusal; 12] = [
        Refusal::Http1,
        Refusal::BadPreface,
        Refusal::BadMethodPath,
        Refusal::MissingPseudoHeader,
        Refusal::BadPseudoHeader,
        Refusal::ConnectionHeader,
        Refusal::InvalidHeader,
        Refusal::HeaderListTooLarge,
        Refusal::BadHeaderBlock,
        Refusal::StreamRefused,
        Refusal::StreamError,
        Refusal::ConnectionError,
    ];
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts and logs refusals; one per proxy, shared by every connection.
pub struct Refusals {
    metrics: Arc<Metrics>,
    log: LogLimiter,
}

impl Refusals {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Refusals {
            metrics,
            log: LogLimiter::new(LOG_EVERY),
        }
    }

    /// Counts one refusal and logs it at warn unless this reason was logged within [`LOG_EVERY`].
    /// `detail` says what was refused and how; it must never carry header values that may be
    /// credentials.
    pub fn refuse(&self, reason: Refusal, detail: fmt::Arguments<'_>) {
        self.metrics.protocol_refusal(reason.as_str());
        if let Some(held) = self.log.check(reason.as_str()) {
            tracing::warn!(
                reason = reason.as_str(),
                suppressed = held,
                "refused a client at the protocol level: {detail}{}",
                if held > 0 {
                    format!(" ({held} more since the last report)")
                } else {
                    String::new()
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_counted() {
        let labels: std::collections::BTreeSet<&str> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        let metrics = Arc::new(Metrics::default());
        let r = Refusals::new(metrics.clone());
        for _ in 0..3 {
            r.refuse(Refusal::BadPreface, format_args!("test"));
        }
        let text = metrics.render(0, None, false);
        assert!(
            text.contains("pullgate_protocol_refusals_total{reason=\"bad_preface\"} 3"),
            "{text}"
        );
    }
}
