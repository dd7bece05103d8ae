//! `ParameterServer`: a server running on this process's tokio runtime.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::PyArray1;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::IntoPyObjectExt;
use sparktorch_proto::Mode;
use sparktorch_ps::checkpoint::{self, Checkpoint};
use sparktorch_ps::config::seconds;
use sparktorch_ps::{LostWorkerPolicy, Server, ServerConfig, ServerTls};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::convert::{f32_array, hyper_dict, hyperparameters, parse_state, state_dict};
use crate::errors::{engine_err, param_err, ps_err};
use crate::runtime::runtime;

/// How long `stop()` waits for the server tasks to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The running server task and the way to stop it.
struct Running {
    /// Completing it asks the server to stop.
    stop: oneshot::Sender<()>,
    /// The server task.
    task: JoinHandle<Result<(), sparktorch_ps::PsError>>,
}

/// A parameter server running on its own threads inside this process.
#[pyclass(module = "sparktorch._native")]
pub(crate) struct ParameterServer {
    /// The shared server state.
    server: Server,
    /// The bound address.
    address: (String, u16),
    /// The runtime the server runs on.
    rt: Arc<Runtime>,
    /// `Some` while running.
    running: Mutex<Option<Running>>,
}

fn u32_arg(py: Python<'_>, name: &str, v: i64, min: i64) -> PyResult<u32> {
    if v < min || v > i64::from(u32::MAX) {
        return Err(param_err(
            py,
            format!("{name} must be an int in [{min}, {}], got {v}", u32::MAX),
        ));
    }
    Ok(v as u32)
}

