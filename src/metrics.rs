//! `--metrics HOST:PORT`: what a running `serve`, `handler` or `demo` is doing, served at
//! `/metrics` in the Prometheus text format (OpenMetrics), for a scraper.
//!
//! A command hands [`serve`] a function that reads its live counters ([`Family`] per metric)
//! at each scrape; nothing is counted twice or kept apart from the migration's own counters.
//! The encoding is `prometheus-client`'s, the HTTP side `tiny_http`'s (one thread).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::dest::gauges::{Gauges, Phase};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be listened on.
    #[error("--metrics: cannot listen on {addr}: {why}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
}

/// Counter or gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One metric: its samples, one per label set.
#[derive(Clone, Debug)]
pub struct Family {
    /// Its name, without `postcopy_` (added) or `_total` (added to counters).
    pub name: &'static str,
    /// What it measures.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label sets and values.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

impl Family {
    /// An empty family.
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample.
    pub fn add(&mut self, labels: Vec<(&'static str, String)>, value: u64) {
        self.samples.push((labels, value));
    }
}

/// Reads the live counters at each scrape.
pub type Read = dyn Fn() -> Vec<Family> + Send + Sync;

struct ReadCollector(Arc<Read>);

impl std::fmt::Debug for ReadCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadCollector")
    }
}

impl Collector for ReadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for fam in (self.0)() {
            let kind = match fam.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut m = encoder.encode_descriptor(fam.name, fam.help, None, kind)?;
            for (labels, value) in &fam.samples {
                let e = m.encode_family(labels)?;
                match fam.kind {
                    Kind::Counter => ConstCounter::new(*value).encode(e)?,
                    Kind::Gauge => ConstGauge::new(*value as i64).encode(e)?,
                }
            }
        }
        Ok(())
    }
}

