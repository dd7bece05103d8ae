//! `sparktorch-ps`: a standalone parameter server, a loopback load generator, and a
//! checkpoint inspector.
//!
//! ```text
//! sparktorch-ps serve --params 1000000 --mode async --workers 4      # prints its address
//! sparktorch-ps bench --params 25000000 --clients 4 --seconds 5      # loopback throughput
//! sparktorch-ps bench --params 25000000 --tls                        # the same over TLS
//! sparktorch-ps bench --params 270000 --json                        # one JSON document
//! sparktorch-ps inspect ckpt/                                        # a checkpoint's contents
//! ```
//! Logs go to stderr, filtered by `SPARKTORCH_LOG` (default `info`).
//!
//! One module per subcommand ([`serve`], [`bench`], [`inspect`]); [`run`] parses the arguments
//! and dispatches. The binary (`main.rs`) and the Python package's `sparktorch-ps` console
//! script (`sparktorch._native.cli_main`, so that `pip install .` ships the command) both call
//! [`run`].

use std::ffi::OsString;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use sparktorch_ps::Mode;

pub mod bench;
pub mod inspect;
pub mod serve;

#[derive(Parser)]
#[command(
    name = "sparktorch-ps",
    version,
    about = "sparktorch parameter server tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a standalone parameter server over randomly initialised parameters until Ctrl-C.
    Serve(serve::ServeArgs),
    /// Loopback load generator: an in-process server and client threads.
    Bench(bench::BenchArgs),
    /// Print a checkpoint's contents: metadata, per-tensor statistics, optimizer buffers,
    /// per-worker steps.
    Inspect {
        /// A checkpoint file, or a directory holding checkpoint.safetensors.
        path: std::path::PathBuf,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
}

/// Run `sparktorch-ps` with `args` (the program name first, as `std::env::args_os()` gives
/// them) and return the process exit code: 0 on success, 1 when the command failed (the error
/// is printed to stderr), 2 for a usage error. `--help` and `--version` print and return 0.
/// Never exits the process itself, so it can run inside a Python interpreter.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect { path, json } => inspect::run(&path, json),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    }
}

/// Logs to stderr, filtered by `SPARKTORCH_LOG`; a no-op when the process already has a
/// subscriber (the Python extension may have installed one).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPARKTORCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub(crate) fn parse_mode(s: &str) -> Result<Mode> {
    Mode::parse(s).ok_or_else(|| anyhow!("--mode must be hogwild, async or synchronous, got {s:?}"))
}

/// A float for JSON output: non-finite values become null.
pub(crate) fn num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Uniform values in [-0.05, 0.05) from a xorshift generator (deterministic per seed).
pub(crate) fn random_init(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}
