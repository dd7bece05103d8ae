//! `sparktorch-ps bench`: a loopback load generator (an in-process server and client threads),
//! measured against raw loopback TCP in the same run.
//!
//! With `--loopback`, every repetition first measures two baselines on plain sockets, then the
//! server's operations, so that each ratio compares numbers taken within seconds of each other
//! (the machines this runs on are noisy):
//! - the raw single-stream rate: one connection, the same 4 MiB buffer written and read again
//!   and again (the buffers stay in cache), nothing else;
//! - the same stream from and into model-sized buffers (each 4 MiB write and read touches new
//!   memory, as a push or pull of the model does);
//! - the raw push+pull exchange: one connection per client, the client writes the tensor's
//!   bytes, a server thread reads them into a buffer and writes as many back, the client reads
//!   them: what a push+pull would cost with no protocol, no optimizer step and no copies of ours;
//! - the raw full-duplex exchange: the same, but the server thread writes each MiB back as soon
//!   as it is in while the client still sends: the lower bound of any push+pull design over one
//!   connection (both directions at once, no work in between).
//!
//! Every line also gives the CPU the whole process (server, clients, and the baselines' peer
//! threads alike) used meanwhile, in cores busy: on loopback the "network" is the kernel
//! copying bytes on the same cores the server steps on.
//!
//! The medians over `--reps` repetitions are printed last, with the ratios.
//!
//! With `--json`, nothing but one JSON document goes to stdout, at the end: the configuration,
//! every measured row and the medians, each value in a named field whose unit the document's
//! `units` object spells out ([`JSON_SCHEMA`] versions its shape). `make bench`
//! (`benchmarks/run_all.py`) reads that, not the text tables, which may change freely.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use sparktorch_optim::HyperValue;
use sparktorch_ps::{Client, ClientOptions, Dtype, Mode, Server, ServerConfig, ServerTls};

use crate::{num, parse_mode, random_init};

/// The version of the `--json` document's shape: raised whenever a field is renamed, removed or
/// changes its meaning (adding a field does not raise it).
pub const JSON_SCHEMA: u32 = 1;

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
    /// Element type of tensors on the wire: float32 | bfloat16 | both (every repetition
    /// measures each operation in float32, then in bfloat16, and the paired ratios are printed).
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Repetitions (baselines and operations alternate); medians are reported.
    #[arg(long, default_value_t = 1)]
    reps: u32,
    /// Print one JSON document on stdout (configuration, every row, the medians; units named)
    /// instead of the text tables.
    #[arg(long)]
    json: bool,
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

/// Bytes per write (and per read) of the raw stream.
const RAW_CHUNK: usize = 4 << 20;

/// CPU time (user + system) this process has used so far, all threads together, in seconds;
/// `None` where `/proc/self/stat` is not available (not Linux).
fn process_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of USER_HZ (100 on Linux).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The whole machine's CPU time so far from `/proc/stat` (all CPUs, in ticks): busy (user,
/// nice, system, irq, softirq, steal) and total (busy plus idle and iowait); `None` where it is
/// not available. Unlike [`process_cpu`] this counts the kernel's softirq threads, which do
/// part of loopback TCP's work outside the process.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Some((busy, busy + get(3) + get(4)))
}

/// A measurement and the CPU busy meanwhile.
struct Measured<T> {
    value: T,
    /// This process: CPU seconds per wall-clock second (`NaN` when unknown).
    cores: f64,
    /// The whole machine: the share of all its CPUs' time that was busy (`NaN` when unknown).
    machine: f64,
}

