//! Starting, serving and ending the engine: registration of every shard, the worker threads
//! (prepared during precopy, released at the switchover), and the report.

use super::config::EngineConfig;
use super::connect::Connected;
use super::error::{io_err, DestError};
use super::ram::DestRam;
use super::stats::{EngineReport, JobEnd, WorkerStats};
use super::worker;
use crate::layout::shard;
use crate::sys::uffd;
use crate::sys::uffd::Uffd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A thread's end, reported over the control plane.
type WorkerExit = (usize, JobEnd);

/// The engine: builds the workers.
pub struct Engine;

/// A running engine.
pub struct EngineHandle {
    workers: usize,
    /// The worker each thread serves (a worker may have several threads).
    worker_of: Vec<usize>,
    threads: Vec<std::thread::JoinHandle<()>>,
    exits: crossbeam_channel::Receiver<WorkerExit>,
    stop: Arc<AtomicBool>,
    started: Instant,
    last_placed_ns: Arc<AtomicU64>,
    ready: Arc<std::sync::atomic::AtomicUsize>,
    first_served_ns: Arc<AtomicU64>,
    /// Nanoseconds after `started` at which `enable_notify` released the workers.
    notified_ns: u64,
    /// The memory being filled.
    pub ram: Arc<DestRam>,
}

/// State shared by the workers (control plane only).
pub(crate) struct Shared {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) started: Instant,
    /// Nanoseconds after `started` at which some worker placed its shard's last page.
    pub(crate) last_placed_ns: Arc<AtomicU64>,
    /// Streams that may run at once; a bulk half takes one before its first read and gives
    /// it back when its stream ends.
    pub(crate) stream_slots: std::sync::atomic::AtomicUsize,
    /// Threads that finished their set-up (connection, ring, temp pages).
    pub(crate) ready: Arc<std::sync::atomic::AtomicUsize>,
    /// Nanoseconds after `started` at which the first fault was answered (0: none yet).
    pub(crate) first_served_ns: Arc<AtomicU64>,
    /// The receiver-driven stream's fault counters (with a fault-latency target).
    pub(crate) pacer: Option<super::pacer::FaultPacer>,
}

/// A userfaultfd (with `UFFDIO_API` done) registered MISSING on pages `[start, end)` of every
/// block where `shard(block)` gives that range.
pub(crate) fn register_shard(
    ram: &DestRam,
    shard_of: impl Fn(u64) -> (u64, u64),
) -> Result<Uffd, DestError> {
    let u = Uffd::open(false)?;
    u.api(uffd::feature::THREAD_ID)?;
    for (b, block) in ram.layout.blocks.iter().enumerate() {
        let (start, end) = shard_of(block.pages());
        if start == end {
            continue;
        }
        let ps = block.page_size as usize;
        // Shared memory: a page in the page cache faults MINOR (mapped with UFFDIO_CONTINUE),
        // a hole (a discarded page) MISSING; private memory only ever faults MISSING.
        let (mode, need, name) = match ram.shared_block(b) {
            Some(_) => (
                uffd::mode::MISSING | uffd::mode::MINOR,
                uffd::ioctl_bit::CONTINUE,
                "UFFDIO_CONTINUE",
            ),
            None => (uffd::mode::MISSING, uffd::ioctl_bit::COPY, "UFFDIO_COPY"),
        };
        let ioctls = u.register(
            ram.regions[b].addr() + start as usize * ps,
            (end - start) as usize * ps,
            mode,
        )?;
        if ioctls & need == 0 {
            return Err(DestError::Unsupported(format!(
                "block {:?}: {name} not offered on this memory ({} memory needs Linux 5.14+; see postcopy probe)",
                block.name,
                ram.memory().name()
            )));
        }
    }
    Ok(u)
}

/// A thread body of an engine: returns its counters and the error that ended it, if one did.
pub(crate) type Job = Box<dyn FnOnce(Arc<Shared>) -> JobEnd + Send>;

/// A [`Job`] from a body that keeps no counters when it fails.
pub(crate) fn job(
    f: impl FnOnce(Arc<Shared>) -> Result<WorkerStats, DestError> + Send + 'static,
) -> Job {
    Box::new(move |shared| match f(shared) {
        Ok(stats) => (stats, Ok(())),
        Err(e) => (WorkerStats::default(), Err(e)),
    })
}

