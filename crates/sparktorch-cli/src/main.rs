//! `sparktorch-ps`: a standalone parameter server, a loopback load generator, and a
//! checkpoint inspector.
//!
//! ```text
//! sparktorch-ps serve --params 1000000 --mode async --workers 4      # prints its address
//! sparktorch-ps bench --params 25000000 --clients 4 --seconds 5      # loopback throughput
//! sparktorch-ps bench --params 25000000 --tls                        # the same over TLS
//! sparktorch-ps inspect ckpt/                                        # a checkpoint's contents
//! ```
//! Logs go to stderr, filtered by `SPARKTORCH_LOG` (default `info`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use sparktorch_optim::HyperValue;
use sparktorch_ps::checkpoint::{self, Checkpoint};
use sparktorch_ps::{
    Client, ClientOptions, LostWorkerPolicy, Mode, Server, ServerConfig, ServerTls,
};

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
    Serve(ServeArgs),
    /// Loopback load generator: an in-process server and client threads.
    Bench(BenchArgs),
    /// Print a checkpoint's contents: metadata, per-tensor statistics, optimizer buffers,
    /// per-worker steps.
    Inspect {
        /// A checkpoint file, or a directory holding checkpoint.safetensors.
        path: PathBuf,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Number of f32 parameters.
    #[arg(long)]
    params: usize,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: chosen by the OS).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// hogwild | async | synchronous
    #[arg(long, default_value = "async")]
    mode: String,
    /// Number of workers (ids 0..workers).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// torch.optim class name.
    #[arg(long, default_value = "SGD")]
    optimizer: String,
    /// Learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// Environment variable holding the secret.
    #[arg(long, default_value = "SPARKTORCH_SECRET")]
    secret_env: String,
    /// File holding the secret (instead of the environment variable).
    #[arg(long)]
    secret_file: Option<String>,
    /// Synchronous round timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    round_timeout_s: f64,
    /// Lost worker policy: drop | fail.
    #[arg(long, default_value = "drop")]
    lost_worker_policy: String,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write checkpoints to (every --checkpoint-interval versions, and at exit).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Versions between two checkpoints (0: only the final one).
    #[arg(long, default_value_t = 0)]
    checkpoint_interval: u64,
    /// Resume from a checkpoint (file or directory): --params, --mode and --optimizer must
    /// match it.
    #[arg(long)]
    resume_from: Option<PathBuf>,
    /// Serve over TLS with a fresh key pair; prints the certificate's SHA-256 fingerprint
    /// (hex) for clients to pin.
    #[arg(long)]
    tls: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Number of f32 parameters of the model.
    #[arg(long, default_value_t = 270_000)]
    params: usize,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    clients: u32,
    /// Seconds per operation.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// hogwild | async | synchronous
    #[arg(long, default_value = "async")]
    mode: String,
    /// Operations to measure, comma-separated: push, pull, push_pull.
    #[arg(long, default_value = "push,pull,push_pull")]
    ops: String,
    /// Also measure raw loopback TCP throughput (one stream) as the ceiling.
    #[arg(long)]
    loopback: bool,
    /// Clients and server speak TLS (a fresh key pair, the certificate pinned).
    #[arg(long)]
    tls: bool,
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPARKTORCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(a) => serve(a),
        Command::Bench(a) => bench(a),
        Command::Inspect { path, json } => inspect(&path, json),
    }
}

fn parse_mode(s: &str) -> Result<Mode> {
    Mode::parse(s).ok_or_else(|| anyhow!("--mode must be hogwild, async or synchronous, got {s:?}"))
}

