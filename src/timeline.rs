//! A migration's timeline: its [`Gauges`] sampled at a fixed interval by one thread, kept in
//! the report (and drawn by `postcopy plot`), and the progress line an operator reads.
//!
//! Samples hold running totals, so a rate is the difference of two samples. At most
//! [`MAX_SAMPLES`] are kept: past that, every other one is dropped and the interval doubles
//! (an hour-long migration keeps the same shape at a coarser grain; memory is fixed at start).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dest::gauges::{Gauges, Phase, Totals};

/// The most samples a timeline keeps.
pub const MAX_SAMPLES: usize = 4096;
/// The interval a timeline starts with.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The gauges at one instant.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Milliseconds since the timeline began.
    pub t_ms: u64,
    /// The phase then.
    pub phase: Phase,
    /// Pages present in the destination's memory then.
    pub pages_present: u64,
    /// The running totals then.
    #[serde(flatten)]
    pub totals: Totals,
}

/// A phase's span on the timeline.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    /// The phase.
    pub phase: Phase,
    /// Its first sample's time, ms.
    pub start_ms: u64,
    /// The next phase's first sample's time (or the last sample's), ms.
    pub end_ms: u64,
}

/// The samples of one migration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// The interval between samples, ms (it doubles when the samples would exceed
    /// [`MAX_SAMPLES`]).
    pub interval_ms: u64,
    /// Pages of the memory migrated.
    pub pages_total: u64,
    /// Bytes per page.
    pub page_bytes: u64,
    /// The samples, oldest first.
    pub samples: Vec<Sample>,
}

impl Timeline {
    fn new(interval: Duration, pages_total: u64, page_bytes: u64) -> Timeline {
        Timeline {
            interval_ms: interval.as_millis() as u64,
            pages_total,
            page_bytes,
            samples: Vec::with_capacity(MAX_SAMPLES + 1),
        }
    }

    /// Adds a sample (thinning the older ones when full).
    fn push(&mut self, s: Sample) {
        if self.samples.len() >= MAX_SAMPLES {
            let mut i = 0;
            self.samples.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.interval_ms *= 2;
        }
        self.samples.push(s);
    }

    /// The phases in the order they came, with their spans.
    pub fn spans(&self) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        for s in &self.samples {
            match spans.last_mut() {
                Some(last) if last.phase == s.phase => last.end_ms = s.t_ms,
                Some(last) => {
                    last.end_ms = s.t_ms;
                    spans.push(Span {
                        phase: s.phase,
                        start_ms: s.t_ms,
                        end_ms: s.t_ms,
                    });
                }
                None => spans.push(Span {
                    phase: s.phase,
                    start_ms: s.t_ms,
                    end_ms: s.t_ms,
                }),
            }
        }
        spans
    }
}

/// How the sampler reports as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing.
    Quiet,
    /// A line when a link breaks and when it comes back.
    Links,
    /// Those, and a progress line redrawn in place (a terminal).
    Line,
}

/// The thread that samples a migration's gauges until [`Sampler::finish`].
pub struct Sampler {
    done: crossbeam_channel::Sender<()>,
    thread: std::thread::JoinHandle<Timeline>,
}

impl Sampler {
    /// Samples `gauges` (and `present()`, the pages present) every [`INTERVAL`].
    pub fn start(
        gauges: Arc<Gauges>,
        present: Box<dyn Fn() -> u64 + Send>,
        (pages_total, page_bytes): (u64, u64),
        progress: Progress,
    ) -> Sampler {
        let (done, done_rx) = crossbeam_channel::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("timeline".into())
            .spawn(move || {
                let mut run = Run {
                    timeline: Timeline::new(INTERVAL, pages_total, page_bytes),
                    started: Instant::now(),
                    gauges,
                    present,
                    progress,
                    down_since: None,
                };
                let tick = crossbeam_channel::tick(INTERVAL);
                loop {
                    run.sample();
                    crossbeam_channel::select! {
                        recv(tick) -> _ => {}
                        recv(done_rx) -> _ => break,
                    }
                }
                run.sample();
                if progress == Progress::Line {
                    eprint!("\r{:100}\r", "");
                    let _ = std::io::stderr().flush();
                }
                run.timeline
            })
            .expect("spawn the timeline thread");
        Sampler { done, thread }
    }

    /// Takes a last sample and returns the timeline.
    pub fn finish(self) -> Timeline {
        let _ = self.done.send(());
        self.thread.join().unwrap_or_default()
    }
}

/// The sampling thread's state.
struct Run {
    timeline: Timeline,
    started: Instant,
    gauges: Arc<Gauges>,
    present: Box<dyn Fn() -> u64 + Send>,
    progress: Progress,
    /// When the links went down (some connection being reopened), if they are.
    down_since: Option<(Instant, u64)>,
}

impl Run {
    fn sample(&mut self) {
        let s = Sample {
            t_ms: self.started.elapsed().as_millis() as u64,
            phase: self.gauges.phase(),
            pages_present: (self.present)(),
            totals: self.gauges.totals(),
        };
        self.gauges
            .set_present(s.pages_present, self.timeline.pages_total);
        self.timeline.push(s);
        if self.progress != Progress::Quiet {
            self.report_links(&s);
        }
        if self.progress == Progress::Line {
            eprint!(
                "\r{:100}\r  {}",
                "",
                progress_line(&self.timeline, &s, self.down_since)
            );
            let _ = std::io::stderr().flush();
        }
    }

