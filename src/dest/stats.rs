//! Counters of one worker and the engine's report.

/// Counters of one worker, merged into the engine report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkerStats {
    /// Fault events read from the userfaultfd.
    pub fault_events: u64,
    /// Faults on pages already placed (woken, no request).
    pub fault_already_placed: u64,
    /// Faults on pages already requested, or in the stream batch being placed (de-duplicated).
    pub fault_deduplicated: u64,
    /// Request frames sent (after coalescing).
    pub requests: u64,
    /// Pages asked for by those requests.
    pub pages_requested: u64,
    /// Pages placed from urgent replies.
    pub pages_by_fault: u64,
    /// Pages placed from the stream.
    pub pages_by_stream: u64,
    /// Pages placed from the stream's push of the image's working set (ahead of the rest).
    pub pages_by_working_set: u64,
    /// Pages placed from the source's zero-page map, without a fault or the stream.
    pub pages_by_zero_map: u64,
    /// Of the placed pages, zero pages (`UFFDIO_ZEROPAGE`).
    pub pages_zero: u64,
    /// Pages that arrived again after the other half placed them (a fault's reply and the
    /// stream both carried them), dropped without an ioctl.
    pub pages_duplicate: u64,
    /// Pages of shared memory whose stream batch was received straight into the page cache
    /// (no temp page, no copy).
    pub pages_direct: u64,
    /// Placements that found the page present (`EEXIST`: both halves placed it at once).
    pub eexist: u64,
    /// Placement ioctls issued (`COPY` + `ZEROPAGE`).
    pub place_ioctls: u64,
    /// Pages the VMM dropped (`UFFD_EVENT_REMOVE`): zero from then on, never refilled.
    pub pages_removed: u64,
    /// Zero pages placed for faults on removed pages.
    pub pages_zero_after_remove: u64,
    /// Connections reopened after a break.
    pub recoveries: u64,
    /// Pages requested after the stream ended because a break lost them in flight.
    pub pages_swept: u64,
    /// Workers whose last `Ack` was lost with its connection and whose source no longer
    /// served the session when the worker came back (every page of it was here).
    pub ends_unconfirmed: u64,
    /// Heartbeats sent on the urgent connection while it had nothing else to send.
    pub heartbeats: u64,
    /// `Credit` frames sent on bulk connections (a receiver-driven stream).
    pub credits_granted: u64,
    /// CPU time of the thread (user + system), set when it ends.
    pub cpu_ns: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// io_uring completions reaped.
    pub completions: u64,
    /// Loop iterations (submit-and-wait calls).
    pub loops: u64,
    /// A VMM's memory: fault service time on our side, event read → page placed (ns).
    #[serde(skip)]
    pub fault_service_ns: Option<hdrhistogram::Histogram<u64>>,
    /// The worker ended (stopped, or its VMM's address space gone) while pages of its shard
    /// were missing as far as it could see: [`super::EngineHandle::wait`] decides, once every worker
    /// has joined (no placement in flight), whether the memory is complete after all.
    #[serde(skip)]
    pub ended_early: bool,
}

impl WorkerStats {
    pub(crate) fn merge(&mut self, o: &WorkerStats) {
        self.ended_early |= o.ended_early;
        self.fault_events += o.fault_events;
        self.fault_already_placed += o.fault_already_placed;
        self.fault_deduplicated += o.fault_deduplicated;
        self.requests += o.requests;
        self.pages_requested += o.pages_requested;
        self.pages_by_fault += o.pages_by_fault;
        self.pages_by_stream += o.pages_by_stream;
        self.pages_by_working_set += o.pages_by_working_set;
        self.pages_by_zero_map += o.pages_by_zero_map;
        self.pages_zero += o.pages_zero;
        self.eexist += o.eexist;
        self.pages_duplicate += o.pages_duplicate;
        self.pages_direct += o.pages_direct;
        self.place_ioctls += o.place_ioctls;
        self.pages_removed += o.pages_removed;
        self.pages_zero_after_remove += o.pages_zero_after_remove;
        self.recoveries += o.recoveries;
        self.pages_swept += o.pages_swept;
        self.ends_unconfirmed += o.ends_unconfirmed;
        self.heartbeats += o.heartbeats;
        self.credits_granted += o.credits_granted;
        self.cpu_ns += o.cpu_ns;
        self.bytes_received += o.bytes_received;
        self.completions += o.completions;
        self.loops += o.loops;
        if let Some(h) = &o.fault_service_ns {
            match &mut self.fault_service_ns {
                Some(mine) => {
                    let _ = mine.add(h);
                }
                None => self.fault_service_ns = Some(h.clone()),
            }
        }
    }
}

/// What the engine did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineReport {
    /// Workers.
    pub workers: usize,
    /// Merged counters.
    pub totals: WorkerStats,
    /// Per-worker counters.
    pub per_worker: Vec<WorkerStats>,
    /// From `enable_notify` (`Engine::start`) to the last page placed.
    pub postcopy_seconds: f64,
    /// A VMM's memory: from `enable_notify` to the first fault answered.
    pub first_fault_served_seconds: Option<f64>,
    /// A VMM's memory: fault service time on our side (event read → placed).
    pub fault_service_us: Option<crate::stats::LatencyUs>,
}

/// An engine thread's end: its counters (everything it did, also when it failed) and how it
/// ended.
pub(crate) type JobEnd = (WorkerStats, Result<(), super::DestError>);
