//! `sparktorch-ps bench`: a loopback load generator (an in-process server and client threads),
//! with raw loopback TCP as the ceiling.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use sparktorch_optim::HyperValue;
use sparktorch_ps::{Client, ClientOptions, Mode, Server, ServerConfig, ServerTls};

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
    /// Also measure raw loopback TCP throughput (one stream) as the ceiling.
    #[arg(long)]
    loopback: bool,
    /// Clients and server speak TLS (a fresh key pair, the certificate pinned).
    #[arg(long)]
    tls: bool,
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

/// Measure and print.
pub fn run(a: BenchArgs) -> Result<()> {
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