/// The text of one scrape.
pub fn encode(read: &Arc<Read>) -> String {
    let mut registry = Registry::with_prefix("postcopy");
    registry.register_collector(Box::new(ReadCollector(read.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Serves `/metrics` on `addr` from a thread of its own for the life of the process;
/// returns the address bound (port 0 picks one).
pub fn serve(addr: &str, read: Arc<Read>) -> Result<std::net::SocketAddr, MetricsError> {
    let err = |why: String| MetricsError::Listen {
        addr: addr.to_string(),
        why,
    };
    let server = tiny_http::Server::http(addr).map_err(|e| err(e.to_string()))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| err("not an IP address".into()))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(encode(&read)).with_header(header)
                } else {
                    tiny_http::Response::from_string("postcopy: metrics are at /metrics\n")
                        .with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| err(e.to_string()))?;
    Ok(bound)
}

/// The migrations running now, each by a label value (a VMM's pid, a session): what a
/// long-running command's `/metrics` shows. A migration leaves when its gauges are dropped.
#[derive(Debug, Default)]
pub struct Live {
    migrations: std::sync::Mutex<Vec<(String, std::sync::Weak<Gauges>)>>,
}

impl Live {
    /// Shows `gauges` as `id` while they live.
    pub fn add(&self, id: String, gauges: &Arc<Gauges>) {
        let mut m = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(_, g)| g.strong_count() > 0);
        m.push((id, Arc::downgrade(gauges)));
    }

    /// The migrations still running.
    pub fn now(&self) -> Vec<(String, Arc<Gauges>)> {
        let m = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter_map(|(id, g)| Some((id.clone(), g.upgrade()?)))
            .collect()
    }
}

/// The families of destination migrations: each `(label value, gauges)` becomes samples
/// labelled `label="value"`.
pub fn migration_families(
    label: &'static str,
    migrations: &[(String, Arc<Gauges>)],
) -> Vec<Family> {
    let mut phase = Family::new("phase", "1 for the phase the migration is in", Kind::Gauge);
    let mut pages = Family::new("pages", "pages of the memory migrated", Kind::Gauge);
    let mut present = Family::new(
        "pages_present",
        "pages present in the destination's memory",
        Kind::Gauge,
    );
    let mut placed = Family::new(
        "pages_placed",
        "pages placed, by the path they came by",
        Kind::Counter,
    );
    let mut faults = Family::new(
        "faults",
        "fault events read from the userfaultfd",
        Kind::Counter,
    );
    let mut bytes = Family::new(
        "received_bytes",
        "bytes received from the source",
        Kind::Counter,
    );
    let mut recoveries = Family::new(
        "recoveries",
        "connections reopened after a break",
        Kind::Counter,
    );
    let mut down = Family::new(
        "links_down",
        "connections down and being reopened now",
        Kind::Gauge,
    );
    let mut round = Family::new(
        "precopy_round",
        "the precopy round being received",
        Kind::Gauge,
    );
    for (id, g) in migrations {
        let l = || vec![(label, id.clone())];
        let (pages_present, pages_total) = g.present();
        let now = g.phase();
        for p in Phase::ALL {
            let mut labels = l();
            labels.push(("phase", p.name().to_string()));
            phase.add(labels, u64::from(p == now));
        }
        let t = g.totals();
        pages.add(l(), pages_total);
        present.add(l(), pages_present);
        for (path, v) in [
            ("fault", t.pages_by_fault),
            ("stream", t.pages_by_stream),
            ("precopy", t.pages_by_precopy),
            ("zero_map", t.pages_by_zero_map),
            ("working_set", t.pages_by_working_set),
        ] {
            let mut labels = l();
            labels.push(("path", path.to_string()));
            placed.add(labels, v);
        }
        faults.add(l(), t.faults);
        bytes.add(l(), t.bytes_received);
        recoveries.add(l(), t.recoveries);
        down.add(l(), t.links_down);
        round.add(l(), t.precopy_round);
    }
    vec![
        phase, pages, present, placed, faults, bytes, recoveries, down, round,
    ]
}

/// The families of a source's sessions: those being served, per session, and a count of
/// those ended.
pub fn source_families(view: &crate::source::SessionsView) -> Vec<Family> {
    let (live, ended) = view.now();
    let mut active = Family::new("source_sessions", "sessions being served", Kind::Gauge);
    let mut ended_f = Family::new("source_sessions_ended", "sessions ended", Kind::Counter);
    let mut sent = Family::new(
        "source_pages_sent",
        "pages sent, by the path they went by",
        Kind::Counter,
    );
    let mut bytes = Family::new("source_sent_bytes", "bytes sent", Kind::Counter);
    let mut requests = Family::new("source_requests", "page requests received", Kind::Counter);
    let mut recoveries = Family::new(
        "source_recoveries",
        "connections that rejoined after a break",
        Kind::Counter,
    );
    let mut switched = Family::new(
        "source_switched_over",
        "1 once the session switched over to postcopy",
        Kind::Gauge,
    );
    active.add(Vec::new(), live.len() as u64);
    ended_f.add(Vec::new(), ended as u64);
    for r in &live {
        let l = || vec![("session", format!("{:#x}", r.session))];
        for (path, v) in [("urgent", r.pages_urgent), ("stream", r.pages_stream)] {
            let mut labels = l();
            labels.push(("path", path.to_string()));
            sent.add(labels, v);
        }
        bytes.add(l(), r.bytes_sent);
        requests.add(l(), r.requests);
        recoveries.add(l(), r.recoveries);
        switched.add(l(), u64::from(r.switched_over));
    }
    vec![active, ended_f, sent, bytes, requests, recoveries, switched]
}

/// A strict reading of the text format (what the tests check a scrape with, where `promtool`
/// is not at hand): every line is a HELP, a TYPE, `# EOF` (last), or a sample of a family
/// declared above it, `name{label="value",...} number`. Returns the samples.
pub fn check_text(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("no # EOF at the end".into());
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (n, t) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            if !name_ok(n) || !["counter", "gauge", "histogram"].contains(&t) {
                return Err(format!("bad TYPE: {line}"));
            }
            families.push((n.to_string(), t.to_string()));
        } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or(format!("bad sample: {line}"))?;
            let value: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
            let name = series.split('{').next().unwrap_or("");
            if !name_ok(name) {
                return Err(format!("bad name: {line}"));
            }
            if let Some(labels) = series.strip_prefix(name) {
                let braced = labels.starts_with('{') && labels.ends_with('}');
                if !labels.is_empty() && !braced {
                    return Err(format!("bad labels: {line}"));
                }
            }
            let declared = families
                .iter()
                .any(|(f, t)| name == f || (t == "counter" && name == format!("{f}_total")));
            if !declared {
                return Err(format!("a sample of no declared family: {line}"));
            }
            samples.push((series.to_string(), value));
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrations_families_encode_as_valid_text_that_follows_the_counters() {
        let g = Arc::new(Gauges::default());
        g.set_phase(Phase::Postcopy);
        let s = crate::dest::WorkerStats {
            pages_by_fault: 7,
            fault_events: 9,
            ..Default::default()
        };
        g.publish(0, &s);
        g.set_present(40, 100);
        let read: Arc<Read> = {
            let g = g.clone();
            Arc::new(move || migration_families("migration", &[("m1".into(), g.clone())]))
        };
        let text = encode(&read);
        let samples = check_text(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |series: &str| samples.iter().find(|(s, _)| s == series).map(|s| s.1);
        assert_eq!(
            get(r#"postcopy_pages_placed_total{migration="m1",path="fault"}"#),
            Some(7.0)
        );
        assert_eq!(get(r#"postcopy_faults_total{migration="m1"}"#), Some(9.0));
        assert_eq!(
            get(r#"postcopy_phase{migration="m1",phase="postcopy"}"#),
            Some(1.0)
        );
        assert_eq!(
            get(r#"postcopy_phase{migration="m1",phase="precopy"}"#),
            Some(0.0)
        );
        assert_eq!(get(r#"postcopy_pages_present{migration="m1"}"#), Some(40.0));
    }
}
