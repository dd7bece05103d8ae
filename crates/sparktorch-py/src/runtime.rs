//! The tokio runtime that servers run on, built lazily on first use and rebuilt in a forked
//! child (whose copy of the parent's runtime has no threads); and the route of the engine's
//! logs into Python's `logging`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once};

use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The runtime of this process, tagged with the pid that built it.
static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// This process's server runtime, built on first use.
pub(crate) fn runtime() -> std::io::Result<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(rt.clone());
        }
    }
    if let Some((_, inherited)) = slot.take() {
        // A runtime inherited through fork(): its threads do not exist in this process, and
        // dropping it would wait for them. Leak it.
        std::mem::forget(inherited);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("sparktorch-ps")
            .enable_all()
            .build()?,
    );
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}

/// Name of the Python logger the engine logs to.
const LOGGER: &str = "sparktorch.engine";

/// Records waiting for the forwarding thread; beyond this, records are dropped (the engine
/// never blocks on logging).
const LOG_QUEUE: usize = 4096;

/// One event for Python's `logging`.
struct Record {
    /// Python level number (10 debug ... 40 error).
    level: i32,
    /// `target: message key=value ...`.
    text: String,
}

/// The forwarding thread's queue, tagged with the pid that started the thread.
static FORWARDER: Mutex<Option<(u32, SyncSender<Record>)>> = Mutex::new(None);

/// Cleared by an `atexit` hook: no attaching to an interpreter that is shutting down.
static PYTHON_ALIVE: AtomicBool = AtomicBool::new(true);

/// Sends tracing events to a dedicated thread that hands them to the `sparktorch.engine`
/// logger, so that server threads never wait for the GIL.
struct PyLogLayer;

/// Formats an event's message and fields.
struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

fn forwarder() -> Option<SyncSender<Record>> {
    let pid = std::process::id();
    let mut slot = FORWARDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, tx)) = slot.as_ref() {
        if *owner == pid {
            return Some(tx.clone());
        }
    }
    let (tx, rx) = sync_channel::<Record>(LOG_QUEUE);
    std::thread::Builder::new()
        .name("sparktorch-log".into())
        .spawn(move || forward(rx))
        .ok()?;
    *slot = Some((pid, tx.clone()));
    Some(tx)
}

fn forward(rx: Receiver<Record>) {
    while let Ok(rec) = rx.recv() {
        if !PYTHON_ALIVE.load(Ordering::Acquire) {
            return;
        }
        let _ = Python::try_attach(|py| -> PyResult<()> {
            let logger = py.import("logging")?.call_method1("getLogger", (LOGGER,))?;
            logger.call_method1("log", (rec.level, "%s", rec.text))?;
            Ok(())
        });
    }
}

impl<S: Subscriber> Layer<S> for PyLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !PYTHON_ALIVE.load(Ordering::Acquire) {
            return;
        }
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => 40,
            Level::WARN => 30,
            Level::INFO => 20,
            Level::DEBUG => 10,
            Level::TRACE => 5,
        };
        let mut text = format!("{}: ", meta.target());
        event.record(&mut Text(&mut text));
        if let Some(tx) = forwarder() {
            match tx.try_send(Record { level, text }) {
                Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

/// Called by `atexit`: stop handing records to Python.
#[pyfunction]
fn _stop_log_forwarding() {
    PYTHON_ALIVE.store(false, Ordering::Release);
}

/// Route engine logs (`tracing`) to the Python logger `sparktorch.engine`, filtered first by
/// the environment variable `SPARKTORCH_LOG` (default `info`; e.g. `SPARKTORCH_LOG=debug`),
/// then by the logger's own level and handlers. Once per process; called with the GIL held,
/// when the first server or client is made (never at import).
pub(crate) fn init_logging(py: Python<'_>) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(f) = wrap_pyfunction!(_stop_log_forwarding, py) {
            let _ = py
                .import("atexit")
                .and_then(|m| m.call_method1("register", (f,)));
        }
        let filter =
            EnvFilter::try_from_env("SPARKTORCH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::registry()
            .with(PyLogLayer.with_filter(filter))
            .try_init();
    });
}