/// How an engine ended: its report (every thread's counters, whatever happened) and the first
/// error, if any. [`EngineHandle::wait`] makes it a `Result`; a caller that reports on every exit
/// path (the handler) keeps both.
#[derive(Debug)]
pub struct EngineEnd {
    /// The counters and times (for a failed run: up to the failure).
    pub report: EngineReport,
    /// The first error to arrive (it stopped the other threads).
    pub error: Option<DestError>,
}

impl EngineEnd {
    /// The report if the engine ended without an error.
    pub fn into_result(self) -> Result<EngineReport, DestError> {
        match self.error {
            None => Ok(self.report),
            Some(e) => Err(e),
        }
    }
}

impl EngineHandle {
    /// Starts `jobs` (name, body) on their own threads with shared control-plane state.
    pub(crate) fn spawn(
        ram: Arc<DestRam>,
        workers: usize,
        stream_slots: usize,
        fault_latency_target: Option<std::time::Duration>,
        jobs: Vec<(String, usize, Job)>,
    ) -> Result<EngineHandle, DestError> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let shared = Arc::new(Shared {
            stop: stop.clone(),
            started,
            last_placed_ns: Arc::new(AtomicU64::new(0)),
            stream_slots: std::sync::atomic::AtomicUsize::new(stream_slots),
            ready: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            first_served_ns: Arc::new(AtomicU64::new(0)),
            pacer: fault_latency_target.map(super::pacer::FaultPacer::new),
        });
        let (exit_tx, exits) = crossbeam_channel::bounded::<WorkerExit>(jobs.len());
        let mut threads = Vec::with_capacity(jobs.len());
        let worker_of: Vec<usize> = jobs.iter().map(|j| j.1).collect();
        for (w, (name, _, job)) in jobs.into_iter().enumerate() {
            let (exit_tx, shared) = (exit_tx.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let stop = shared.stop.clone();
                    let mut end = job(shared);
                    end.0.cpu_ns = crate::sys::thread_cpu_time().as_nanos() as u64;
                    if end.1.is_err() {
                        // One thread failing ends the migration: stop the others.
                        stop.store(true, Ordering::Release);
                    }
                    let _ = exit_tx.send((w, end));
                })
                .map_err(io_err("spawn engine thread"))?;
            threads.push(t);
        }
        Ok(EngineHandle {
            workers,
            worker_of,
            threads,
            exits,
            stop,
            started,
            last_placed_ns: shared.last_placed_ns.clone(),
            ready: shared.ready.clone(),
            first_served_ns: shared.first_served_ns.clone(),
            notified_ns: 0,
            ram,
        })
    }
}