#[pymethods]
impl ParameterServer {
    #[new]
    #[pyo3(signature = (
        params, layout, optimizer, hyperparameters, *, secret, mode = "async",
        host = "127.0.0.1", port = 0, num_workers = 1, round_timeout_s = 600.0,
        lost_worker_policy = "drop", early_stop_patience = -1, io_timeout_s = 60.0,
        checkpoint_path = None, checkpoint_interval = 0, resume_from = None, model_buffers = 0,
        tls = false, max_staleness = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        layout: &Bound<'_, PyAny>,
        optimizer: &str,
        hyperparameters: &Bound<'_, PyAny>,
        secret: &Bound<'_, PyAny>,
        mode: &str,
        host: &str,
        port: i64,
        num_workers: i64,
        round_timeout_s: f64,
        lost_worker_policy: &str,
        early_stop_patience: i64,
        io_timeout_s: f64,
        checkpoint_path: Option<PathBuf>,
        checkpoint_interval: i64,
        resume_from: Option<PathBuf>,
        model_buffers: usize,
        tls: bool,
        max_staleness: Option<i64>,
    ) -> PyResult<Self> {
        crate::runtime::init_logging(py);
        let params = f32_array(py, params, "params")?;
        let values = params
            .as_slice()
            .map_err(|_| param_err(py, "params must be C-contiguous"))?
            .to_vec();
        let layout: Vec<(String, Vec<usize>)> = layout.extract().map_err(|_| {
            param_err(
                py,
                "layout must be a list of (name, shape) with shape a list of ints",
            )
        })?;
        let hyper = self::hyperparameters(py, hyperparameters)?;
        let secret = secret
            .cast::<PyBytes>()
            .map_err(|_| param_err(py, "secret must be bytes"))?
            .as_bytes()
            .to_vec();
        let mode = Mode::parse(mode).ok_or_else(|| {
            param_err(
                py,
                format!("mode must be 'hogwild', 'async' or 'synchronous', got {mode:?}"),
            )
        })?;
        let policy = LostWorkerPolicy::parse(lost_worker_policy).ok_or_else(|| {
            param_err(
                py,
                format!("lost_worker_policy must be 'drop' or 'fail', got {lost_worker_policy:?}"),
            )
        })?;
        if !(0..=65535).contains(&port) {
            return Err(param_err(
                py,
                format!("port must be in [0, 65535], got {port}"),
            ));
        }
        let mut config = ServerConfig::new(secret, mode);
        config.num_workers = u32_arg(py, "num_workers", num_workers, 1)?;
        config.round_timeout =
            seconds("round_timeout_s", round_timeout_s).map_err(|e| ps_err(py, e))?;
        config.io_timeout = seconds("io_timeout_s", io_timeout_s).map_err(|e| ps_err(py, e))?;
        config.lost_worker_policy = policy;
        config.early_stop_patience = if early_stop_patience > 0 {
            Some(u32_arg(py, "early_stop_patience", early_stop_patience, 1)?)
        } else {
            None
        };
        if checkpoint_interval < 0 {
            return Err(param_err(
                py,
                format!("checkpoint_interval must be >= 0, got {checkpoint_interval}"),
            ));
        }
        config.checkpoint_interval = checkpoint_interval as u64;
        config.checkpoint_dir = checkpoint_path;
        config.max_staleness = match max_staleness {
            None => None,
            Some(k) => Some(u64::try_from(k).map_err(|_| {
                param_err(
                    py,
                    format!("max_staleness must be an int >= 0 or None, got {k}"),
                )
            })?),
        };
        if tls {
            config.tls = Some(ServerTls::generate().map_err(|e| ps_err(py, e))?);
        }
        if model_buffers > values.len() {
            return Err(param_err(
                py,
                format!(
                    "model_buffers={model_buffers} exceeds the {} values of params",
                    values.len()
                ),
            ));
        }
        let opt = sparktorch_optim::build(optimizer, &hyper, values.len() - model_buffers)
            .map_err(|e| param_err(py, format!("optimizer: {e}")))?;
        let opt = sparktorch_optim::with_model_buffers(opt, model_buffers);
        let server = match resume_from {
            None => Server::new(values, layout, opt, config).map_err(|e| ps_err(py, e))?,
            Some(path) => {
                let file = checkpoint::resolve(&path);
                let ckpt = py
                    .detach(|| Checkpoint::read(&file))
                    .map_err(|e| ps_err(py, e.into()))?;
                if ckpt.params.len() != values.len() {
                    return Err(engine_err(
                        py,
                        "CheckpointError",
                        format!(
                            "checkpoint {} does not match this server: params: the checkpoint has {} parameters, params has {}",
                            file.display(),
                            ckpt.params.len(),
                            values.len()
                        ),
                    ));
                }
                Server::resume(layout, opt, config, ckpt, &file).map_err(|e| ps_err(py, e))?
            }
        };

        let listener = std::net::TcpListener::bind((host, port as u16))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| PyOSError::new_err(format!("cannot bind {host}:{port}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| PyOSError::new_err(format!("cannot read the bound address: {e}")))?;
        let rt = runtime().map_err(|e| {
            engine_err(
                py,
                "EngineError",
                format!("cannot start the engine runtime: {e}"),
            )
        })?;
        let listener = {
            let _entered = rt.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| PyOSError::new_err(format!("cannot register the listener: {e}")))?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let run = server.clone();
        let task = rt.spawn(async move {
            run.run(listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Self {
            server,
            address: (local.ip().to_string(), local.port()),
            rt,
            running: Mutex::new(Some(Running { stop, task })),
        })
    }

    /// The bound (host, port).
    #[getter]
    fn address(&self) -> (String, u16) {
        self.address.clone()
    }

    /// With TLS: the SHA-256 fingerprint of this server's certificate (32 bytes), which
    /// clients pin; `None` without TLS.
    #[getter]
    fn tls_fingerprint<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.server
            .config()
            .tls
            .as_ref()
            .map(|t| PyBytes::new(py, &t.fingerprint()))
    }

    /// False once stopped (or failed).
    #[getter]
    fn running(&self) -> bool {
        let guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|r| !r.task.is_finished())
    }

    /// Number of float32 elements in the flat buffer.
    #[getter]
    fn num_params(&self) -> usize {
        self.server.num_params()
    }

    /// Number of leading elements the optimizer steps (the rest are model buffers).
    #[getter]
    fn num_trainable(&self, py: Python<'_>) -> usize {
        // Reads under the optimizer's lock, which a step holds.
        let server = self.server.clone();
        py.detach(move || server.num_trainable())
    }

    /// Number of optimizer steps applied so far.
    fn version(&self) -> u64 {
        self.server.version()
    }

    /// A copy of the flat parameters.
    fn parameters<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        let server = self.server.clone();
        let (_, values) = py.detach(move || server.parameters());
        PyArray1::from_vec(py, values)
    }

    /// The optimizer state.
    fn optimizer_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let server = self.server.clone();
        let ((name, hyper), state) =
            py.detach(move || (server.optimizer_info(), server.optimizer_state()));
        state_dict(py, name, &hyper, state)
    }

    /// Replace the optimizer state (same form as `optimizer_state()`).
    fn load_optimizer_state(&self, py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let server = self.server.clone();
        let ((current, _), trainable) =
            py.detach(move || (server.optimizer_info(), server.num_trainable()));
        let (name, hyper, state) = parse_state(py, state)?;
        if let Some(n) = &name {
            if !n.eq_ignore_ascii_case(current) {
                return Err(param_err(
                    py,
                    format!("state['name'] is {n:?} but this server runs {current}"),
                ));
            }
        }
        let rebuild = match hyper {
            Some(h) => {
                let opt = sparktorch_optim::build(current, &h, trainable)
                    .map_err(|e| param_err(py, format!("state['hyperparameters']: {e}")))?;
                Some(sparktorch_optim::with_model_buffers(
                    opt,
                    self.server.num_params() - trainable,
                ))
            }
            None => None,
        };
        let server = self.server.clone();
        py.detach(move || server.load_optimizer_state(rebuild, &state))
            .map_err(|e| param_err(py, format!("state: {e}")))
    }

    /// Write a checkpoint now (a `.safetensors` file, or a directory holding
    /// `checkpoint.safetensors`).
    fn save_checkpoint(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let server = self.server.clone();
        py.detach(move || server.save_checkpoint(&path))
            .map(|_| ())
            .map_err(|e| ps_err(py, e))
    }

    /// A snapshot of the server's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let server = self.server.clone();
        let s = py.detach(move || server.stats());
        let d = PyDict::new(py);
        d.set_item("version", s.version)?;
        d.set_item("mode", s.mode.as_str())?;
        d.set_item("updates", s.updates)?;
        d.set_item("duplicates", s.duplicates)?;
        d.set_item("stale_discarded", s.stale_discarded)?;
        d.set_item("stale_refused", s.stale_refused)?;
        d.set_item("store_allocations", s.store_allocations)?;
        d.set_item("updates_per_worker", s.updates_per_worker)?;
        d.set_item("steps_per_worker", s.steps_per_worker)?;
        d.set_item("workers_live", s.workers_live)?;
        d.set_item("workers_done", s.workers_done)?;
        d.set_item("workers_lost", s.workers_lost)?;
        d.set_item("connections", s.connections)?;
        d.set_item("rejected_frames", s.rejected_frames)?;
        d.set_item("auth_failures", s.auth_failures)?;
        d.set_item("bytes_in", s.bytes_in)?;
        d.set_item("bytes_out", s.bytes_out)?;
        d.set_item("recent_loss", s.recent_loss)?;
        d.set_item("staleness_mean", s.staleness_mean)?;
        d.set_item("staleness_max", s.staleness_max)?;
        d.set_item("history_total", s.history_total)?;
        d.set_item("should_stop", s.should_stop)?;
        d.set_item("best_loss", s.best_loss)?;
        d.set_item("error", s.error)?;
        d.set_item("checkpoint_errors", s.checkpoint_errors)?;
        d.set_item("last_checkpoint_version", s.last_checkpoint_version)?;
        d.set_item("last_checkpoint_path", s.last_checkpoint_path)?;
        Ok(d)
    }

    /// Every applied push as (worker, step, loss, val_loss), in the order applied (the newest
    /// `HISTORY_CAP`). With `since=n`: `(next, entries)`, the entries of index `n` and later
    /// and the `since` of the next read (an incremental read copies only new entries).
    #[pyo3(signature = (since=None))]
    fn history<'py>(&self, py: Python<'py>, since: Option<u64>) -> PyResult<Bound<'py, PyAny>> {
        let server = self.server.clone();
        match since {
            None => py.detach(move || server.history()).into_bound_py_any(py),
            Some(n) => py
                .detach(move || server.history_since(n))
                .into_bound_py_any(py),
        }
    }

    /// Close the listener and every connection, and join the server threads; with
    /// `checkpoint_path`, write the final checkpoint and raise `CheckpointError` if that
    /// fails. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(Running { stop, task }) = running else {
            return Ok(());
        };
        let _ = stop.send(());
        let rt = self.rt.clone();
        let joined = py.detach(move || {
            rt.block_on(async move { tokio::time::timeout(STOP_TIMEOUT, task).await })
        });
        match joined {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ps_err(py, e)),
            Ok(Err(e)) => Err(engine_err(
                py,
                "EngineError",
                format!("server task failed: {e}"),
            )),
            Err(_) => Err(engine_err(
                py,
                "EngineTimeoutError",
                format!("the server did not stop within {}s", STOP_TIMEOUT.as_secs()),
            )),
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.stop(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "ParameterServer(address={}:{}, tls={}, mode={}, num_params={}, version={}, running={})",
            self.address.0,
            self.address.1,
            self.server.config().tls.is_some(),
            self.server.mode(),
            self.server.num_params(),
            self.server.version(),
            self.running()
        )
    }
}

