//! `sparktorch-ps bench`: a loopback load generator (an in-process server and client threads),
//! measured against raw loopback TCP in the same run.
//!
//! With `--loopback`, every repetition first measures two baselines on plain sockets, then the
//! server's operations, so that each ratio compares numbers taken within seconds of each other
//! (the machines this runs on are noisy):
//! - the raw single-stream rate: one connection, 4 MiB writes, nothing else;
//! - the raw push+pull exchange: one connection, the client writes the tensor's bytes, a server
//!   thread reads them into a buffer and writes as many back, the client reads them: what a
//!   push+pull would cost with no protocol, no optimizer step and no copies of ours.
//!
//! The medians over `--reps` repetitions are printed last, with the ratios.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use sparktorch_optim::HyperValue;
use sparktorch_ps::{Client, ClientOptions, Dtype, Mode, Server, ServerConfig, ServerTls};

use crate::{parse_mode, random_init};

#[derive(clap::Args)]
pub struct BenchArgs {
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
    /// Also measure raw loopback TCP (one stream, and a push+pull-sized exchange) in every
    /// repetition, as the baselines of the ratios.
    #[arg(long)]
    loopback: bool,
    /// Clients and server speak TLS (a fresh key pair, the certificate pinned).
    #[arg(long)]
    tls: bool,
    /// Element type of tensors on the wire: float32 | bfloat16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Repetitions (baselines and operations alternate); medians are reported.
    #[arg(long, default_value_t = 1)]
    reps: u32,
}

/// A connected pair of loopback sockets and the server side's thread, which runs `serve` on
/// its end.
fn loopback_pair(
    serve: impl FnOnce(std::net::TcpStream) -> std::io::Result<()> + Send + 'static,
) -> Result<(
    std::net::TcpStream,
    std::thread::JoinHandle<std::io::Result<()>>,
)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let peer = std::thread::spawn(move || -> std::io::Result<()> {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        serve(s)
    });
    let s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    Ok((s, peer))
}