/// Uniform values in [-0.05, 0.05) from a xorshift generator (deterministic per seed).
fn random_init(n: usize, seed: u64) -> Vec<f32> {
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

fn read_secret(a: &ServeArgs) -> Result<Vec<u8>> {
    match &a.secret_file {
        Some(p) => {
            let mut s = Vec::new();
            std::fs::File::open(p)
                .and_then(|mut f| f.read_to_end(&mut s))
                .with_context(|| format!("reading the secret file {p}"))?;
            while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
                s.pop();
            }
            Ok(s)
        }
        None => std::env::var(&a.secret_env)
            .map(String::into_bytes)
            .with_context(|| format!("the secret: set ${} or pass --secret-file", a.secret_env)),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let mode = parse_mode(&a.mode)?;
    let mut config = ServerConfig::new(read_secret(&a)?, mode);
    config.num_workers = a.workers;
    config.round_timeout = sparktorch_ps::config::seconds("round_timeout_s", a.round_timeout_s)?;
    config.lost_worker_policy = LostWorkerPolicy::parse(&a.lost_worker_policy)
        .ok_or_else(|| anyhow!("--lost-worker-policy must be drop or fail"))?;
    config.checkpoint_dir = a.checkpoint_dir.clone();
    config.checkpoint_interval = a.checkpoint_interval;
    if a.tls {
        config.tls = Some(ServerTls::generate()?);
    }
    let fingerprint = config.tls.as_ref().map(|t| t.fingerprint());
    let hyper = vec![("lr".to_string(), HyperValue::Float(a.lr))];
    let opt = sparktorch_optim::build(&a.optimizer, &hyper, a.params)?;
    let server = match &a.resume_from {
        None => Server::new(random_init(a.params, a.seed), vec![], opt, config)?,
        Some(p) => {
            let file = checkpoint::resolve(p);
            let c = Checkpoint::read(&file)?;
            Server::resume(vec![], opt, config, c, &file)?
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        println!(
            "sparktorch-ps listening on {addr} (mode {mode}, {} params)",
            a.params
        );
        if let Some(f) = fingerprint {
            println!(
                "TLS certificate fingerprint (SHA-256): {}",
                sparktorch_ps::tls::hex(&f)
            );
        }
        server
            .run(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

/// One stream of raw TCP over loopback for `secs`: the bandwidth ceiling, in bytes/s.
fn loopback_ceiling(secs: f64) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut w = std::net::TcpStream::connect(addr)?;
    let chunk = vec![1u8; 4 << 20];
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        std::io::Write::write_all(&mut w, &chunk)?;
    }
    drop(w);
    let total = reader
        .join()
        .map_err(|_| anyhow!("loopback reader thread panicked"))??;
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

fn bench(a: BenchArgs) -> Result<()> {
    let mode = parse_mode(&a.mode)?;
    if a.clients == 0 || a.params == 0 {
        bail!("--clients and --params must be > 0");
    }
    if a.loopback {
        let bw = loopback_ceiling(a.seconds.min(3.0))?;
        println!("loopback TCP (1 stream): {:.0} MB/s", bw / 1e6);
    }
    let secret = b"bench-secret-0123456789".to_vec();
    let mut config = ServerConfig::new(secret.clone(), mode);
    config.num_workers = a.clients;
    config.round_timeout = Duration::from_secs(30);
    if a.tls {
        config.tls = Some(ServerTls::generate()?);
    }
    let options = ClientOptions {
        server_fingerprint: config.tls.as_ref().map(|t| t.fingerprint()),
        ..ClientOptions::default()
    };
    let hyper = vec![("lr".to_string(), HyperValue::Float(1e-9))];
    let opt = sparktorch_optim::build("SGD", &hyper, a.params)?;
    let server = Server::new(random_init(a.params, 1), vec![], opt, config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let task = rt.spawn(async move {
        s.run(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mb = a.params as f64 * 4.0 / 1e6;
    println!(
        "params={} ({mb:.1} MB/tensor) clients={} mode={mode} seconds/op={} transport={}",
        a.params,
        a.clients,
        a.seconds,
        if a.tls { "TLS 1.3" } else { "plaintext" }
    );
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>10}",
        "op", "ops/s", "ms/op/client", "MB/s", "ops"
    );
    for op in a.ops.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !matches!(op, "push" | "pull" | "push_pull") {
            bail!("unknown op {op:?}: use push, pull, push_pull");
        }
        if mode == Mode::Synchronous && op == "push" {
            bail!("in synchronous mode a worker pushes once per round: use --ops pull,push_pull");
        }
        let barrier = Arc::new(Barrier::new(a.clients as usize + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..a.clients)
            .map(|w| {
                let (barrier, stop, secret, op) = (
                    barrier.clone(),
                    stop.clone(),
                    secret.clone(),
                    op.to_string(),
                );
                let n = a.params;
                std::thread::spawn(move || -> Result<u64> {
                    let mut c = Client::connect("127.0.0.1", port, &secret, w, 0, options)?;
                    let grads = vec![1e-3f32; n];
                    let mut out = vec![0f32; n];
                    let mut step = c.resume_step();
                    let mut ops = 0u64;
                    barrier.wait();
                    while !stop.load(Ordering::Relaxed) {
                        match op.as_str() {
                            "push" => {
                                c.push(&grads, step, 1, 0.0, None)?;
                            }
                            "pull" => {
                                c.pull(&mut out, None)?;
                            }
                            _ => {
                                c.push_pull(&grads, &mut out, step, 1, 0.0, None)?;
                            }
                        }
                        step += 1;
                        ops += 1;
                    }
                    // Leave the round (synchronous mode: the others must not wait for us);
                    // the next phase registers again.
                    c.close();
                    Ok(ops)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
        stop.store(true, Ordering::Relaxed);
        let mut total = 0u64;
        for t in threads {
            total += t.join().map_err(|_| anyhow!("client thread panicked"))??;
        }
        let dt = t0.elapsed().as_secs_f64();
        let per_op_mb = if op == "push_pull" { 2.0 * mb } else { mb };
        let rate = total as f64 / dt;
        println!(
            "{op:<10} {rate:>10.1} {:>12.2} {:>12.0} {total:>10}",
            1e3 * a.clients as f64 / rate.max(1e-9),
            rate * per_op_mb
        );
    }
    let _ = stop_tx.send(());
    rt.block_on(task)??;
    Ok(())
}

/// Per-tensor statistics: min, max, mean, L2 norm (f64 accumulation), NaN/inf count.
struct TensorStats {
    name: String,
    shape: Vec<usize>,
    numel: usize,
    min: f64,
    max: f64,
    mean: f64,
    l2: f64,
    non_finite: usize,
}

fn tensor_stats(name: String, shape: Vec<usize>, v: &[f32]) -> TensorStats {
    let (mut min, mut max, mut sum, mut sq, mut bad) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0, 0);
    for &x in v {
        let x = f64::from(x);
        if !x.is_finite() {
            bad += 1;
            continue;
        }
        min = min.min(x);
        max = max.max(x);
        sum += x;
        sq += x * x;
    }
    let finite = v.len() - bad;
    let (min, max) = if finite == 0 {
        (f64::NAN, f64::NAN)
    } else {
        (min, max)
    };
    TensorStats {
        name,
        shape,
        numel: v.len(),
        min,
        max,
        mean: if finite == 0 {
            f64::NAN
        } else {
            sum / finite as f64
        },
        l2: sq.sqrt(),
        non_finite: bad,
    }
}

/// A float for JSON output: non-finite values become null.
fn num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let file = checkpoint::resolve(path);
    let c = Checkpoint::read(&file)?;
    let mut params = Vec::new();
    let mut offset = 0;
    for (name, shape) in &c.layout {
        let n: usize = shape.iter().product();
        params.push(tensor_stats(
            name.clone(),
            shape.clone(),
            &c.params[offset..offset + n],
        ));
        offset += n;
    }
    let buffers: Vec<TensorStats> = c
        .optimizer_state
        .buffers
        .iter()
        .map(|(name, b)| tensor_stats(name.clone(), vec![b.len()], b))
        .collect();
    let stats_json = |t: &TensorStats| {
        serde_json::json!({
            "name": t.name, "shape": t.shape, "numel": t.numel, "min": num(t.min),
            "max": num(t.max), "mean": num(t.mean), "l2": num(t.l2), "non_finite": t.non_finite,
        })
    };
    if json {
        let hyper = checkpoint::hyper_json(&c.hyperparameters);
        let workers: serde_json::Map<String, serde_json::Value> = c
            .workers
            .iter()
            .map(|(w, s)| {
                (
                    w.to_string(),
                    serde_json::json!({"next_step": s.next_step, "attempt": s.attempt}),
                )
            })
            .collect();
        let scalars: serde_json::Map<String, serde_json::Value> = c
            .optimizer_state
            .scalars
            .iter()
            .map(|(k, v)| (k.clone(), num(*v)))
            .collect();
        let out = serde_json::json!({
            "path": file.display().to_string(),
            "format": checkpoint::FORMAT_NAME,
            "format_version": checkpoint::FORMAT_VERSION,
            "engine_version": c.engine_version,
            "created": checkpoint::iso8601(c.created_unix),
            "created_unix": c.created_unix,
            "mode": c.mode.as_str(),
            "version": c.version,
            "num_workers": c.num_workers,
            "num_params": c.params.len(),
            "model_buffers": c.model_buffers,
            "optimizer": c.optimizer,
            "hyperparameters": hyper,
            "optimizer_step": c.optimizer_state.step,
            "optimizer_scalars": scalars,
            "early_stop": {
                "best_loss": c.early_stop.best_loss.map(num),
                "bad_evaluations": c.early_stop.bad_evaluations,
                "should_stop": c.early_stop.should_stop,
            },
            "workers": workers,
            "params": params.iter().map(stats_json).collect::<Vec<_>>(),
            "optimizer_buffers": buffers.iter().map(stats_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("checkpoint      {}", file.display());
    println!(
        "format          {} v{} (engine {}), created {}",
        checkpoint::FORMAT_NAME,
        checkpoint::FORMAT_VERSION,
        c.engine_version,
        checkpoint::iso8601(c.created_unix)
    );
    println!("mode            {}", c.mode);
    println!("version         {} optimizer steps", c.version);
    println!(
        "parameters      {} in {} tensors ({} of them model buffers)",
        c.params.len(),
        c.layout.len(),
        c.model_buffers
    );
    println!(
        "optimizer       {} {}",
        c.optimizer,
        checkpoint::hyper_json(&c.hyperparameters)
    );
    let scalars: Vec<String> = c
        .optimizer_state
        .scalars
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "optimizer state step={}{}{}",
        c.optimizer_state.step,
        if scalars.is_empty() { "" } else { " " },
        scalars.join(" ")
    );
    println!(
        "early stop      best_loss={} bad_evaluations={} should_stop={}",
        c.early_stop
            .best_loss
            .map_or("none".to_string(), |b| b.to_string()),
        c.early_stop.bad_evaluations,
        c.early_stop.should_stop
    );
    println!("workers         {} (num_workers)", c.num_workers);
    println!("  {:>6} {:>12} {:>8}", "worker", "next_step", "attempt");
    for (w, s) in &c.workers {
        println!("  {w:>6} {:>12} {:>8}", s.next_step, s.attempt);
    }
    let table = |title: &str, rows: &[TensorStats]| {
        println!("{title}");
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        println!(
            "  {:<width$} {:>14} {:>13} {:>13} {:>13} {:>13}",
            "name", "shape", "min", "max", "mean", "l2"
        );
        for r in rows {
            let shape = format!("{:?}", r.shape);
            println!(
                "  {:<width$} {:>14} {:>13.6e} {:>13.6e} {:>13.6e} {:>13.6e}{}",
                r.name,
                shape,
                r.min,
                r.max,
                r.mean,
                r.l2,
                if r.non_finite > 0 {
                    format!("  ({} non-finite)", r.non_finite)
                } else {
                    String::new()
                }
            );
        }
    };
    table("parameters", &params);
    if buffers.is_empty() {
        println!("optimizer buffers: none");
    } else {
        table("optimizer buffers", &buffers);
    }
    Ok(())
}
