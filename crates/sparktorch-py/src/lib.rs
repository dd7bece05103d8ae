//! Python bindings of the sparktorch engine: `sparktorch._native`.
//!
//! This is the only crate that links Python. It maps the engine's Rust types to Python classes,
//! core errors to the `sparktorch.errors` hierarchy (declared once, in Python), and releases the
//! GIL around every blocking call. Nothing here starts a thread or a runtime at import time:
//! PySpark forks its Python workers, so runtimes are built lazily, per process.
//!
//! Modules: [`errors`] (the error mapping), [`runtime`] (the lazy per-process tokio runtime and
//! log setup), [`server`] (`ParameterServer`), [`client`] (`Client`), [`convert`] (dicts and
//! arrays to engine types and back), and `cli_main` (the `sparktorch-ps` command, so that the
//! package ships it).

use pyo3::prelude::*;

mod client;
mod convert;
mod errors;
mod runtime;
mod server;

/// The module `sparktorch._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", sparktorch_proto::PROTOCOL_VERSION)?;
    m.add_class::<server::ParameterServer>()?;
    m.add_class::<client::Client>()?;
    m.add_function(wrap_pyfunction!(server::read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    Ok(())
}

/// Run the `sparktorch-ps` command with `argv` (the program name first) and return its exit
/// code; the GIL is released while it runs (`serve` runs until Ctrl-C).
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(move || sparktorch_cli::run(argv))
}
