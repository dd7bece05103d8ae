//! `sparktorch-ps`: a standalone parameter server, a loopback load generator, and (later) a
//! checkpoint inspector.
//!
//! ```text
//! sparktorch-ps serve --params 1000000 --mode async --workers 4      # prints its address
//! sparktorch-ps bench --params 25000000 --clients 4 --seconds 5      # loopback throughput
//! ```
//! Logs go to stderr, filtered by `SPARKTORCH_LOG` (default `info`).

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use sparktorch_optim::HyperValue;
use sparktorch_ps::{Client, ClientOptions, LostWorkerPolicy, Mode, Server, ServerConfig};

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
    /// Inspect a checkpoint (not yet supported: checkpoints come with a later release).
    Inspect {
        /// The checkpoint path.
        path: String,
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
        Command::Inspect { path } => bail!(
            "cannot inspect {path:?}: checkpoints are not yet supported by this version of sparktorch-ps"
        ),
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
    let hyper = vec![("lr".to_string(), HyperValue::Float(a.lr))];
    let opt = sparktorch_optim::build(&a.optimizer, &hyper, a.params)?;
    let server = Server::new(random_init(a.params, a.seed), vec![], opt, config)?;
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
        "params={} ({mb:.1} MB/tensor) clients={} mode={mode} seconds/op={}",
        a.params, a.clients, a.seconds
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
                    let mut c = Client::connect(
                        "127.0.0.1",
                        port,
                        &secret,
                        w,
                        0,
                        ClientOptions::default(),
                    )?;
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