impl Engine {
    /// Starts the engine's threads before the switchover: each connects to the source (joining
    /// the session), builds its io_uring and temp pages, and waits. Returns once all are ready
    /// (or with the first set-up error). Nothing is registered yet: during precopy the
    /// destination's memory stays plain memory. Then [`PreparedEngine::enable_notify`].
    pub fn prepare(
        connected: &Connected,
        ram: Arc<DestRam>,
        config: &EngineConfig,
    ) -> Result<PreparedEngine, DestError> {
        if ram.layout != connected.welcome.layout {
            return Err(DestError::Unsupported(
                "the destination RAM was built for another layout".into(),
            ));
        }
        let workers = config.workers;
        let session = connected.welcome.session;
        let halves: &[worker::Half] = if config.stream {
            &[worker::Half::Urgent, worker::Half::Bulk]
        } else {
            &[worker::Half::Urgent]
        };
        let mut jobs: Vec<(String, usize, Job)> = Vec::with_capacity(2 * workers);
        let mut gos = Vec::with_capacity(2 * workers);
        for w in 0..workers {
            for &half in halves {
                let (go_tx, go_rx) = crossbeam_channel::bounded(1);
                let takes_control = w == 0 && half == worker::Half::Urgent;
                gos.push((w, takes_control, go_tx));
                let setup = worker::Setup {
                    half,
                    id: w,
                    config: config.clone(),
                    session,
                    ram: ram.clone(),
                    takes_control,
                    go: go_rx,
                };
                let name = match half {
                    worker::Half::Urgent => format!("pc-urgent-{w}"),
                    worker::Half::Bulk => format!("pc-bulk-{w}"),
                };
                let job: Job = Box::new(move |shared| worker::run(setup, shared));
                jobs.push((name, w, job));
            }
        }
        let streams = match config.max_streams {
            0 => workers,
            n => n,
        };
        let target = config.fault_latency_target;
        let handle = EngineHandle::spawn(ram, workers, streams, target, jobs)?;
        // A connection whose handshake is cut is opened again, within the recovery timeout.
        let deadline = Instant::now() + config.connect_timeout + config.recovery_timeout;
        while handle.ready.load(Ordering::Acquire) < handle.threads.len() {
            if handle.threads.iter().any(|t| t.is_finished()) || Instant::now() >= deadline {
                // A thread failed its set-up (or is stuck connecting): report why.
                handle.stop();
                drop(gos);
                return Err(match handle.wait() {
                    Err(e) => e,
                    Ok(_) => DestError::Stopped,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(PreparedEngine {
            handle,
            gos,
            config: config.clone(),
        })
    }

    /// [`prepare`](Self::prepare) then [`PreparedEngine::enable_notify`]: for a destination
    /// without precopy.
    pub fn start(
        connected: Connected,
        ram: Arc<DestRam>,
        config: &EngineConfig,
    ) -> Result<EngineHandle, DestError> {
        Self::prepare(&connected, ram, config)?.enable_notify(connected)
    }
}

/// An engine whose threads are connected and set up, waiting for the switchover.
pub struct PreparedEngine {
    handle: EngineHandle,
    /// Per thread: (worker, takes the control connection, its `Go` sender).
    gos: Vec<(usize, bool, crossbeam_channel::Sender<worker::Go>)>,
    config: EngineConfig,
}

impl PreparedEngine {
    /// `enable_notify` for memory of another process whose userfaultfd was handed over (a
    /// VMM: `UFFDIO_API` done, its regions registered MISSING, maybe with `EVENT_REMOVE`): one
    /// worker serves it through that descriptor; nothing is registered here.
    pub fn enable_notify_external(
        self,
        connected: Connected,
        uffd: Uffd,
    ) -> Result<EngineHandle, DestError> {
        let PreparedEngine {
            mut handle,
            gos,
            config,
        } = self;
        if config.workers != 1 || !handle.ram.is_foreign() {
            handle.stop();
            drop(gos);
            let _ = handle.wait();
            return Err(DestError::Unsupported(
                "a handed-over userfaultfd is served by one worker, on DestRam::foreign memory"
                    .into(),
            ));
        }
        handle.notified_ns = handle.started.elapsed().as_nanos() as u64;
        let state = Arc::new(worker::ShardState::new(
            0,
            uffd,
            &handle.ram,
            1,
            config.stream,
            None,
            config.fault_latency_target.is_some(),
        ));
        let mut control = Some(connected.control);
        for (_, takes_control, go) in gos {
            let _ = go.send(worker::Go {
                state: state.clone(),
                control: if takes_control { control.take() } else { None },
            });
        }
        Ok(handle)
    }

    /// `enable_notify`: registers every worker's shard with its own userfaultfd (pages already
    /// received by precopy are present and never fault) and releases the workers. When this
    /// returns, every missing page of the memory faults into the engine. Only this runs in the
    /// downtime: the threads connected and built their rings in [`Engine::prepare`].
    pub fn enable_notify(self, connected: Connected) -> Result<EngineHandle, DestError> {
        let PreparedEngine {
            mut handle,
            gos,
            config,
        } = self;
        handle.notified_ns = handle.started.elapsed().as_nanos() as u64;
        let ram = handle.ram.clone();
        let workers = config.workers;
        if ram.is_foreign() {
            handle.stop();
            drop(gos);
            let _ = handle.wait();
            return Err(DestError::Unsupported(
                "another process's memory: use enable_notify_external with its userfaultfd".into(),
            ));
        }
        let registered = (|| {
            ram.prepare_discard()?;
            ram.drop_unreceived(connected.zero_map.as_deref())?;
            let mut uffds = Vec::with_capacity(workers);
            for w in 0..workers {
                uffds.push(register_shard(&ram, |pages| shard(pages, w, workers))?);
            }
            Ok(uffds)
        })();
        let uffds = match registered {
            Ok(u) => u,
            Err(e) => {
                handle.stop();
                drop(gos);
                let _ = handle.wait();
                return Err(e);
            }
        };
        let zero_map = connected.zero_map.map(Arc::new);
        let mut control = Some(connected.control);
        let states: Vec<Arc<worker::ShardState>> = uffds
            .into_iter()
            .enumerate()
            .map(|(w, uffd)| {
                Arc::new(worker::ShardState::new(
                    w,
                    uffd,
                    &ram,
                    workers,
                    config.stream,
                    zero_map.clone(),
                    config.fault_latency_target.is_some(),
                ))
            })
            .collect();
        for (w, takes_control, go) in gos {
            // A thread that died since `prepare` has dropped its receiver; `wait` reports it.
            let _ = go.send(worker::Go {
                state: states[w].clone(),
                control: if takes_control { control.take() } else { None },
            });
        }
        Ok(handle)
    }
}

impl EngineHandle {
    /// Asks the workers to stop (their uffds close; blocked faults then see zero pages).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether every worker has ended.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Waits for every worker; the first error to arrive wins (and stops the others).
    pub fn wait(self) -> Result<EngineReport, DestError> {
        self.wait_end().into_result()
    }

    /// Waits for every worker and reports how the engine ended, its counters kept on every
    /// exit path (complete, stopped, failed).
    pub fn wait_end(self) -> EngineEnd {
        let (stats, mut error) = self.collect();
        for t in self.threads {
            let _ = t.join();
        }
        let mut report = EngineReport {
            workers: self.workers,
            per_worker: vec![WorkerStats::default(); self.workers],
            ..Default::default()
        };
        for (thread, s) in stats.iter().enumerate() {
            report.totals.merge(s);
            report.per_worker[self.worker_of[thread]].merge(s);
        }
        // A worker that saw pages missing at its stop may have raced its sibling half's last
        // placement (placed, not yet marked): with every thread joined the bitmap is exact.
        if error.is_none() && stats.iter().any(|s| s.ended_early) && !self.ram.complete() {
            error = Some(DestError::Stopped);
        }
        // incoming_cleanup: the workers' userfaultfds are closed (unregistered) and their
        // temp pages freed; huge pages go back on where they were wanted.
        if let Err(e) = self.ram.restore_thp() {
            error.get_or_insert(e);
        }
        let last = self.last_placed_ns.load(Ordering::Acquire);
        let end_ns = if last > 0 {
            last
        } else {
            self.started.elapsed().as_nanos() as u64
        };
        report.postcopy_seconds = end_ns.saturating_sub(self.notified_ns) as f64 / 1e9;
        let first = self.first_served_ns.load(Ordering::Acquire);
        report.first_fault_served_seconds =
            (first > 0).then(|| first.saturating_sub(self.notified_ns) as f64 / 1e9);
        report.fault_service_us = report
            .totals
            .fault_service_ns
            .as_ref()
            .map(crate::stats::LatencyUs::from_ns);
        EngineEnd { report, error }
    }

    /// Every thread's counters as it ends, and the first error; a thread that ended without
    /// reporting panicked (a bug): the rest are stopped.
    fn collect(&self) -> (Vec<WorkerStats>, Option<DestError>) {
        let threads = self.threads.len();
        let mut stats = vec![WorkerStats::default(); threads];
        let mut reported = vec![false; threads];
        let mut first_err = None;
        while reported.iter().any(|r| !r) {
            match self.exits.recv_timeout(Duration::from_millis(100)) {
                Ok((w, (s, result))) => {
                    reported[w] = true;
                    stats[w] = s;
                    if let Err(e) = result {
                        self.stop.store(true, Ordering::Release);
                        first_err.get_or_insert(e);
                    }
                }
                Err(_) => {
                    for (w, t) in self.threads.iter().enumerate() {
                        if !reported[w] && t.is_finished() && self.exits.is_empty() {
                            reported[w] = true;
                            self.stop.store(true, Ordering::Release);
                            first_err.get_or_insert(DestError::Panicked(w));
                        }
                    }
                }
            }
        }
        (stats, first_err)
    }
}