/// One stream of raw TCP over loopback for `secs`: the bandwidth ceiling, in bytes/s.
fn raw_stream(secs: f64) -> Result<f64> {
    let (mut w, reader) = loopback_pair(|mut s| {
        let mut buf = vec![0u8; 4 << 20];
        while s.read(&mut buf)? > 0 {}
        Ok(())
    })?;
    let chunk = vec![1u8; 4 << 20];
    let (t0, mut total) = (Instant::now(), 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        w.write_all(&chunk)?;
        total += chunk.len() as u64;
    }
    drop(w);
    reader
        .join()
        .map_err(|_| anyhow!("loopback reader thread panicked"))??;
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

/// Raw push+pull exchanges of `bytes` each way over one loopback connection for `secs`:
/// seconds per exchange.
fn raw_exchange(bytes: usize, secs: f64) -> Result<f64> {
    let (mut s, echo) = loopback_pair(move |mut s| {
        let mut buf = vec![0u8; bytes];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })?;
    let out = vec![1u8; bytes];
    let mut back = vec![0u8; bytes];
    let (t0, mut n) = (Instant::now(), 0u32);
    while n == 0 || t0.elapsed().as_secs_f64() < secs {
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        n += 1;
    }
    let per = t0.elapsed().as_secs_f64() / f64::from(n);
    drop(s);
    echo.join()
        .map_err(|_| anyhow!("loopback echo thread panicked"))??;
    Ok(per)
}

/// Run `op` on `clients` threads for `secs`; returns operations per second (all clients).
fn measure(
    op: &str,
    a: &BenchArgs,
    port: u16,
    secret: &[u8],
    options: ClientOptions,
) -> Result<f64> {
    let barrier = Arc::new(Barrier::new(a.clients as usize + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..a.clients)
        .map(|w| {
            let (barrier, stop, secret, op) = (
                barrier.clone(),
                stop.clone(),
                secret.to_vec(),
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
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Measure and print.
pub fn run(a: BenchArgs) -> Result<()> {
    let mode = parse_mode(&a.mode)?;
    let Some(dtype) = Dtype::parse(&a.dtype) else {
        bail!("--dtype must be float32 or bfloat16, got {:?}", a.dtype);
    };
    if a.clients == 0 || a.params == 0 || a.reps == 0 {
        bail!("--clients, --params and --reps must be > 0");
    }
    let ops: Vec<String> = a
        .ops
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for op in &ops {
        if !matches!(op.as_str(), "push" | "pull" | "push_pull") {
            bail!("unknown op {op:?}: use push, pull, push_pull");
        }
        if mode == Mode::Synchronous && op == "push" {
            bail!("in synchronous mode a worker pushes once per round: use --ops pull,push_pull");
        }
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
        dtype,
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
    let tensor_bytes = a.params * 4;
    let mb = tensor_bytes as f64 / 1e6;
    let wire_mb = (a.params * dtype.size()) as f64 / 1e6;
    println!(
        "params={} ({mb:.1} MB/tensor as f32, {wire_mb:.1} MB on the wire as {}) clients={} \
         mode={mode} seconds/op={} reps={} transport={}",
        a.params,
        dtype.as_str(),
        a.clients,
        a.seconds,
        a.reps,
        if a.tls { "TLS 1.3" } else { "plaintext" }
    );
    println!(
        "{:<4} {:<22} {:>10} {:>14} {:>12}",
        "rep", "what", "ops/s", "ms/op/client", "MB/s"
    );
    let (mut streams, mut exchanges) = (Vec::new(), Vec::new());
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ops.len()];
    for rep in 1..=a.reps {
        if a.loopback {
            let bw = raw_stream(a.seconds.min(3.0))?;
            println!(
                "{rep:<4} {:<22} {:>10} {:>14} {:>12.0}",
                "raw stream",
                "",
                "",
                bw / 1e6
            );
            streams.push(bw);
            let ex = raw_exchange(tensor_bytes, a.seconds.min(3.0))?;
            println!(
                "{rep:<4} {:<22} {:>10.1} {:>14.2} {:>12.0}",
                "raw push+pull exchange",
                1.0 / ex,
                ex * 1e3,
                2.0 * mb / ex
            );
            exchanges.push(ex);
        }
        for (i, op) in ops.iter().enumerate() {
            let rate = measure(op, &a, port, &secret, options)?;
            let per_op_mb = if op == "push_pull" { 2.0 * mb } else { mb };
            println!(
                "{rep:<4} {op:<22} {rate:>10.1} {:>14.2} {:>12.0}",
                1e3 * f64::from(a.clients) / rate.max(1e-9),
                rate * per_op_mb
            );
            rates[i].push(rate);
        }
    }
    println!("medians over {} repetition(s):", a.reps);
    let stream = median(&mut streams);
    let exchange = median(&mut exchanges);
    if a.loopback {
        println!("  raw stream              {:>10.0} MB/s", stream / 1e6);
        println!(
            "  raw push+pull exchange  {:>10.2} ms ({:.1} MB each way)",
            exchange * 1e3,
            mb
        );
    }
    for (op, r) in ops.iter().zip(rates.iter_mut()) {
        let rate = median(r);
        let ms = 1e3 * f64::from(a.clients) / rate.max(1e-9);
        let per_op_mb = if op == "push_pull" { 2.0 * mb } else { mb };
        print!(
            "  {op:<22}  {ms:>10.2} ms/op/client  {:>8.0} MB/s",
            rate * per_op_mb
        );
        if a.loopback && op == "push_pull" {
            print!(
                "  = {:.2}x the raw exchange's time, aggregate {:.2}x the raw stream",
                ms / (exchange * 1e3),
                rate * per_op_mb * 1e6 / stream
            );
        }
        println!();
    }
    let _ = stop_tx.send(());
    rt.block_on(task)??;
    Ok(())
}
