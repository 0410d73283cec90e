//! Usage records leave the request path through a bounded channel and reach the database in
//! batches (SPEC §4.4).
//!
//! - [`UsageRecorder::record`] never waits: it puts the record on a channel of
//!   [`UsageWriterConfig::capacity`] records. When the channel is full (the database has fallen
//!   that far behind) the record is dropped, counted in [`UsageRecorder::dropped`] and a warning
//!   is logged (at most one per second): requests are never slowed down by bookkeeping.
//! - The writer takes up to [`UsageWriterConfig::batch_size`] records at a time and writes them
//!   in one transaction of multi-row inserts, at once when a batch is full and at the latest
//!   [`UsageWriterConfig::flush_interval`] after the first record of a batch arrived. A failed
//!   write is retried with backoff; after [`WRITE_ATTEMPTS`] failures the batch is dropped and
//!   counted.
//! - [`UsageWriter::shutdown`] (on SIGTERM, after the server stopped taking requests) closes
//!   the channel and writes everything still queued before it returns.
//!
//! A crash (SIGKILL, power loss) loses the records not yet written: those of the last flush
//! interval (1 s by default) plus any batch being retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::alerts::CostAlerts;
use crate::store::{Store, UsageRecord};

/// How many times a batch is tried before it is dropped.
pub const WRITE_ATTEMPTS: u32 = 5;

/// Sizes and timing of the usage writer.
#[derive(Debug, Clone, Copy)]
pub struct UsageWriterConfig {
    /// Records the channel holds before new ones are dropped.
    pub capacity: usize,
    /// Records per database transaction, at most.
    pub batch_size: usize,
    /// How long a record may wait for its batch to fill before it is written anyway.
    pub flush_interval: Duration,
}

impl Default for UsageWriterConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            batch_size: 1_000,
            flush_interval: Duration::from_secs(1),
        }
    }
}

/// Counters shared by the recorder and the writer.
#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    written: AtomicU64,
    last_drop_warning: std::sync::Mutex<Option<Instant>>,
}

/// A record on its way to the database, with the tenant's daily cost alert threshold in
/// nano-dollars (`None`: no alert).
#[derive(Debug)]
struct Queued {
    record: UsageRecord,
    alert_threshold_nano: Option<i64>,
}

/// The request path's side: hands records to the writer without waiting. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UsageRecorder {
    sender: Option<mpsc::Sender<Queued>>,
    counters: Arc<Counters>,
    writer: Arc<std::sync::Mutex<Option<UsageWriter>>>,
}

impl UsageRecorder {
    /// A recorder that records nothing (`ENABLE_COST_TRACKING=false`).
    pub fn disabled() -> Self {
        Self {
            sender: None,
            counters: Arc::default(),
            writer: Arc::default(),
        }
    }

    /// Starts a writer over `store` and returns its recorder. After each stored batch the
    /// writer checks `alerts`, if given.
    pub fn spawn(
        store: Arc<dyn Store>,
        config: UsageWriterConfig,
        alerts: Option<Arc<CostAlerts>>,
    ) -> Self {
        let (mut recorder, writer) = UsageWriter::spawn(store, config, alerts);
        recorder.writer = Arc::new(std::sync::Mutex::new(Some(writer)));
        recorder
    }

    /// Stops the writer (records from now on are dropped and counted) and waits until every
    /// queued record is written. Idempotent; call it after the server stopped taking requests.
    pub async fn shutdown(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            writer.shutdown().await;
        }
    }

    /// Whether records are kept at all.
    pub fn is_enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues `record` for writing; drops and counts it if the queue is full or closed.
    /// `alert_threshold_nano` is the tenant's daily cost alert threshold, if it has one.
    pub fn record(&self, record: UsageRecord, alert_threshold_nano: Option<i64>) {
        let Some(sender) = &self.sender else {
            return;
        };
        let queued = Queued {
            record,
            alert_threshold_nano,
        };
        if let Err(error) = sender.try_send(queued) {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let mut last = self
                .counters
                .last_drop_warning
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                let reason = match error {
                    mpsc::error::TrySendError::Full(_) => "the usage queue is full",
                    mpsc::error::TrySendError::Closed(_) => "the usage writer has stopped",
                };
                tracing::warn!(dropped_total = dropped, reason, "usage record dropped");
            }
        }
    }

    /// Records dropped so far (queue full or closed, or a batch that could not be written).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Records waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }
}

