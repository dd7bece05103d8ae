//! The engine's hot path over loopback: pulls that never wait for a step, recycled buffers,
//! bounded staleness (SSP) and bfloat16 payloads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sparktorch_optim::{
    build, AtomicF32, HyperValue, Hyperparameters, OptimError, Optimizer, OptimizerState,
};
use sparktorch_proto::payload::{bf16_to_f32, f32_to_bf16};
use sparktorch_proto::{Dtype, Mode};
use sparktorch_ps::{Client, ClientOptions};

/// SGD whose steps take `delay` and report when they start and end.
struct SlowSgd {
    inner: Box<dyn Optimizer>,
    delay: Duration,
    started: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
}

impl SlowSgd {
    fn around<T>(&self, f: impl FnOnce() -> T) -> T {
        self.started.store(true, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let r = f();
        self.finished.store(true, Ordering::SeqCst);
        r
    }
}

impl Optimizer for SlowSgd {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn hyperparameters(&self) -> Hyperparameters {
        self.inner.hyperparameters()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.started.store(true, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.step(params, grads);
        self.finished.store(true, Ordering::SeqCst);
    }
    fn step_into(&mut self, src: &[f32], dst: &mut [f32], grads: &[f32]) {
        // Write the new values first, then dawdle: a store that stepped into the buffer a
        // pull sends from would show them under the old version.
        self.inner.step_into(src, dst, grads);
        self.started.store(true, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.finished.store(true, Ordering::SeqCst);
    }
    fn step_relaxed(&self, params: &[AtomicF32], grads: &[f32]) {
        self.around(|| self.inner.step_relaxed(params, grads));
    }
    fn export_state(&self) -> OptimizerState {
        self.inner.export_state()
    }
    fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        self.inner.import_state(state)
    }
}

fn sgd(len: usize) -> Box<dyn Optimizer> {
    build("SGD", &vec![("lr".into(), HyperValue::Float(1.0))], len).unwrap()
}

fn client_as(r: &Running, worker: u32, dtype: Dtype) -> Client {
    Client::connect(
        "127.0.0.1",
        r.addr.port(),
        SECRET,
        worker,
        0,
        ClientOptions {
            timeout: Duration::from_secs(20),
            dtype,
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn pulls_during_a_slow_step_do_not_wait_for_it() {
    for mode in [Mode::Async, Mode::Hogwild] {
        let n = 1 << 16;
        let started = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let opt = Box::new(SlowSgd {
            inner: sgd(n),
            delay: Duration::from_secs(3),
            started: started.clone(),
            finished: finished.clone(),
        });
        let r = Running::start(server_with(mode, vec![1.0; n], 2, opt, |_| {}));
        let mut pusher = r.client(0, 0).unwrap();
        let mut puller = r.client(1, 0).unwrap();
        let push = std::thread::spawn(move || pusher.push(&vec![0.5; n], 0, 1, 0.0, None));
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = vec![0.0; n];
        // Several pulls while the step sleeps: each answers at once with the version before it
        // (hogwild: whatever the cells hold; the slow step has not touched them yet).
        for _ in 0..3 {
            assert_eq!(puller.pull(&mut out, None).unwrap(), 0, "{mode}");
            assert!(out.iter().all(|v| *v == 1.0), "{mode}");
        }
        assert!(
            !finished.load(Ordering::SeqCst),
            "{mode}: the pulls waited for the step"
        );
        let ack = push.join().unwrap().unwrap();
        assert_eq!(ack.version, 1);
        assert_eq!(puller.pull(&mut out, None).unwrap(), 1);
        assert!(out.iter().all(|v| *v == 0.5), "{mode}");
    }
}

#[test]
fn a_push_staler_than_max_staleness_is_refused_and_recomputed() {
    for mode in [Mode::Async, Mode::Hogwild] {
        let r = Running::start(server(mode, vec![0.0; 4], 2, |c| c.max_staleness = Some(1)));
        let (mut slow, mut fast) = (r.client(0, 0).unwrap(), r.client(1, 0).unwrap());
        let mut out = [0.0; 4];
        assert_eq!(slow.pull(&mut out, None).unwrap(), 0);
        for step in 0..2 {
            fast.push_pull(&[1.0; 4], &mut out, step, 1, 0.0, None)
                .unwrap();
        }
        // Computed on version 0, it would apply to version 2: two versions stale, refused.
        let (ack, pulled) = slow
            .push_pull(&[100.0; 4], &mut out, 0, 1, 0.0, None)
            .unwrap();
        assert!(ack.stale && !ack.duplicate, "{mode}: {ack:?}");
        assert_eq!((ack.version, pulled), (2, 2), "{mode}");
        assert_eq!(out, [-2.0; 4], "{mode}: nothing applied");
        // The same step again, on the version it just pulled: applied (not a duplicate).
        let (ack, _) = slow
            .push_pull(&[1.0; 4], &mut out, 0, 1, 0.0, None)
            .unwrap();
        assert!(!ack.stale && !ack.duplicate, "{mode}: {ack:?}");
        assert_eq!(out, [-3.0; 4], "{mode}");
        let s = r.server.stats();
        assert_eq!((s.stale_refused, s.updates, s.staleness_max), (1, 3, 0));
    }
}

#[test]
fn staleness_never_exceeds_max_staleness_under_contention() {
    let (workers, steps, k, n) = (4u32, 40u64, 1u64, 1 << 14);
    for mode in [Mode::Async, Mode::Hogwild] {
        let r = Arc::new(Running::start(server(mode, vec![0.0; n], workers, |c| {
            c.max_staleness = Some(k)
        })));
        let refused = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..workers)
            .map(|w| {
                let (r, refused) = (r.clone(), refused.clone());
                std::thread::spawn(move || {
                    let mode = mode;
                    let mut c = r.client(w, 0).unwrap();
                    let mut out = vec![0.0; n];
                    let mut pulled = c.pull(&mut out, None).unwrap();
                    let mut step = 0;
                    while step < steps {
                        let (ack, now) = c
                            .push_pull(&vec![1e-3; n], &mut out, step, 1, 0.0, None)
                            .unwrap();
                        if ack.stale {
                            refused.fetch_add(1, Ordering::Relaxed);
                        } else {
                            step += 1;
                            if mode == Mode::Async {
                                // Seen from the client: the step applied to version
                                // `ack.version - 1`, the gradient was computed on `pulled`.
                                assert!(
                                    ack.version - 1 - pulled <= k,
                                    "applied {} steps after the pull of version {pulled}",
                                    ack.version - 1 - pulled
                                );
                            }
                        }
                        pulled = now;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = r.server.stats();
        assert!(
            s.staleness_max <= k,
            "{mode}: staleness {} > {k}",
            s.staleness_max
        );
        assert_eq!(
            s.updates,
            u64::from(workers) * steps,
            "{mode}: every step applied once"
        );
        assert_eq!(s.stale_refused, refused.load(Ordering::Relaxed), "{mode}");
    }
}

#[test]
fn max_staleness_is_refused_in_synchronous_mode() {
    let mut config = sparktorch_ps::ServerConfig::new(SECRET, Mode::Synchronous);
    config.max_staleness = Some(2);
    let err = sparktorch_ps::Server::new(vec![0.0; 2], vec![], sgd(2), config)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("max_staleness"), "{err}");
}

#[test]
fn bf16_clients_halve_the_bytes_and_the_server_keeps_f32_weights() {
    // Larger than the size from which the client encodes a bfloat16 push on a helper thread
    // (4 conversion chunks of 256Ki values) and than the server's parallel step (256Ki), and
    // not a multiple of a chunk, to cover the chunked paths; hogwild covers the cells.
    let n = 1_100_003;
    let init: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.37).sin() * 2.0 + 0.001)
        .collect();
    let grads: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 0.3).collect();
    let round = |v: f32| bf16_to_f32(f32_to_bf16(v));
    for mode in [Mode::Async, Mode::Hogwild, Mode::Synchronous] {
        let r = Running::start(server(mode, init.clone(), 1, |_| {}));
        let mut half = client_as(&r, 0, Dtype::Bf16);
        let mut out = vec![0.0; n];
        half.pull(&mut out, None).unwrap();
        let rounded: Vec<f32> = init.iter().map(|v| round(*v)).collect();
        assert_eq!(
            out, rounded,
            "{mode}: the pull is the bf16 rounding of the f32 weights"
        );
        let before = r.server.stats();
        half.push_pull(&grads, &mut out, 0, 1, 0.0, None).unwrap();
        // The server counts bytes out once its write returned, which may be just after the
        // client has read them all: wait (bounded) for the count to settle.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut after = r.server.stats();
        while after.bytes_out - before.bytes_out < (n as u64) * 2
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
            after = r.server.stats();
        }
        let (pushed, pulled) = (
            after.bytes_in - before.bytes_in,
            after.bytes_out - before.bytes_out,
        );
        for bytes in [pushed, pulled] {
            assert!(
                bytes >= (n as u64) * 2 && bytes < (n as u64) * 2 + 200,
                "{mode}: {bytes} bytes for {n} values"
            );
        }
        // The server stepped its f32 master weights with the widened bf16 gradient (SGD,
        // lr = 1): exactly init - round(g), not a bf16 value.
        let (version, master) = r.server.parameters();
        assert_eq!(version, 1);
        let want: Vec<f32> = init
            .iter()
            .zip(&grads)
            .map(|(p, g)| p - round(*g))
            .collect();
        assert_eq!(master, want, "{mode}");
        assert!(master.iter().any(|v| round(*v) != *v), "{mode}: f32 kept");
        // The PushPull's bf16 answer is the rounding of the new master weights (async and
        // synchronous: the bfloat16 copy the step wrote, since the first pull asked for bf16).
        let want_half: Vec<f32> = want.iter().map(|v| round(*v)).collect();
        assert_eq!(out, want_half, "{mode}: bf16 answer");
        // An f32 client on the same server reads the master weights exactly.
        half.close();
        let mut full = client_as(&r, 0, Dtype::F32);
        full.pull(&mut out, None).unwrap();
        assert_eq!(out, want, "{mode}");
    }
}

#[test]
fn buffers_are_recycled_while_many_pulls_overlap_steps() {
    let (workers, steps, n) = (4u32, 25u64, 1 << 18);
    let r = Arc::new(Running::start(server(
        Mode::Async,
        vec![0.0; n],
        workers,
        |_| {},
    )));
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut c = r.client(w, 0).unwrap();
                let mut out = vec![0.0; n];
                for step in 0..steps {
                    c.push_pull(&vec![1.0; n], &mut out, step, 1, 0.0, None)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = r.server.stats();
    assert_eq!(s.version, u64::from(workers) * steps);
    // Bounded by the versions pulls hold at once (one per client), plus the one a step writes:
    // never one per step.
    assert!(
        s.store_allocations <= u64::from(workers) + 1,
        "{} allocations for {} steps",
        s.store_allocations,
        s.version
    );
    let (_, p) = r.server.parameters();
    assert!(p
        .iter()
        .all(|v| *v == -((u64::from(workers) * steps) as f32)));
}

#[test]
fn a_refused_worker_is_not_starved_by_faster_ones() {
    // max_staleness 0, one fast worker pushing as fast as it can (up to 20,000 steps, about
    // 2 s unhindered) and one that computes 20 ms
    // per step: after each refusal the fast worker's pushes wait for the slow one, so the slow
    // worker finishes its steps long before the fast one (without that, every push of the
    // slow worker would be refused until the fast one had finished all of its steps).
    let r = Arc::new(Running::start(server(Mode::Async, vec![0.0; 64], 2, |c| {
        c.max_staleness = Some(0)
    })));
    const FAST_STEPS: u64 = 20_000;
    let fast_done = Arc::new(AtomicU64::new(0));
    let slow_done = Arc::new(AtomicBool::new(false));
    let fast = {
        let (r, fast_done, slow_done) = (r.clone(), fast_done.clone(), slow_done.clone());
        std::thread::spawn(move || {
            let mut c = r.client(0, 0).unwrap();
            let mut out = vec![0.0; 64];
            c.pull(&mut out, None).unwrap();
            let mut step = 0;
            while step < FAST_STEPS && !slow_done.load(Ordering::SeqCst) {
                let (ack, _) = c
                    .push_pull(&[1e-3; 64], &mut out, step, 1, 0.0, None)
                    .unwrap();
                if !ack.stale {
                    step += 1;
                    fast_done.store(step, Ordering::SeqCst);
                }
            }
        })
    };
    let mut c = r.client(1, 0).unwrap();
    let mut out = vec![0.0; 64];
    c.pull(&mut out, None).unwrap();
    let (mut step, mut refusals, mut worst) = (0, 0u32, 0u32);
    while step < 10 {
        std::thread::sleep(Duration::from_millis(20));
        let (ack, _) = c
            .push_pull(&[1e-3; 64], &mut out, step, 1, 0.0, None)
            .unwrap();
        if ack.stale {
            refusals += 1;
            worst = worst.max(refusals);
        } else {
            step += 1;
            refusals = 0;
        }
    }
    let fast_steps = fast_done.load(Ordering::SeqCst);
    slow_done.store(true, Ordering::SeqCst);
    fast.join().unwrap();
    // Once refused, only a fast push already under way can get in before it: it may be
    // refused once more, not again and again.
    assert!(
        worst <= 3,
        "the slow worker was refused {worst} times in a row"
    );
    assert!(
        fast_steps < FAST_STEPS,
        "the slow worker only got through after the fast one"
    );
    assert!(r.server.stats().staleness_max == 0);
}

#[tokio::test]
async fn a_bf16_push_must_carry_one_value_per_parameter() {
    use sparktorch_proto::{encode_head_as, ErrorCode, Message, PushMeta};
    use tokio::io::AsyncWriteExt;
    let server = server(Mode::Async, vec![0.0; 8], 1, |_| {});
    let addr = start_local(&server).await;
    let mut raw = Raw::register(addr, 0).await;
    // 16 bfloat16 values (32 bytes) for an 8-parameter model: the byte count an f32 push of 8
    // values would have, but twice the values.
    let meta = PushMeta {
        worker: 0,
        attempt: 0,
        step: 0,
        batch_size: 1,
        loss: 0.0,
        val_loss: f64::NAN,
        base_version: 0,
    };
    let mut frame = Vec::new();
    encode_head_as(&Message::Push(meta), Dtype::Bf16, 32, &mut frame).unwrap();
    frame.extend_from_slice(&[0u8; 32]);
    raw.s.write_all(&frame).await.unwrap();
    match raw.recv().await {
        Some((Message::Error { code, message }, _)) => {
            assert_eq!(code, ErrorCode::WrongLength, "{message}");
            assert!(message.contains("16 values"), "{message}");
        }
        other => panic!("expected WrongLength, got {other:?}"),
    }
    assert_eq!(server.version(), 0, "nothing applied");
}