    /// One line when the links go down, one when they are all back.
    fn report_links(&mut self, s: &Sample) {
        let clear = if self.progress == Progress::Line {
            "\r\x1b[K"
        } else {
            ""
        };
        match (self.down_since, s.totals.links_down) {
            (None, n) if n > 0 => {
                eprint!("{clear}");
                crate::warn!(
                    "",
                    "{n} connection(s) to the source broke in {}: reconnecting",
                    s.phase.name()
                );
                self.down_since = Some((Instant::now(), s.totals.recoveries));
            }
            (Some((since, _)), 0) => {
                eprint!("{clear}");
                crate::info!(
                    "",
                    "the source is back after {:.1} s; the migration goes on",
                    since.elapsed().as_secs_f64()
                );
                self.down_since = None;
            }
            _ => {}
        }
    }
}

/// The progress line of sample `s`: phase, pages, rate, ETA (and a link down, if one is).
fn progress_line(t: &Timeline, s: &Sample, down: Option<(Instant, u64)>) -> String {
    let total = t.pages_total.max(1);
    let pct = s.pages_present as f64 * 100.0 / total as f64;
    let left = t.pages_total.saturating_sub(s.pages_present);
    // The rate over the last second.
    let back = (1000 / t.interval_ms.max(1)) as usize;
    let earlier = t.samples.len().checked_sub(back + 1).map(|i| t.samples[i]);
    let (rate_pages_s, rate_mib_s) = earlier.map_or((0.0, 0.0), |e| {
        let secs = (s.t_ms.saturating_sub(e.t_ms)) as f64 / 1000.0;
        let pages = s.pages_present.saturating_sub(e.pages_present) as f64 / secs.max(1e-3);
        let bytes = s
            .totals
            .bytes_received
            .saturating_sub(e.totals.bytes_received) as f64;
        (pages, bytes / secs.max(1e-3) / f64::from(1 << 20))
    });
    let eta = if rate_pages_s > 0.0 {
        format!("ETA {:.1} s", left as f64 / rate_pages_s)
    } else {
        "ETA -".into()
    };
    let phase = match s.phase {
        Phase::Precopy => format!("precopy round {}", s.totals.precopy_round.max(1)),
        p => p.name().to_string(),
    };
    let link = down.map_or(String::new(), |(since, _)| {
        format!(
            "  RECOVERING: {} link(s) down for {:.1} s",
            s.totals.links_down,
            since.elapsed().as_secs_f64()
        )
    });
    format!(
        "{phase:<16} {pct:>5.1}%  {left} pages left  {rate_mib_s:>6.0} MiB/s  {eta}  faults {}{link}",
        s.totals.faults
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_ms: u64, phase: Phase, present: u64) -> Sample {
        Sample {
            t_ms,
            phase,
            pages_present: present,
            totals: Totals::default(),
        }
    }

    #[test]
    fn a_full_timeline_thins_to_every_other_sample_and_doubles_its_interval() {
        let mut t = Timeline::new(INTERVAL, 10, 4096);
        for i in 0..(MAX_SAMPLES as u64 + 1) {
            t.push(sample(i * 100, Phase::Postcopy, i));
        }
        assert_eq!(t.interval_ms, 200);
        assert_eq!(t.samples.len(), MAX_SAMPLES / 2 + 1);
        assert!(t.samples.windows(2).all(|w| w[1].t_ms > w[0].t_ms));
        assert_eq!(t.samples.last().unwrap().t_ms, MAX_SAMPLES as u64 * 100);
    }

    #[test]
    fn spans_follow_the_phases_in_order() {
        let mut t = Timeline::new(INTERVAL, 10, 4096);
        for (ms, p) in [
            (0, Phase::Connecting),
            (100, Phase::Precopy),
            (200, Phase::Precopy),
            (300, Phase::Postcopy),
            (400, Phase::Done),
        ] {
            t.push(sample(ms, p, 0));
        }
        let spans = t.spans();
        let names: Vec<_> = spans
            .iter()
            .map(|s| (s.phase, s.start_ms, s.end_ms))
            .collect();
        assert_eq!(
            names,
            [
                (Phase::Connecting, 0, 100),
                (Phase::Precopy, 100, 300),
                (Phase::Postcopy, 300, 400),
                (Phase::Done, 400, 400)
            ]
        );
    }

    #[test]
    fn the_progress_line_names_phase_rate_and_eta() {
        let mut t = Timeline::new(INTERVAL, 1000, 4096);
        for i in 0..=10u64 {
            let mut s = sample(i * 100, Phase::Postcopy, i * 50);
            s.totals.bytes_received = i * 50 * 4096;
            t.push(s);
        }
        let line = progress_line(&t, t.samples.last().unwrap(), None);
        assert!(line.starts_with("postcopy"), "{line}");
        assert!(
            line.contains("50.0%") && line.contains("500 pages left"),
            "{line}"
        );
        assert!(line.contains("ETA 1.0 s"), "{line}");
    }
}
