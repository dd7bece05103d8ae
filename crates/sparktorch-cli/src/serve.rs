//! `sparktorch-ps serve`: a standalone parameter server until Ctrl-C.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use sparktorch_optim::HyperValue;
use sparktorch_ps::checkpoint::{self, Checkpoint};
use sparktorch_ps::{LostWorkerPolicy, Server, ServerConfig, ServerTls};

use crate::{parse_mode, random_init};

#[derive(clap::Args)]
pub struct ServeArgs {
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

/// Run the server until Ctrl-C.
pub fn run(a: ServeArgs) -> Result<()> {
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
