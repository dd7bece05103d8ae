//! Checkpoints through a running server: periodic and final writes, resume equal bit for bit
//! to an uninterrupted run, mismatches refused.

use std::path::{Path, PathBuf};

use sparktorch_optim::{build, HyperValue, Hyperparameters, OptimizerState};
use sparktorch_proto::Mode;
use sparktorch_ps::{Checkpoint, CheckpointError, PsError, Server, ServerConfig};

use super::{Running, SECRET};

const N: usize = 10;

fn layout() -> Vec<(String, Vec<usize>)> {
    vec![
        ("fc.weight".into(), vec![2, 4]),
        ("fc.bias".into(), vec![2]),
    ]
}

fn adam() -> Hyperparameters {
    vec![
        ("lr".into(), HyperValue::Float(0.01)),
        ("betas".into(), HyperValue::Pair(0.8, 0.99)),
    ]
}

fn sgd_momentum() -> Hyperparameters {
    vec![
        ("lr".into(), HyperValue::Float(0.1)),
        ("momentum".into(), HyperValue::Float(0.9)),
        ("nesterov".into(), HyperValue::Bool(true)),
    ]
}

fn config(mode: Mode, workers: u32, dir: Option<&Path>, interval: u64) -> ServerConfig {
    let mut c = ServerConfig::new(SECRET, mode);
    c.num_workers = workers;
    c.checkpoint_dir = dir.map(Path::to_path_buf);
    c.checkpoint_interval = interval;
    c
}