impl Drop for ParameterServer {
    fn drop(&mut self) {
        // Ask the server to stop; don't wait (no GIL juggling in a destructor).
        let running = self
            .running
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = running {
            let _ = r.stop.send(());
        }
    }
}

/// Read and validate a checkpoint file (or a directory holding `checkpoint.safetensors`):
/// its metadata, `"params"` (flat float32) and `"optimizer_state"` (as `optimizer_state()`).
#[pyfunction]
pub(crate) fn read_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let file = checkpoint::resolve(&path);
    let c = py
        .detach(|| Checkpoint::read(&file))
        .map_err(|e| ps_err(py, e.into()))?;
    let s = c.summary(&file);
    let d = PyDict::new(py);
    d.set_item("path", &s.path)?;
    d.set_item("format", s.format)?;
    d.set_item("format_version", s.format_version)?;
    d.set_item("engine_version", s.engine_version)?;
    d.set_item("mode", s.mode)?;
    d.set_item("version", s.version)?;
    d.set_item("optimizer", s.optimizer)?;
    d.set_item("hyperparameters", hyper_dict(py, s.hyperparameters)?)?;
    d.set_item("num_workers", s.num_workers)?;
    d.set_item("layout", c.layout.clone())?;
    d.set_item("model_buffers", s.model_buffers)?;
    let workers = PyDict::new(py);
    for (w, st) in s.workers {
        let e = PyDict::new(py);
        e.set_item("next_step", st.next_step)?;
        e.set_item("attempt", st.attempt)?;
        workers.set_item(w, e)?;
    }
    d.set_item("workers", workers)?;
    let es = PyDict::new(py);
    es.set_item("best_loss", s.early_stop.best_loss.unwrap_or(f64::NAN))?;
    es.set_item("bad_evaluations", s.early_stop.bad_evaluations)?;
    es.set_item("should_stop", s.early_stop.should_stop)?;
    d.set_item("early_stop", es)?;
    d.set_item("created_unix", s.created_unix)?;
    d.set_item("created", &s.created)?;
    let params = std::sync::Arc::try_unwrap(c.params).unwrap_or_else(|a| Vec::clone(&a));
    d.set_item("params", PyArray1::from_vec(py, params))?;
    d.set_item(
        "optimizer_state",
        state_dict(py, &c.optimizer, &c.hyperparameters, c.optimizer_state)?,
    )?;
    Ok(d)
}