/// Run `f`, also measuring the CPU the process and the machine used meanwhile.
fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<Measured<T>> {
    let (c0, m0, t0) = (process_cpu(), machine_cpu(), Instant::now());
    let value = f()?;
    let wall = t0.elapsed().as_secs_f64();
    let cores = match (c0, process_cpu()) {
        (Some(a), Some(b)) if wall > 0.0 => (b - a) / wall,
        _ => f64::NAN,
    };
    let machine = match (m0, machine_cpu()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    Ok(Measured {
        value,
        cores,
        machine,
    })
}

/// One stream of raw TCP over loopback for `secs`, in bytes/s: the bandwidth ceiling. Writes
/// and reads are 4 MiB; they cycle through buffers of `buffer_bytes` (the 4 MiB themselves:
/// always the same bytes, in cache; or a model's size: new memory each time).
fn raw_stream(secs: f64, buffer_bytes: usize) -> Result<f64> {
    let len = buffer_bytes.max(RAW_CHUNK);
    let (mut w, reader) = loopback_pair(move |mut s| {
        let mut buf = vec![0u8; len];
        let mut at = 0;
        loop {
            let end = (at + RAW_CHUNK).min(len);
            match s.read(&mut buf[at..end])? {
                0 => return Ok(()),
                n => at = if at + n >= len { 0 } else { at + n },
            }
        }
    })?;
    let src = vec![1u8; len];
    let (t0, mut total, mut at) = (Instant::now(), 0u64, 0);
    while t0.elapsed().as_secs_f64() < secs {
        let end = (at + RAW_CHUNK).min(len);
        w.write_all(&src[at..end])?;
        total += (end - at) as u64;
        at = if end >= len { 0 } else { end };
    }
    drop(w);
    reader
        .join()
        .map_err(|_| anyhow!("loopback reader thread panicked"))??;
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

/// Bytes the full-duplex echo reads before writing them back.
const DUPLEX_CHUNK: usize = 1 << 20;

/// How a raw exchange's echo answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// Reads all the bytes, then writes them back (a push, then a pull: what the protocol does).
    Whole,
    /// Writes each 1 MiB back as soon as it is in, while the client still sends (the client
    /// writes on a second thread): both directions at once, the lower bound of any push+pull
    /// design over one connection, with no work between reading and writing.
    Duplex,
}

/// Raw push+pull exchanges of `bytes` each way, one loopback connection per client, `clients`
/// at once, for `secs`: exchanges per second, all clients together.
fn raw_exchanges(bytes: usize, secs: f64, clients: u32, echo: Echo) -> Result<f64> {
    let barrier = Arc::new(Barrier::new(clients as usize + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<u64> {
                let (mut s, peer) = loopback_pair(move |mut s| {
                    let mut buf = vec![0u8; bytes];
                    let step = if echo == Echo::Duplex {
                        DUPLEX_CHUNK
                    } else {
                        bytes
                    };
                    loop {
                        for at in (0..bytes).step_by(step.max(1)) {
                            let b = &mut buf[at..(at + step).min(bytes)];
                            match s.read_exact(b) {
                                Ok(()) => s.write_all(b)?,
                                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                                    return Ok(())
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                })?;
                let out = vec![1u8; bytes];
                let mut back = vec![0u8; bytes];
                let mut writer = s.try_clone()?;
                barrier.wait();
                let (t0, mut n) = (Instant::now(), 0u64);
                while n == 0 || t0.elapsed().as_secs_f64() < secs {
                    match echo {
                        Echo::Whole => {
                            s.write_all(&out)?;
                            s.read_exact(&mut back)?;
                        }
                        Echo::Duplex => std::thread::scope(|sc| -> Result<()> {
                            let w = sc.spawn(|| writer.write_all(&out));
                            s.read_exact(&mut back)?;
                            w.join()
                                .map_err(|_| anyhow!("loopback writer thread panicked"))??;
                            Ok(())
                        })?,
                    }
                    n += 1;
                }
                drop((s, writer));
                peer.join()
                    .map_err(|_| anyhow!("loopback echo thread panicked"))??;
                Ok(n)
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut total = 0u64;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow!("raw client thread panicked"))??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
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
    let dtypes = match Dtype::parse(&a.dtype) {
        Some(d) => vec![d],
        None if a.dtype == "both" => vec![Dtype::F32, Dtype::Bf16],
        None => bail!(
            "--dtype must be float32, bfloat16 or both, got {:?}",
            a.dtype
        ),
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
        ..ClientOptions::default()
    };
    // Every operation in every dtype, in this order within each repetition.
    let cases: Vec<(String, Dtype)> = ops
        .iter()
        .flat_map(|op| dtypes.iter().map(move |d| (op.clone(), *d)))
        .collect();
    let case_name = |(op, d): &(String, Dtype)| {
        if dtypes.len() > 1 {
            format!("{op} {}", d.as_str())
        } else {
            op.clone()
        }
    };
    let hyper = vec![("lr".to_string(), HyperValue::Float(1e-9))];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // One server per dtype (a server that has seen bfloat16 pulls writes a bfloat16 copy of
    // every version, which float32 clients would pay for); all in one runtime, one busy at a
    // time.
    let mut servers = Vec::new();
    for _ in &dtypes {
        let opt = sparktorch_optim::build("SGD", &hyper, a.params)?;
        let server = Server::new(random_init(a.params, 1), vec![], opt, config.clone())?;
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
        servers.push((server, port, stop_tx, task));
    }
    let port_of = |d: Dtype| {
        let i = dtypes.iter().position(|x| *x == d).unwrap_or(0);
        servers[i].1
    };
    let tensor_bytes = a.params * 4;
    let mb = tensor_bytes as f64 / 1e6;
    let wire: Vec<String> = dtypes
        .iter()
        .map(|d| {
            format!(
                "{:.1} MB as {}",
                (a.params * d.size()) as f64 / 1e6,
                d.as_str()
            )
        })
        .collect();
    let transport = if a.tls { "TLS 1.3" } else { "plaintext" };
    // `--json`: the text goes nowhere; the document is printed at the end.
    let say = |line: std::fmt::Arguments| {
        if !a.json {
            println!("{line}");
        }
    };
    say(format_args!(
        "params={} ({mb:.1} MB/tensor as f32; on the wire {}) clients={} \
         mode={mode} seconds/op={} reps={} transport={transport}",
        a.params,
        wire.join(", "),
        a.clients,
        a.seconds,
        a.reps,
    ));
    say(format_args!(
        "{:<4} {:<30} {:>8} {:>13} {:>8} {:>10} {:>13}",
        "rep", "what", "ops/s", "ms/op/client", "MB/s", "CPU cores", "machine busy"
    ));
    // Every measured row, for `--json`.
    let json_rows = std::cell::RefCell::new(Vec::new());
    let row = |rep: u32,
               what: &str,
               case: Option<&(String, Dtype)>,
               ops: Option<f64>,
               ms: Option<f64>,
               mbs: f64,
               m: (f64, f64)| {
        let opt = |v: Option<f64>, prec: usize| v.map_or(String::new(), |x| format!("{x:.prec$}"));
        say(format_args!(
            "{rep:<4} {what:<30} {:>8} {:>13} {mbs:>8.0} {:>10.2} {:>12.0}%",
            opt(ops, 1),
            opt(ms, 2),
            m.0,
            m.1 * 100.0
        ));
        json_rows.borrow_mut().push(serde_json::json!({
            "rep": rep,
            "what": what,
            "op": case.map(|c| c.0.as_str()),
            "dtype": case.map(|c| c.1.as_str()),
            "ops_per_s": ops.map(num),
            "ms_per_op_per_client": ms.map(num),
            "mb_per_s": num(mbs),
            "cpu_cores": num(m.0),
            "machine_busy": num(m.1),
        }));
    };
    let (mut streams, mut cold_streams) = (Vec::new(), Vec::new());
    let (mut exchanges, mut duplexes) = (Vec::new(), Vec::new());
    let mut stream_cores = Vec::new();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut cores: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut machine: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let raw_secs = a.seconds.min(3.0);
    for rep in 1..=a.reps {
        if a.loopback {
            let m = with_cpu(|| raw_stream(raw_secs, RAW_CHUNK))?;
            row(
                rep,
                "raw stream",
                None,
                None,
                None,
                m.value / 1e6,
                (m.cores, m.machine),
            );
            streams.push(m.value);
            stream_cores.push(m.cores);
            let m = with_cpu(|| raw_stream(raw_secs, tensor_bytes))?;
            row(
                rep,
                "raw stream, model-sized buffers",
                None,
                None,
                None,
                m.value / 1e6,
                (m.cores, m.machine),
            );
            cold_streams.push(m.value);
            for (echo, what, out) in [
                (Echo::Whole, "raw push+pull exchange", &mut exchanges),
                (Echo::Duplex, "raw full-duplex exchange", &mut duplexes),
            ] {
                let m = with_cpu(|| raw_exchanges(tensor_bytes, raw_secs, a.clients, echo))?;
                let rate = m.value;
                row(
                    rep,
                    what,
                    None,
                    Some(rate),
                    Some(1e3 * f64::from(a.clients) / rate.max(1e-9)),
                    rate * 2.0 * mb,
                    (m.cores, m.machine),
                );
                out.push(rate);
            }
        }
        for (i, case) in cases.iter().enumerate() {
            let (op, dtype) = (&case.0, case.1);
            let options = ClientOptions { dtype, ..options };
            let port = port_of(dtype);
            let m = with_cpu(|| measure(op, &a, port, &secret, options))?;
            let rate = m.value;
            let per_op_mb = if op == "push_pull" { 2.0 * mb } else { mb };
            row(
                rep,
                &case_name(case),
                Some(case),
                Some(rate),
                Some(1e3 * f64::from(a.clients) / rate.max(1e-9)),
                rate * per_op_mb,
                (m.cores, m.machine),
            );
            rates[i].push(rate);
            cores[i].push(m.cores);
            machine[i].push(m.machine);
        }
    }
    say(format_args!("medians over {} repetition(s):", a.reps));
    let stream = median(&mut streams);
    let cold_stream = median(&mut cold_streams);
    // Exchanges per second over all clients; as the time of one (per client) in ms.
    let exchange_rate = median(&mut exchanges);
    let duplex_rate = median(&mut duplexes);
    let per_client_ms = |rate: f64| 1e3 * f64::from(a.clients) / rate.max(1e-9);
    // The raw stream's time for `bytes`, in ms.
    let stream_ms = |bytes: f64| bytes / stream * 1e3;
    let op_bytes = 2.0 * tensor_bytes as f64;
    let mut json_baselines = serde_json::Value::Null;
    if a.loopback {
        let stream_cores = median(&mut stream_cores);
        say(format_args!(
            "  raw stream                      {:>8.0} MB/s  ({stream_cores:.2} CPU cores)",
            stream / 1e6,
        ));
        say(format_args!(
            "  raw stream, model-sized buffers {:>8.0} MB/s  = {:.2}x the raw stream's rate",
            cold_stream / 1e6,
            cold_stream / stream
        ));
        for (what, rate) in [
            ("raw push+pull exchange  ", exchange_rate),
            ("raw full-duplex exchange", duplex_rate),
        ] {
            say(format_args!(
                "  {what}        {:>8.2} ms/op/client ({:.1} MB each way) = {:.2}x the raw stream's time for its bytes, aggregate {:.2}x its rate",
                per_client_ms(rate),
                mb,
                per_client_ms(rate) / f64::from(a.clients) / stream_ms(op_bytes),
                rate * op_bytes / stream
            ));
        }
        json_baselines = serde_json::json!({
            "raw_stream_mb_per_s": num(stream / 1e6),
            "raw_stream_cpu_cores": num(stream_cores),
            "raw_stream_model_sized_mb_per_s": num(cold_stream / 1e6),
            "raw_exchange_ops_per_s": num(exchange_rate),
            "raw_exchange_ms_per_op_per_client": num(per_client_ms(exchange_rate)),
            "raw_duplex_ops_per_s": num(duplex_rate),
            "raw_duplex_ms_per_op_per_client": num(per_client_ms(duplex_rate)),
        });
    }
    // Paired bfloat16 / float32 time ratios per operation (same repetition), before the
    // medians below sort the rates.
    let paired: Vec<(String, Vec<f64>)> = if dtypes.len() > 1 {
        ops.iter()
            .enumerate()
            .map(|(k, op)| {
                let (f, b) = (&rates[2 * k], &rates[2 * k + 1]);
                (op.clone(), f.iter().zip(b).map(|(f, b)| f / b).collect())
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut json_medians = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let op = &case.0;
        let name = case_name(case);
        let rate = median(&mut rates[i]);
        let ms = 1e3 * f64::from(a.clients) / rate.max(1e-9);
        let per_op_mb = if op == "push_pull" { 2.0 * mb } else { mb };
        let (cores, busy) = (median(&mut cores[i]), median(&mut machine[i]));
        let mut line = format!(
            "  {name:<22}  {ms:>10.2} ms/op/client  {:>8.0} MB/s  ({cores:.2} CPU cores, machine {:.0}% busy)",
            rate * per_op_mb,
            100.0 * busy
        );
        let mut vs_raw = serde_json::Value::Null;
        if a.loopback && op == "push_pull" {
            // The time of one push+pull (one client: its latency; several: the aggregate's
            // time per operation) against the raw stream's time for the same bytes (the
            // issue's measure), and against the raw exchanges of the same run.
            let per_op = ms / f64::from(a.clients);
            let (x_stream, x_rate) = (
                per_op / stream_ms(op_bytes),
                rate * per_op_mb * 1e6 / stream,
            );
            let x_exchange = ms / per_client_ms(exchange_rate);
            let x_duplex = ms / per_client_ms(duplex_rate);
            line += &format!(
                "\n    = {x_stream:.2}x the raw stream's time for its {:.0} MB (aggregate {x_rate:.2}x its rate), \
                 {x_exchange:.2}x the raw exchange's time, {x_duplex:.2}x the raw full-duplex exchange's",
                2.0 * mb,
            );
            vs_raw = serde_json::json!({
                "time_over_raw_stream": num(x_stream),
                "rate_over_raw_stream": num(x_rate),
                "time_over_raw_exchange": num(x_exchange),
                "time_over_raw_duplex": num(x_duplex),
            });
        }
        say(format_args!("{line}"));
        json_medians.push(serde_json::json!({
            "op": op,
            "dtype": case.1.as_str(),
            "what": name,
            "ops_per_s": num(rate),
            "ms_per_op_per_client": num(ms),
            "mb_per_s": num(rate * per_op_mb),
            "cpu_cores": num(cores),
            "machine_busy": num(busy),
            "vs_raw": vs_raw,
        }));
    }
    let mut json_pairs = Vec::new();
    for (op, mut ratios) in paired {
        let all: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let pairs: Vec<serde_json::Value> = ratios.iter().map(|r| num(*r)).collect();
        let med = median(&mut ratios);
        say(format_args!(
            "  {op}: bfloat16 takes {med:.2}x the float32 time (median of the repetitions' pairs: {})",
            all.join(", ")
        ));
        json_pairs.push(serde_json::json!({"op": op, "median": num(med), "pairs": pairs}));
    }
    let mut json_servers = Vec::new();
    for (d, (server, _, stop_tx, task)) in dtypes.iter().zip(servers) {
        let st = server.stats();
        say(format_args!(
            "server ({}): {} steps, {} model-size buffers allocated by steps (the first \
             bfloat16 copies, and whenever every recycled buffer was still being sent)",
            d.as_str(),
            st.updates,
            st.store_allocations
        ));
        json_servers.push(serde_json::json!({
            "dtype": d.as_str(),
            "steps": st.updates,
            "store_allocations": st.store_allocations,
        }));
        let _ = stop_tx.send(());
        rt.block_on(task)??;
    }
    if a.json {
        let doc = serde_json::json!({
            "schema": JSON_SCHEMA,
            "units": {
                "ops_per_s": "operations per second, all clients together",
                "ms_per_op_per_client": "milliseconds per operation, as one client sees it",
                "mb_per_s": "megabytes (10^6 bytes) per second, all clients together, as float32",
                "cpu_cores": "CPU seconds this process used per wall-clock second",
                "machine_busy": "share of all the machine's CPU time that was busy, 0 to 1",
                "seconds": "seconds",
                "tensor_mb": "megabytes (10^6 bytes)",
            },
            "config": {
                "params": a.params,
                "clients": a.clients,
                "seconds": a.seconds,
                "mode": mode.to_string(),
                "ops": ops,
                "dtypes": dtypes.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
                "loopback": a.loopback,
                "transport": transport,
                "reps": a.reps,
                "tensor_mb": num(mb),
            },
            "rows": json_rows.into_inner(),
            "medians": json_medians,
            "baselines": json_baselines,
            "bfloat16_over_float32_time": json_pairs,
            "servers": json_servers,
        });
        println!("{doc}");
    }
    Ok(())
}