fn init() -> Vec<f32> {
    (0..N).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// A deterministic gradient per (worker, step).
fn grad(worker: u32, step: u64) -> Vec<f32> {
    (0..N)
        .map(|i| ((i as f32 + 1.0) * (step as f32 + 1.3) + worker as f32 * 0.7).cos())
        .collect()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spt-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// An optimizer state as bits: step, scalars, buffers (sorted by name).
type StateBits = (u64, Vec<(String, u64)>, Vec<(String, Vec<u32>)>);

fn state_bits(s: &OptimizerState) -> StateBits {
    let mut scalars: Vec<_> = s
        .scalars
        .iter()
        .map(|(k, v)| (k.clone(), v.to_bits()))
        .collect();
    scalars.sort();
    let mut buffers: Vec<_> = s
        .buffers
        .iter()
        .map(|(k, v)| (k.clone(), bits(v)))
        .collect();
    buffers.sort();
    (s.step, scalars, buffers)
}

/// Steps `from..to` of every worker (synchronous: one round per step, every worker pushes).
fn train(r: &Running, workers: u32, from: u64, to: u64) {
    let mut clients: Vec<_> = (0..workers).map(|w| r.client(w, 0).unwrap()).collect();
    for c in &clients {
        assert_eq!(c.resume_step(), from, "worker {}", c.worker());
    }
    let mut out = vec![0f32; N];
    for step in from..to {
        for c in clients.iter_mut() {
            let w = c.worker();
            c.push(&grad(w, step), step, 4 + u64::from(w), 1.0, None)
                .unwrap();
        }
        // Wait until the step (or round) is applied; every worker computes its next step on
        // the new version (synchronous: a gradient on an older one would be discarded).
        for c in clients.iter_mut() {
            let v = c.pull(&mut out, None).unwrap();
            assert!(v >= 1);
        }
    }
    drop(clients);
}

fn server(optimizer: &str, hyper: &Hyperparameters, c: ServerConfig) -> Server {
    let opt = build(optimizer, hyper, N).unwrap();
    Server::new(init(), layout(), opt, c).unwrap()
}

fn resumed(
    mode: Mode,
    optimizer: &str,
    hyper: &Hyperparameters,
    c: ServerConfig,
    file: &Path,
) -> Result<Server, PsError> {
    let _ = mode;
    let ckpt = Checkpoint::read(file)?;
    let opt = build(optimizer, hyper, N).unwrap();
    Server::resume(layout(), opt, c, ckpt, file)
}

fn resume_equals_uninterrupted(mode: Mode, workers: u32, optimizer: &str, hyper: Hyperparameters) {
    let (n_steps, m_steps) = (5u64, 4u64);
    // Uninterrupted: N + M steps.
    let full = Running::start(server(optimizer, &hyper, config(mode, workers, None, 0)));
    train(&full, workers, 0, n_steps + m_steps);
    let want = full.server.parameters();
    let want_state = full.server.optimizer_state();

    // N steps, checkpoint on demand, a new server resumed from it, M more steps.
    let dir = tempdir(&format!("resume-{}-{optimizer}", mode.as_str()));
    let first = Running::start(server(optimizer, &hyper, config(mode, workers, None, 0)));
    train(&first, workers, 0, n_steps);
    let (version, file) = first.server.save_checkpoint(&dir).unwrap_or_else(|e| {
        panic!("save_checkpoint: {e}");
    });
    assert_eq!(file, dir.join("checkpoint.safetensors"));
    drop(first);
    let ckpt = Checkpoint::read(&file).unwrap();
    assert_eq!(ckpt.version, version);
    assert_eq!(ckpt.workers.len(), workers as usize);
    for (w, s) in &ckpt.workers {
        assert_eq!(s.next_step, n_steps, "worker {w}");
    }
    let second = Running::start(
        resumed(
            mode,
            optimizer,
            &hyper,
            config(mode, workers, None, 0),
            &file,
        )
        .unwrap(),
    );
    assert_eq!(second.server.version(), version);
    train(&second, workers, n_steps, n_steps + m_steps);
    let got = second.server.parameters();
    assert_eq!(got.0, want.0, "versions");
    assert_eq!(
        bits(&got.1),
        bits(&want.1),
        "parameters differ from the uninterrupted run"
    );
    assert_eq!(
        state_bits(&second.server.optimizer_state()),
        state_bits(&want_state)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_is_bit_for_bit_async_adam() {
    resume_equals_uninterrupted(Mode::Async, 1, "Adam", adam());
}

#[test]
fn resume_is_bit_for_bit_synchronous_sgd_momentum() {
    resume_equals_uninterrupted(Mode::Synchronous, 2, "SGD", sgd_momentum());
}

#[test]
fn resume_is_bit_for_bit_synchronous_adam() {
    resume_equals_uninterrupted(Mode::Synchronous, 3, "Adam", adam());
}

#[test]
fn periodic_and_final_checkpoints_are_written_and_reported() {
    let dir = tempdir("periodic");
    let r = Running::start(server(
        "SGD",
        &sgd_momentum(),
        config(Mode::Async, 1, Some(&dir), 3),
    ));
    train(&r, 1, 0, 7);
    let file = dir.join("checkpoint.safetensors");
    // The periodic write runs in the background: wait (bounded) for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r
        .server
        .stats()
        .last_checkpoint_version
        .is_none_or(|v| v < 6)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let stats = r.server.stats();
    assert!(
        matches!(stats.last_checkpoint_version, Some(3..=7)),
        "{stats:?}"
    );
    assert_eq!(
        stats.last_checkpoint_path.as_deref(),
        Some(file.display().to_string().as_str())
    );
    assert_eq!(stats.checkpoint_errors, 0);
    let ckpt = Checkpoint::read(&dir).unwrap();
    assert!(ckpt.version >= 6 && ckpt.version <= 7);
    assert_eq!(ckpt.layout, layout());
    assert_eq!(ckpt.optimizer, "SGD");
    // Stopping writes the final one: version 7, the last step of worker 0.
    let server = r.server.clone();
    drop(r);
    let ckpt = Checkpoint::read(&file).unwrap();
    assert_eq!(ckpt.version, 7);
    assert_eq!(ckpt.workers.get(&0).map(|w| w.next_step), Some(7));
    assert_eq!(bits(&ckpt.params), bits(&server.parameters().1));
    assert_eq!(server.stats().last_checkpoint_version, Some(7));
    // No temp file left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("checkpoint.safetensors")]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_checkpoint_directory_is_counted_not_fatal() {
    let dir = tempdir("failing");
    let r = Running::start(server(
        "SGD",
        &sgd_momentum(),
        config(Mode::Async, 1, Some(&dir), 1),
    ));
    // The directory becomes a file: every write fails.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    train(&r, 1, 0, 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.server.stats().checkpoint_errors == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(r.server.stats().checkpoint_errors >= 1);
    assert_eq!(r.server.version(), 3, "training went on");
    // The final checkpoint fails too, and stopping says so (a resume would start from an
    // older file, or none).
    let err = r.stop().unwrap_err();
    assert!(
        matches!(err, PsError::Checkpoint(CheckpointError::Io { .. })),
        "{err}"
    );
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn resume_refuses_another_layout_optimizer_or_mode() {
    let dir = tempdir("mismatch");
    let r = Running::start(server("Adam", &adam(), config(Mode::Async, 1, None, 0)));
    train(&r, 1, 0, 2);
    let (_, file) = r
        .server
        .save_checkpoint(&dir.join("x.safetensors"))
        .unwrap();
    drop(r);
    let field = |e: Result<Server, PsError>| match e {
        Err(PsError::Checkpoint(CheckpointError::Mismatch { field, .. })) => field,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("resumed despite a mismatch"),
    };
    let c = || config(Mode::Async, 1, None, 0);
    assert_eq!(
        field(resumed(Mode::Async, "SGD", &sgd_momentum(), c(), &file)),
        "optimizer"
    );
    assert_eq!(
        field(resumed(
            Mode::Synchronous,
            "Adam",
            &adam(),
            config(Mode::Synchronous, 1, None, 0),
            &file
        )),
        "mode"
    );
    let ckpt = Checkpoint::read(&file).unwrap();
    let other = vec![
        ("fc.weight".into(), vec![4, 2]),
        ("fc.bias".into(), vec![2]),
    ];
    let e = Server::resume(other, build("Adam", &adam(), N).unwrap(), c(), ckpt, &file);
    let msg = match &e {
        Err(err) => err.to_string(),
        Ok(_) => String::new(),
    };
    assert_eq!(field(e), "layout");
    assert!(
        msg.contains("fc.weight") && msg.contains("x.safetensors"),
        "{msg}"
    );
    // Another learning rate is allowed (with a warning).
    let lr = vec![("lr".into(), HyperValue::Float(0.5))];
    let s = resumed(Mode::Async, "Adam", &lr, c(), &file).unwrap();
    assert_eq!(s.version(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hogwild_checkpoints_are_best_effort_but_valid() {
    let dir = tempdir("hogwild");
    let r = Running::start(server(
        "Adam",
        &adam(),
        config(Mode::Hogwild, 1, Some(&dir), 2),
    ));
    train(&r, 1, 0, 4);
    drop(r);
    let ckpt = Checkpoint::read(&dir).unwrap();
    assert_eq!(ckpt.mode, Mode::Hogwild);
    assert_eq!(ckpt.version, 4);
    assert_eq!(ckpt.optimizer_state.step, 4);
    let _ = std::fs::remove_dir_all(&dir);
}