/// The writer task; [`UsageWriter::shutdown`] drains it. Dropping it closes the queue too
/// (queued records are still written); dropping every recorder ends the task.
#[derive(Debug)]
pub struct UsageWriter {
    close: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl UsageWriter {
    /// Starts the writer over `store`; returns the recorder for the request path. After each
    /// stored batch the writer checks `alerts`, if given.
    pub fn spawn(
        store: Arc<dyn Store>,
        config: UsageWriterConfig,
        alerts: Option<Arc<CostAlerts>>,
    ) -> (UsageRecorder, Self) {
        let (sender, receiver) = mpsc::channel(config.capacity.max(1));
        let counters = Arc::new(Counters::default());
        let (close, closed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(
            Sink {
                store,
                alerts,
                counters: Arc::clone(&counters),
            },
            receiver,
            closed,
            config,
        ));
        (
            UsageRecorder {
                sender: Some(sender),
                counters,
                writer: Arc::default(),
            },
            Self {
                close: Some(close),
                task,
            },
        )
    }

    /// Stops taking records and writes every queued one; returns when they are stored (or
    /// dropped after [`WRITE_ATTEMPTS`] failures).
    pub async fn shutdown(mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        if let Err(error) = (&mut self.task).await {
            tracing::error!(%error, "the usage writer failed");
        }
    }
}

/// Where the writer's batches go.
struct Sink {
    store: Arc<dyn Store>,
    alerts: Option<Arc<CostAlerts>>,
    counters: Arc<Counters>,
}

impl Sink {
    /// Stores a batch, then checks its cost alerts.
    async fn write(&self, batch: &mut Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let (records, thresholds): (Vec<UsageRecord>, Vec<Option<i64>>) = batch
            .drain(..)
            .map(|queued| (queued.record, queued.alert_threshold_nano))
            .unzip();
        if write(self.store.as_ref(), &records, &self.counters).await
            && let Some(alerts) = &self.alerts
        {
            alerts.check(&records, &thresholds).await;
        }
    }
}

/// How long shutdown waits for cost alert webhooks still being delivered.
const WEBHOOK_DRAIN: Duration = Duration::from_secs(10);

async fn run(
    sink: Sink,
    mut receiver: mpsc::Receiver<Queued>,
    mut closed: tokio::sync::oneshot::Receiver<()>,
    config: UsageWriterConfig,
) {
    let batch_size = config.batch_size.max(1);
    let mut batch: Vec<Queued> = Vec::with_capacity(batch_size);
    let mut closing = false;
    loop {
        if !closing {
            // Wait for the first record of a batch (or the close signal).
            tokio::select! {
                received = receiver.recv_many(&mut batch, batch_size) => {
                    if received == 0 {
                        break; // Every recorder is gone and the queue is empty.
                    }
                }
                _ = &mut closed => {
                    closing = true;
                    receiver.close();
                }
            }
        }
        if closing {
            // Drain what is queued, in full batches.
            if batch.len() < batch_size {
                let room = batch_size - batch.len();
                receiver.recv_many(&mut batch, room).await;
            }
            if batch.is_empty() {
                break;
            }
        } else if batch.len() < batch_size {
            // Give the batch until the flush interval to fill: one timer for the batch, not
            // one per record received meanwhile.
            let deadline = tokio::time::sleep(config.flush_interval);
            tokio::pin!(deadline);
            while batch.len() < batch_size {
                let room = batch_size - batch.len();
                tokio::select! {
                    received = receiver.recv_many(&mut batch, room) => {
                        if received == 0 { break; }
                    }
                    () = &mut deadline => break,
                    _ = &mut closed, if !closing => {
                        closing = true;
                        receiver.close();
                    }
                }
            }
        }
        sink.write(&mut batch).await;
    }
    sink.write(&mut batch).await;
    if let Some(alerts) = &sink.alerts {
        alerts.finish(WEBHOOK_DRAIN).await;
    }
}

/// Stores `batch`, retrying; returns whether it was stored.
async fn write(store: &dyn Store, batch: &[UsageRecord], counters: &Counters) -> bool {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=WRITE_ATTEMPTS {
        match store.insert_usage(batch).await {
            Ok(()) => {
                counters
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return true;
            }
            Err(error) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(%error, attempt, records = batch.len(), "cannot write usage records; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => {
                counters
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::error!(%error, records = batch.len(), "usage records dropped after repeated write failures");
            }
        }
    }
    false
}

/// A token count estimated from text, for a provider that reported none: about four
/// characters per token, the usual rule for English text with BPE vocabularies, rounded up.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abc"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("héllo wörld"), 3);
    }

    #[test]
    fn a_disabled_recorder_keeps_nothing() {
        let recorder = UsageRecorder::disabled();
        assert!(!recorder.is_enabled());
        assert_eq!(recorder.queue_depth(), 0);
        assert_eq!(recorder.dropped(), 0);
    }
}
