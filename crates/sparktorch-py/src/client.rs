//! `Client`: the blocking client for executor tasks; the GIL is released during I/O.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sparktorch_ps::tls::{Fingerprint, FINGERPRINT_LEN};
use sparktorch_ps::{ClientOptions, Dtype};

use crate::convert::{f32_array, f32_array_mut};
use crate::errors::{client_err, param_err};

/// A blocking client of a `ParameterServer`.
#[pyclass(module = "sparktorch._native")]
pub(crate) struct Client {
    /// The connection.
    inner: sparktorch_ps::Client,
    /// The last push was refused as staler than the server's `max_staleness`.
    last_push_stale: bool,
}

fn timeout_arg(py: Python<'_>, name: &str, s: f64) -> PyResult<Duration> {
    if !(s.is_finite() && s > 0.0 && s < 1e9) {
        return Err(param_err(
            py,
            format!("{name} must be a positive number of seconds, got {s}"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

fn nonneg(py: Python<'_>, name: &str, v: i64) -> PyResult<u64> {
    u64::try_from(v).map_err(|_| param_err(py, format!("{name} must be >= 0, got {v}")))
}

fn reported(v: Option<f64>) -> Option<f64> {
    v.filter(|x| !x.is_nan())
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (
        host, port, secret, *, worker, attempt = 0, timeout_s = 60.0, connect_timeout_s = 30.0,
        tls_fingerprint = None, dtype = "float32"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        port: i64,
        secret: &Bound<'_, PyAny>,
        worker: i64,
        attempt: i64,
        timeout_s: f64,
        connect_timeout_s: f64,
        tls_fingerprint: Option<&Bound<'_, PyAny>>,
        dtype: &str,
    ) -> PyResult<Self> {
        let dtype = Dtype::parse(dtype).ok_or_else(|| {
            param_err(
                py,
                format!("dtype must be 'float32' or 'bfloat16', got {dtype:?}"),
            )
        })?;
        let server_fingerprint = match tls_fingerprint.filter(|f| !f.is_none()) {
            None => None,
            Some(f) => {
                let bytes = f
                    .cast::<PyBytes>()
                    .map_err(|_| param_err(py, "tls_fingerprint must be bytes or None"))?
                    .as_bytes();
                Some(<Fingerprint>::try_from(bytes).map_err(|_| {
                    param_err(
                        py,
                        format!(
                            "tls_fingerprint must be {FINGERPRINT_LEN} bytes (a SHA-256 digest), got {}",
                            bytes.len()
                        ),
                    )
                })?)
            }
        };
        let secret = secret
            .cast::<PyBytes>()
            .map_err(|_| param_err(py, "secret must be bytes"))?
            .as_bytes()
            .to_vec();
        let port = u16::try_from(port)
            .map_err(|_| param_err(py, format!("port must be in [0, 65535], got {port}")))?;
        let worker = u32::try_from(worker)
            .map_err(|_| param_err(py, format!("worker must be an int >= 0, got {worker}")))?;
        let attempt = u32::try_from(attempt)
            .map_err(|_| param_err(py, format!("attempt must be an int >= 0, got {attempt}")))?;
        let options = ClientOptions {
            timeout: timeout_arg(py, "timeout_s", timeout_s)?,
            connect_timeout: timeout_arg(py, "connect_timeout_s", connect_timeout_s)?,
            server_fingerprint,
            dtype,
        };
        crate::runtime::init_logging(py);
        let host = host.to_string();
        let inner = py
            .detach(move || {
                sparktorch_ps::Client::connect(&host, port, &secret, worker, attempt, options)
            })
            .map_err(|e| client_err(py, e))?;
        Ok(Self {
            inner,
            last_push_stale: false,
        })
    }

    /// True when the last push was refused as staler than the server's `max_staleness`
    /// (bounded staleness): nothing was applied and the step is not done; compute it again
    /// on the parameters a `push_pull` has just pulled (after a `push`, pull first).
    #[getter]
    fn last_push_stale(&self) -> bool {
        self.last_push_stale
    }

    /// Element type of gradients and parameters on the wire: `"float32"` or `"bfloat16"`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().as_str()
    }

    /// Length of the server's flat parameter buffer.
    #[getter]
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }

    /// Steps of this worker already applied by earlier attempts: continue from here.
    #[getter]
    fn resume_step(&self) -> u64 {
        self.inner.resume_step()
    }

    /// The version of the parameters last pulled.
    #[getter]
    fn version(&self) -> u64 {
        self.inner.version()
    }

    /// Write the server's parameters into `out` and return their version.
    #[pyo3(signature = (out, newer_than = -1))]
    fn pull(&mut self, py: Python<'_>, out: &Bound<'_, PyAny>, newer_than: i64) -> PyResult<u64> {
        let mut out = f32_array_mut(py, out, "out")?;
        let out = out
            .as_slice_mut()
            .map_err(|_| param_err(py, "out must be C-contiguous"))?;
        let newer = u64::try_from(newer_than).ok();
        let inner = &mut self.inner;
        py.detach(move || inner.pull(out, newer))
            .map_err(|e| client_err(py, e))
    }

    /// Send this worker's gradients for `step`. Returns (version, should_stop).
    #[pyo3(signature = (grads, *, batch_size, loss, step, val_loss = None))]
    fn push(
        &mut self,
        py: Python<'_>,
        grads: &Bound<'_, PyAny>,
        batch_size: i64,
        loss: f64,
        step: i64,
        val_loss: Option<f64>,
    ) -> PyResult<(u64, bool)> {
        let grads = f32_array(py, grads, "grads")?;
        let grads = grads
            .as_slice()
            .map_err(|_| param_err(py, "grads must be C-contiguous"))?;
        let batch_size = nonneg(py, "batch_size", batch_size)?;
        let step = nonneg(py, "step", step)?;
        let inner = &mut self.inner;
        let v = reported(val_loss);
        let ack = py
            .detach(move || inner.push(grads, step, batch_size, loss, v))
            .map_err(|e| client_err(py, e))?;
        self.last_push_stale = ack.stale;
        Ok((ack.version, ack.should_stop))
    }

    /// push() then pull() in one round trip. Returns (version pulled, should_stop).
    #[pyo3(signature = (grads, out, *, batch_size, loss, step, val_loss = None))]
    #[allow(clippy::too_many_arguments)]
    fn push_pull(
        &mut self,
        py: Python<'_>,
        grads: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        batch_size: i64,
        loss: f64,
        step: i64,
        val_loss: Option<f64>,
    ) -> PyResult<(u64, bool)> {
        let grads = f32_array(py, grads, "grads")?;
        let grads = grads
            .as_slice()
            .map_err(|_| param_err(py, "grads must be C-contiguous"))?;
        let mut out = f32_array_mut(py, out, "out")?;
        let out = out
            .as_slice_mut()
            .map_err(|_| param_err(py, "out must be C-contiguous"))?;
        let batch_size = nonneg(py, "batch_size", batch_size)?;
        let step = nonneg(py, "step", step)?;
        let inner = &mut self.inner;
        let v = reported(val_loss);
        let (ack, version) = py
            .detach(move || inner.push_pull(grads, out, step, batch_size, loss, v))
            .map_err(|e| client_err(py, e))?;
        self.last_push_stale = ack.stale;
        Ok((version, ack.should_stop))
    }

    /// The global early-stop flag.
    fn should_stop(&mut self, py: Python<'_>) -> PyResult<bool> {
        let inner = &mut self.inner;
        py.detach(move || inner.should_stop())
            .map_err(|e| client_err(py, e))
    }

    /// Tell the server this worker is done and close. Idempotent.
    fn close(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(move || inner.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "Client(server={}, worker={}, num_params={}, version={}, open={})",
            self.inner.addr(),
            self.inner.worker(),
            self.inner.num_params(),
            self.inner.version(),
            self.inner.is_open()
        )
    }
}
