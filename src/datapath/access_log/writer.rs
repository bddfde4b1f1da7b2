//! The access log's writers: one std thread per destination (a file, or standard output),
//! shared by every listener that names it, fed through a bounded lock-free queue.
//!
//! A request pushes its record and returns; it never takes a lock, makes a system call or
//! wakes the thread. The thread wakes on its own every [`IDLE_WAKE`], drains the queue in a
//! batch (formatting each line), and flushes when the queue is empty, so a busy log costs one
//! `write` per batch and a quiet one is on disk within [`IDLE_WAKE`]. A full queue drops the
//! line and counts it in `fulcrum_access_log_dropped_total`: at [`QUEUE_CAPACITY`] that takes
//! a disk stalled for about a third of a second at 50,000 requests a second.
//!
//! `SIGUSR1` ([`reopen_all`]) makes every writer reopen its file by name after its next
//! batch, so logrotate can rename the file and the lines that follow land in a new one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::ArrayQueue;
use metrics::Counter;
use tracing::warn;

use super::Record;
use super::format::Line;
use crate::base::config::AccessLogPath;
use crate::base::metrics::ACCESS_LOG_DROPPED_TOTAL;

/// Records waiting for the writer, per destination: 16 B a slot, 256 KiB in all.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// How long the writer sleeps when it finds the queue empty.
const IDLE_WAKE: Duration = Duration::from_millis(10);
/// The writer's buffer: one `write` carries many lines.
const BUFFER: usize = 64 * 1024;

/// Every open writer, by destination, so two listeners logging to one file share its writer
/// (two writers appending to one file would interleave partial lines) and `SIGUSR1` finds
/// them all. Only opening, reloading and the signal take the lock.
fn sinks() -> &'static Mutex<Vec<Weak<Sink>>> {
    static SINKS: OnceLock<Mutex<Vec<Weak<Sink>>>> = OnceLock::new();
    SINKS.get_or_init(Mutex::default)
}

/// One destination's queue and writer thread. The thread ends (after writing what is queued)
/// when the last listener using it is gone.
#[derive(Debug)]
pub(crate) struct Sink {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    path: AccessLogPath,
    queue: ArrayQueue<Box<Record>>,
    dropped: Counter,
    reopen: AtomicBool,
    /// Set by [`flush_all`]; cleared by the writer once what was queued before is written.
    sync: AtomicBool,
    closed: AtomicBool,
}

impl Sink {
    /// The writer of `path`: the running one, or a new one with the file opened for appending.
    pub(crate) fn open(path: &AccessLogPath) -> io::Result<Arc<Sink>> {
        let mut sinks = sinks().lock().unwrap_or_else(|e| e.into_inner());
        sinks.retain(|s| s.strong_count() > 0);
        if let Some(sink) = sinks
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| s.shared.path == *path)
        {
            return Ok(sink);
        }
        let out = Output::open(path)?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            queue: ArrayQueue::new(QUEUE_CAPACITY),
            dropped: metrics::counter!(ACCESS_LOG_DROPPED_TOTAL),
            reopen: AtomicBool::new(false),
            sync: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let thread = thread::Builder::new()
            .name("access-log".to_owned())
            .spawn({
                let shared = shared.clone();
                move || write_loop(&shared, out)
            })?;
        let sink = Arc::new(Sink {
            shared,
            thread: Some(thread),
        });
        sinks.push(Arc::downgrade(&sink));
        Ok(sink)
    }

    /// Queues a finished record, or drops and counts it when the writer is behind.
    pub(super) fn push(&self, record: Box<Record>) {
        if self.shared.queue.push(record).is_err() {
            self.shared.dropped.increment(1);
        }
    }

    fn thread(&self) -> Option<&Thread> {
        self.thread.as_ref().map(JoinHandle::thread)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(thread) = self.thread() {
            thread.unpark();
        }
        // Not joined: the last listener may go on a runtime thread, which must not wait on a
        // disk. The thread writes what is queued and ends by itself.
    }
}

/// Makes every access log reopen its file (`SIGUSR1`, after logrotate renamed it). Returns
/// how many writers were asked.
pub(crate) fn reopen_all() -> usize {
    let sinks = sinks().lock().unwrap_or_else(|e| e.into_inner());
    let mut asked = 0;
    for sink in sinks.iter().filter_map(Weak::upgrade) {
        sink.shared.reopen.store(true, Ordering::Release);
        if let Some(thread) = sink.thread() {
            thread.unpark();
        }
        asked += 1;
    }
    asked
}

/// Waits (up to `limit`) until every access log has written and flushed what was queued
/// before the call: a stopping balancer loses no line. Blocks the calling thread.
pub(crate) fn flush_all(limit: Duration) {
    let sinks: Vec<Arc<Sink>> = {
        let sinks = sinks().lock().unwrap_or_else(|e| e.into_inner());
        sinks.iter().filter_map(Weak::upgrade).collect()
    };
    for sink in &sinks {
        sink.shared.sync.store(true, Ordering::Release);
        if let Some(thread) = sink.thread() {
            thread.unpark();
        }
    }
    let deadline = Instant::now() + limit;
    while sinks.iter().any(|s| s.shared.sync.load(Ordering::Acquire)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
}

/// Where a writer's bytes go.
enum Output {
    Stdout(BufWriter<io::Stdout>),
    File(BufWriter<File>),
}

impl Output {
    fn open(path: &AccessLogPath) -> io::Result<Self> {
        Ok(match path {
            AccessLogPath::Stdout => Output::Stdout(BufWriter::with_capacity(BUFFER, io::stdout())),
            AccessLogPath::File(file) => Output::File(BufWriter::with_capacity(
                BUFFER,
                OpenOptions::new().create(true).append(true).open(file)?,
            )),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(w) => w,
            Output::File(w) => w,
        }
    }
}

/// The writer thread: drain, flush when caught up, reopen when asked, sleep.
fn write_loop(shared: &Shared, mut out: Output) {
    let mut line = Line::default();
    let mut failing = false;
    loop {
        // Read before draining: whatever was queued before the request is drained below.
        let syncing = shared.sync.load(Ordering::Acquire);
        // Wall-clock time of a record is its monotonic start, anchored once per batch: a clock
        // step moves later lines, never the request path.
        let mut anchor: Option<(SystemTime, Instant)> = None;
        let mut wrote = false;
        while let Some(record) = shared.queue.pop() {
            let (wall, mono) = *anchor.get_or_insert_with(|| (SystemTime::now(), Instant::now()));
            let time = wall
                .checked_sub(mono.saturating_duration_since(record.started))
                .unwrap_or(wall);
            line.write(&record, time);
            // The record (and its handles) is freed here, off the request path.
            drop(record);
            report(
                &mut failing,
                out.writer().write_all(line.as_bytes()),
                &shared.path,
            );
            wrote = true;
        }
        if wrote {
            report(&mut failing, out.writer().flush(), &shared.path);
        }
        if syncing {
            shared.sync.store(false, Ordering::Release);
        }
        if shared.reopen.swap(false, Ordering::AcqRel) {
            match Output::open(&shared.path) {
                Ok(new) => {
                    let _ = out.writer().flush();
                    out = new;
                    failing = false;
                }
                Err(e) => {
                    warn!(path = ?shared.path, error = %e, "access log could not be reopened; writing to the old file")
                }
            }
        }
        if shared.closed.load(Ordering::Acquire) && shared.queue.is_empty() {
            let _ = out.writer().flush();
            return;
        }
        thread::park_timeout(IDLE_WAKE);
    }
}

/// Logs the first failed write of a run of failures (a full disk would otherwise log every
/// line), and the lines are lost like dropped ones.
fn report(failing: &mut bool, result: io::Result<()>, path: &AccessLogPath) {
    match result {
        Ok(()) => *failing = false,
        Err(e) if !*failing => {
            *failing = true;
            warn!(?path, error = %e, "access log write failed; lines are lost until it works again");
        }
        Err(_) => {}
    }
}
