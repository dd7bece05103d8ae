//! The server and client over loopback (port 0), end to end.
//!
//! Blocking-client tests run the server on a small multi-thread runtime and the clients on
//! plain threads. Timeout tests run everything on one paused-clock runtime with a minimal async
//! client speaking raw frames, so that round and handshake timeouts elapse instantly.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sparktorch_proto::{
    auth, decode_header, decode_meta, encode_head, payload, ErrorCode, Message, Mode, PushMeta,
    HEADER_LEN, MAX_PAYLOAD_BYTES, NONCE_LEN,
};
use sparktorch_ps::{Client, ClientError, ClientOptions, LostWorkerPolicy, ServerTls};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_secret_is_refused_before_any_state_is_touched() {
    let r = Running::start(server(Mode::Async, vec![0.0; 8], 1, |_| {}));
    let err = Client::connect(
        "127.0.0.1",
        r.addr.port(),
        b"not-the-secret-at-all",
        0,
        0,
        ClientOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, ClientError::Auth { .. }), "{err}");
    r.quiesce();
    let s = r.server.stats();
    assert_eq!(s.auth_failures, 1);
    assert!(
        s.steps_per_worker.is_empty(),
        "the worker must not be registered"
    );
    assert_eq!(s.version, 0);
}

#[tokio::test]
async fn missing_secret_is_refused() {
    let server = server(Mode::Async, vec![0.0; 4], 1, |_| {});
    let addr = start_local(&server).await;
    let mut raw = Raw::connect(addr).await;
    assert!(matches!(raw.recv().await, Some((Message::Hello { .. }, _))));
    // Skip the proof and go straight for the parameters.
    raw.send(
        &Message::Register {
            worker: 0,
            attempt: 0,
        },
        &[],
    )
    .await;
    match raw.recv().await {
        Some((Message::Error { code, .. }, _)) => assert_eq!(code, ErrorCode::AuthFailed),
        other => panic!("expected an AuthFailed error, got {other:?}"),
    }
    assert!(raw.closed().await);
    let s = server.stats();
    assert_eq!(s.auth_failures, 1);
    assert!(s.steps_per_worker.is_empty());
}

#[tokio::test]
async fn connection_dropped_mid_push_changes_nothing() {
    let server = server(Mode::Async, vec![0.5; 64], 1, |_| {});
    let addr = start_local(&server).await;
    let mut raw = Raw::register(addr, 0).await;
    // A push whose payload stops halfway, then the connection drops.
    let mut out = Vec::new();
    encode_head(&Message::Push(push_meta(0, 0, 1)), 64 * 4, &mut out).unwrap();
    out.extend_from_slice(&payload::as_wire_bytes(&[1.0f32; 32]));
    raw.s.write_all(&out).await.unwrap();
    drop(raw);
    // A later client sees the untouched parameters and may push step 0 as new.
    let mut raw = Raw::register(addr, 0).await;
    raw.send(&Message::Pull { newer_than: -1 }, &[]).await;
    let (msg, values) = raw.recv().await.unwrap();
    assert!(matches!(msg, Message::Params { version: 0, .. }));
    assert_eq!(values, vec![0.5; 64]);
    let s = server.stats();
    assert_eq!((s.version, s.updates), (0, 0));
    assert_eq!(s.steps_per_worker.get(&0), Some(&0));
    assert_eq!(server.history(), vec![]);
}

#[test]
fn replayed_push_is_applied_once_and_stale_attempts_are_refused() {
    let r = Running::start(server(Mode::Async, vec![0.0; 4], 1, |_| {}));
    let mut c = r.client(0, 0).unwrap();
    assert_eq!(c.resume_step(), 0);
    let g = [1.0f32; 4];
    let first = c.push(&g, 0, 8, 0.5, None).unwrap();
    let again = c.push(&g, 0, 8, 0.5, None).unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!((first.version, again.version), (1, 1));
    c.push(&g, 1, 8, 0.5, None).unwrap();
    // A retried task (attempt 1) resumes after the applied steps; a replay of step 1 is a no-op.
    let mut retry = r.client(0, 1).unwrap();
    assert_eq!(retry.resume_step(), 2);
    assert!(retry.push(&g, 1, 8, 0.5, None).unwrap().duplicate);
    // The old attempt is refused from now on.
    let err = c.push(&g, 2, 8, 0.5, None).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::StaleAttempt,
                ..
            }
        ),
        "{err}"
    );
    let s = r.server.stats();
    assert_eq!((s.version, s.updates, s.duplicates), (2, 2, 2));
    assert_eq!(r.server.parameters().1, vec![-2.0; 4]);
    assert_eq!(r.server.history().len(), 2);
}

fn hammer(r: &Arc<Running>, threads: u32, pushes: u64, n: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|w| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut c = r.client(w, 0).unwrap();
                let g = vec![1.0f32; n];
                let mut out = vec![0.0f32; n];
                for step in 0..pushes {
                    if step % 2 == 0 {
                        c.pull(&mut out, None).unwrap();
                        c.push(&g, step, 1, 1.0, None).unwrap();
                    } else {
                        c.push_pull(&g, &mut out, step, 1, 1.0, None).unwrap();
                    }
                }
                c.close();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn async_mode_loses_no_update() {
    let n = 1000;
    let r = Arc::new(Running::start(server(Mode::Async, vec![0.0; n], 4, |_| {})));
    hammer(&r, 4, 50, n);
    // SGD lr=1, gradients of ones: every push subtracts exactly 1.
    let (version, params) = r.server.parameters();
    assert_eq!(version, 200);
    assert!(params.iter().all(|&p| p == -200.0), "{:?}", &params[..4]);
    let s = r.server.stats();
    assert_eq!(s.updates, 200);
    assert_eq!(s.workers_done, 4);
    assert_eq!(s.updates_per_worker.values().sum::<u64>(), 200);
}

#[test]
fn hogwild_mode_applies_every_update_one_worker_at_a_time() {
    // Nothing runs concurrently: lock-free or not, every update must land exactly.
    let n = 1000;
    let r = Arc::new(Running::start(server(
        Mode::Hogwild,
        vec![0.0; n],
        1,
        |_| {},
    )));
    hammer(&r, 1, 200, n);
    let (version, params) = r.server.parameters();
    assert_eq!(version, 200);
    assert!(params.iter().all(|&p| p == -200.0), "{:?}", &params[..4]);
}

#[test]
fn hogwild_mode_applies_concurrent_pushes() {
    let n = 1000;
    let r = Arc::new(Running::start(server(
        Mode::Hogwild,
        vec![0.0; n],
        4,
        |_| {},
    )));
    hammer(&r, 4, 50, n);
    let (version, params) = r.server.parameters();
    assert_eq!(version, 200);
    assert_eq!(r.server.stats().updates, 200);
    // Relaxed element-wise updates may lose an increment where two steps overlap on an
    // element, never invent one. A step over 1,000 elements takes microseconds and each worker
    // spends a round trip between steps, so overlaps are rare: at least 90% of the 200
    // updates land on every element (measured over 20 runs on a busy 2-core machine: the
    // least-updated element lost 0 to 4 of 200).
    assert!(
        params.iter().all(|&p| (-200.0..=-180.0).contains(&p)),
        "min {:?} max {:?}",
        params.iter().copied().fold(f32::INFINITY, f32::min),
        params.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    );
}

#[test]
fn synchronous_round_is_the_exact_batch_weighted_average() {
    let n = 257;
    let r = Arc::new(Running::start(server(
        Mode::Synchronous,
        vec![0.0; n],
        4,
        |_| {},
    )));
    let grads: Vec<Vec<f32>> = (0..4)
        .map(|w| {
            (0..n)
                .map(|i| ((i * 7 + w * 13) % 17) as f32 * 0.1 - 0.77)
                .collect()
        })
        .collect();
    let batch = [3u64, 5, 1, 8];
    let handles: Vec<_> = (0..4u32)
        .map(|w| {
            let r = r.clone();
            let g = grads[w as usize].clone();
            std::thread::spawn(move || {
                let mut c = r.client(w, 0).unwrap();
                let mut out = vec![0.0f32; g.len()];
                c.pull(&mut out, None).unwrap();
                let (_, v) = c
                    .push_pull(&g, &mut out, 0, batch[w as usize], 1.0, None)
                    .unwrap();
                (v, out)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total: u64 = batch.iter().sum();
    let expected: Vec<f32> = (0..n)
        .map(|i| {
            let mut acc = 0f64;
            for w in 0..4 {
                acc += batch[w] as f64 * f64::from(grads[w][i]);
            }
            -((acc / total as f64) as f32)
        })
        .collect();
    for (v, out) in &results {
        assert_eq!(*v, 1);
        assert_eq!(
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert_eq!(r.server.version(), 1);
}

#[test]
fn early_stop_is_global_and_returned_in_every_ack() {
    let r = Arc::new(Running::start(server(
        Mode::Synchronous,
        vec![0.0; 4],
        2,
        |c| {
            c.early_stop_patience = Some(2);
        },
    )));
    // Round losses (mean of both workers): 1.0, 0.9, 0.95, 0.9 -> two non-improvements.
    let losses = [[1.0, 1.0], [0.8, 1.0], [0.95, 0.95], [0.9, 0.9]];
    let handles: Vec<_> = (0..2u32)
        .map(|w| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut c = r.client(w, 0).unwrap();
                let mut out = [0.0f32; 4];
                let mut stops = vec![];
                for (step, l) in losses.iter().enumerate() {
                    let (_, v) = c
                        .push_pull(
                            &[0.0; 4],
                            &mut out,
                            step as u64,
                            1,
                            9.0,
                            Some(l[w as usize]),
                        )
                        .unwrap();
                    stops.push((v, c.should_stop().unwrap()));
                }
                stops
            })
        })
        .collect();
    for h in handles {
        let stops = h.join().unwrap();
        assert_eq!(
            stops.iter().map(|s| s.1).collect::<Vec<_>>(),
            [false, false, false, true]
        );
    }
    let s = r.server.stats();
    assert!(s.should_stop);
    assert_eq!(s.best_loss, 0.9);
    // History carries both losses; val_loss was used for the evaluation.
    assert_eq!(r.server.history().len(), 8);
}

#[tokio::test(start_paused = true)]
async fn lost_worker_is_dropped_after_the_round_timeout() {
    let server = server(Mode::Synchronous, vec![0.0; 4], 2, |c| {
        c.round_timeout = Duration::from_secs(30);
        c.io_timeout = Duration::from_secs(3600);
    });
    let addr = start_local(&server).await;
    let mut a = Raw::register(addr, 0).await;
    let _silent = Raw::register(addr, 1).await;
    a.send(&Message::Push(push_meta(0, 0, 2)), &[2.0; 4]).await;
    assert!(matches!(
        a.recv().await,
        Some((Message::PushAck { version: 0, .. }, _))
    ));
    let t0 = tokio::time::Instant::now();
    a.send(&Message::Pull { newer_than: 0 }, &[]).await;
    let (msg, values) = a.recv().await.unwrap();
    assert!(matches!(msg, Message::Params { version: 1, .. }), "{msg:?}");
    assert!(t0.elapsed() >= Duration::from_secs(30));
    assert_eq!(values, vec![-2.0; 4]);
    let s = server.stats();
    assert_eq!((s.workers_lost, s.workers_live), (1, 1));
    // The next round only waits for the live worker.
    a.send(&Message::Push(push_on(0, 1, 2, 1)), &[1.0; 4]).await;
    assert!(matches!(
        a.recv().await,
        Some((Message::PushAck { version: 2, .. }, _))
    ));
}

/// The next frame, which must be a `PushAck`: `(version, duplicate)`.
async fn ack(raw: &mut Raw) -> (u64, bool) {
    match raw.recv().await {
        Some((
            Message::PushAck {
                version, duplicate, ..
            },
            _,
        )) => (version, duplicate),
        other => panic!("expected PushAck, got {other:?}"),
    }
}

/// The next frame, which must be `Params`: `(version, values)`.
async fn params(raw: &mut Raw) -> (u64, Vec<f32>) {
    match raw.recv().await {
        Some((Message::Params { version, .. }, values)) => (version, values),
        other => panic!("expected Params, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_worker_pushing_late_is_discarded_and_continues_from_the_current_version() {
    let server = server(Mode::Synchronous, vec![0.0; 4], 2, |c| {
        c.round_timeout = Duration::from_secs(30);
        c.io_timeout = Duration::from_secs(3600);
    });
    let addr = start_local(&server).await;
    let mut a = Raw::register(addr, 0).await;
    let mut b = Raw::register(addr, 1).await;
    // Round 1: worker 1 is slow, the round closes without it after 30 s (SGD, lr 1).
    a.send(&Message::PushPull(push_on(0, 0, 1, 0)), &[1.0; 4])
        .await;
    assert_eq!(ack(&mut a).await, (0, false));
    assert_eq!(params(&mut a).await, (1, vec![-1.0; 4]));
    assert_eq!(server.stats().workers_lost, 1);
    // Round 2: worker 0 alone.
    a.send(&Message::PushPull(push_on(0, 1, 1, 1)), &[1.0; 4])
        .await;
    assert_eq!(ack(&mut a).await, (2, false));
    assert_eq!(params(&mut a).await, (2, vec![-2.0; 4]));
    // Worker 1's gradient for step 0, computed on version 0, arrives now: acknowledged, not
    // averaged into round 3, and its pull answers at once with version 2.
    b.send(&Message::PushPull(push_on(1, 0, 1, 0)), &[100.0; 4])
        .await;
    assert_eq!(ack(&mut b).await, (2, false));
    assert_eq!(params(&mut b).await, (2, vec![-2.0; 4]));
    // A retry of the discarded step is a duplicate.
    b.send(&Message::Push(push_on(1, 0, 1, 0)), &[100.0; 4])
        .await;
    assert_eq!(ack(&mut b).await, (2, true));
    // Round 3: both workers, on version 2; the rejoined worker is waited for.
    a.send(&Message::PushPull(push_on(0, 2, 1, 2)), &[1.0; 4])
        .await;
    assert_eq!(ack(&mut a).await, (2, false));
    b.send(&Message::PushPull(push_on(1, 1, 1, 2)), &[3.0; 4])
        .await;
    assert_eq!(ack(&mut b).await, (3, false));
    assert_eq!(params(&mut b).await, (3, vec![-4.0; 4]));
    assert_eq!(params(&mut a).await, (3, vec![-4.0; 4]));
    assert_eq!(server.parameters(), (3, vec![-4.0; 4]));
    // The discarded gradient is not in the history.
    let history: Vec<(u32, u64)> = server.history().iter().map(|h| (h.0, h.1)).collect();
    assert_eq!(history, vec![(0, 0), (0, 1), (0, 2), (1, 1)]);
    let s = server.stats();
    assert_eq!(
        (s.stale_discarded, s.workers_live, s.workers_lost),
        (1, 2, 0)
    );
    assert_eq!(s.steps_per_worker.get(&1), Some(&2));
}

#[tokio::test(start_paused = true)]
async fn a_retried_worker_whose_gradient_waits_in_the_round_gets_the_round_result() {
    let server = server(Mode::Synchronous, vec![0.0; 4], 2, |c| {
        c.round_timeout = Duration::from_secs(30);
        c.io_timeout = Duration::from_secs(3600);
    });
    let addr = start_local(&server).await;
    let mut a = Raw::register(addr, 0).await;
    // Worker 1 pushes step 0, then its task dies before the round closes.
    let mut b = Raw::register(addr, 1).await;
    b.send(&Message::Push(push_on(1, 0, 1, 0)), &[3.0; 4]).await;
    assert_eq!(ack(&mut b).await, (0, false));
    drop(b);
    // Its retry resumes at step 1 and pulls (any `newer_than`): the answer is the round's
    // result, once worker 0 has pushed, not the version its step 0 was computed on.
    let mut b = Raw::handshake(addr, SECRET).await;
    b.send(
        &Message::Register {
            worker: 1,
            attempt: 1,
        },
        &[],
    )
    .await;
    match b.recv().await {
        Some((Message::Registered { resume_step, .. }, _)) => assert_eq!(resume_step, 1),
        other => panic!("expected Registered, got {other:?}"),
    }
    b.send(&Message::Pull { newer_than: -1 }, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.send(&Message::Push(push_on(0, 0, 1, 0)), &[1.0; 4]).await;
    assert_eq!(ack(&mut a).await, (1, false));
    assert_eq!(params(&mut b).await, (1, vec![-2.0; 4]));
    // Both continue on version 1; nothing is refused, nothing waits for the timeout.
    let t0 = tokio::time::Instant::now();
    let mut step1 = push_on(1, 1, 1, 1);
    step1.attempt = 1;
    b.send(&Message::Push(step1), &[1.0; 4]).await;
    assert_eq!(ack(&mut b).await, (1, false));
    a.send(&Message::PushPull(push_on(0, 1, 1, 1)), &[1.0; 4])
        .await;
    assert_eq!(ack(&mut a).await, (2, false));
    assert_eq!(params(&mut a).await, (2, vec![-3.0; 4]));
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(server.stats().stale_discarded, 0);
}

#[test]
fn a_retried_workers_first_pull_may_wait_for_the_round_longer_than_the_io_timeout() {
    let r = Arc::new(Running::start(server(
        Mode::Synchronous,
        vec![0.0; 4],
        2,
        |c| c.round_timeout = Duration::from_secs(20),
    )));
    let connect = |worker, attempt| {
        Client::connect(
            "127.0.0.1",
            r.addr.port(),
            SECRET,
            worker,
            attempt,
            ClientOptions {
                timeout: Duration::from_millis(300),
                connect_timeout: Duration::from_secs(2),
                server_fingerprint: None,
                ..ClientOptions::default()
            },
        )
        .unwrap()
    };
    let mut out = [0.0f32; 4];
    // Worker 1 pushes step 0, then its task dies; the retry's first pull waits for the round.
    let mut b = connect(1, 0);
    b.pull(&mut out, None).unwrap();
    b.push(&[3.0; 4], 0, 1, 1.0, None).unwrap();
    drop(b);
    let mut b = connect(1, 1);
    assert_eq!(b.resume_step(), 1);
    let waiting = std::thread::spawn(move || {
        let mut out = [0.0f32; 4];
        let v = b.pull(&mut out, None);
        (v, out)
    });
    // Longer than the client's 300 ms exchange bound.
    std::thread::sleep(Duration::from_millis(900));
    let mut a = connect(0, 0);
    a.pull(&mut out, None).unwrap();
    a.push(&[1.0; 4], 0, 1, 1.0, None).unwrap();
    let (v, out) = waiting.join().unwrap();
    assert_eq!((v.unwrap(), out), (1, [-2.0; 4]));
}

#[tokio::test(start_paused = true)]
async fn lost_worker_under_fail_policy_answers_every_waiter_with_an_error() {
    let server = server(Mode::Synchronous, vec![0.0; 4], 3, |c| {
        c.round_timeout = Duration::from_secs(30);
        c.io_timeout = Duration::from_secs(3600);
        c.lost_worker_policy = LostWorkerPolicy::Fail;
    });
    let addr = start_local(&server).await;
    let mut a = Raw::register(addr, 0).await;
    let mut b = Raw::register(addr, 1).await;
    for (raw, w) in [(&mut a, 0), (&mut b, 1)] {
        raw.send(&Message::Push(push_meta(w, 0, 1)), &[1.0; 4])
            .await;
        assert!(matches!(
            raw.recv().await,
            Some((Message::PushAck { .. }, _))
        ));
        raw.send(&Message::Pull { newer_than: 0 }, &[]).await;
    }
    for raw in [&mut a, &mut b] {
        match raw.recv().await {
            Some((Message::Error { code, message }, _)) => {
                assert_eq!(code, ErrorCode::WorkerLost);
                assert!(message.contains("[2]"), "{message}");
            }
            other => panic!("expected WorkerLost, got {other:?}"),
        }
    }
    assert!(server.stats().error.is_some());
    assert_eq!(server.version(), 0);
}

#[tokio::test(start_paused = true)]
async fn silent_peer_is_dropped_after_the_handshake_timeout() {
    let server = server(Mode::Async, vec![0.0; 4], 1, |_| {});
    let addr = start_local(&server).await;
    let mut raw = Raw::connect(addr).await;
    assert!(matches!(raw.recv().await, Some((Message::Hello { .. }, _))));
    let t0 = tokio::time::Instant::now();
    assert!(raw.closed().await);
    assert!(t0.elapsed() >= sparktorch_proto::HANDSHAKE_TIMEOUT);
}

#[tokio::test]
async fn hostile_bytes_never_crash_the_server_nor_touch_its_state() {
    let server = server(Mode::Async, vec![3.0; 16], 1, |_| {});
    let addr = start_local(&server).await;
    // An HTTP request.
    let mut http = Raw::connect(addr).await;
    http.recv().await.unwrap();
    http.s
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert!(matches!(
        http.recv().await,
        Some((
            Message::Error {
                code: ErrorCode::Protocol,
                ..
            },
            _
        ))
    ));
    // Pseudo-random bytes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..8 {
        let mut raw = Raw::connect(addr).await;
        raw.recv().await.unwrap();
        let junk: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = raw.s.write_all(&junk).await;
        assert!(raw.closed().await);
    }
    // An authenticated peer announcing a 4 GiB push: refused from the header alone.
    let mut big = Raw::register(addr, 0).await;
    let mut head = Vec::new();
    encode_head(&Message::Push(push_meta(0, 0, 1)), 0, &mut head).unwrap();
    head[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    big.s.write_all(&head).await.unwrap();
    assert!(matches!(
        big.recv().await,
        Some((
            Message::Error {
                code: ErrorCode::Protocol,
                ..
            },
            _
        ))
    ));
    // A push of the wrong length.
    let mut short = Raw::register(addr, 0).await;
    short
        .send(&Message::Push(push_meta(0, 0, 1)), &[1.0; 4])
        .await;
    assert!(matches!(
        short.recv().await,
        Some((
            Message::Error {
                code: ErrorCode::WrongLength,
                ..
            },
            _
        ))
    ));
    // A server-to-client frame sent by a client.
    let mut odd = Raw::register(addr, 0).await;
    odd.send(&Message::Bye, &[]).await;
    assert!(matches!(odd.recv().await, Some((Message::Bye, _))));
    let s = server.stats();
    assert!(s.rejected_frames >= 11, "{}", s.rejected_frames);
    assert_eq!(s.version, 0);
    assert_eq!(server.parameters().1, vec![3.0; 16]);
    // The server still serves.
    let mut ok = Raw::register(addr, 0).await;
    ok.send(&Message::Pull { newer_than: -1 }, &[]).await;
    assert!(matches!(
        ok.recv().await,
        Some((Message::Params { version: 0, .. }, _))
    ));
}

#[test]
fn client_reports_an_unreachable_server_within_its_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t0 = Instant::now();
    let err = Client::connect(
        "127.0.0.1",
        port,
        SECRET,
        0,
        0,
        ClientOptions {
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        },
    )
    .err()
    .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    match err {
        ClientError::Unavailable { addr, .. } => assert_eq!(addr, format!("127.0.0.1:{port}")),
        other => panic!("{other}"),
    }
}

#[test]
fn worker_out_of_range_and_wrong_lengths_are_refused() {
    let r = Running::start(server(Mode::Async, vec![0.0; 4], 2, |_| {}));
    let err = r.client(2, 0).err().unwrap();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{err}"
    );
    let mut c = r.client(1, 0).unwrap();
    let err = c.push(&[1.0; 3], 0, 1, 0.0, None).unwrap_err();
    assert!(matches!(err, ClientError::WrongLength { .. }));
    // A local argument error does not break the connection.
    assert!(!c.push(&[1.0; 4], 0, 1, 0.0, None).unwrap().duplicate);
}

#[test]
fn a_worker_that_leaves_no_longer_holds_up_synchronous_rounds() {
    let r = Arc::new(Running::start(server(
        Mode::Synchronous,
        vec![0.0; 4],
        3,
        |_| {},
    )));
    // Worker 2 has no data: it registers and leaves at once.
    r.client(2, 0).unwrap().close();
    let mut a = r.client(0, 0).unwrap();
    let mut b = r.client(1, 0).unwrap();
    let mut out = [0.0f32; 4];
    a.push(&[1.0; 4], 0, 1, 1.0, None).unwrap();
    // Worker 1 pushes once, then leaves mid-training: round 2 closes with worker 0 alone.
    let (_, v) = b.push_pull(&[3.0; 4], &mut out, 0, 1, 1.0, None).unwrap();
    assert_eq!(v, 1);
    assert_eq!(out, [-2.0; 4]);
    b.close();
    // Worker 0 computes its next step on version 1.
    assert_eq!(a.pull(&mut out, None).unwrap(), 1);
    let (_, v) = a.push_pull(&[1.0; 4], &mut out, 1, 1, 1.0, None).unwrap();
    assert_eq!((v, out), (2, [-3.0; 4]));
    let s = r.server.stats();
    assert_eq!((s.workers_done, s.workers_live, s.workers_lost), (2, 1, 0));
}

#[test]
fn random_retries_and_replays_never_apply_a_step_twice() {
    let r = Running::start(server(Mode::Async, vec![0.0; 8], 2, |_| {}));
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut attempts = [0u32; 2];
    let mut clients: Vec<Option<Client>> = vec![None, None];
    for _ in 0..300 {
        let w = rand(2) as usize;
        if clients[w].is_none() || rand(10) == 0 {
            // A retried task: a newer attempt, continuing from the server's resume step.
            if rand(2) == 0 {
                attempts[w] += 1;
            }
            clients[w] = Some(r.client(w as u32, attempts[w]).unwrap());
        }
        let c = clients[w].as_mut().unwrap();
        // Mostly the next step; sometimes a replay of an earlier one.
        let next = r
            .server
            .stats()
            .steps_per_worker
            .get(&(w as u32))
            .copied()
            .unwrap_or(0);
        let step = if next > 0 && rand(3) == 0 {
            rand(next)
        } else {
            next
        };
        let ack = c.push(&[1.0; 8], step, 1, 0.0, None).unwrap();
        assert_eq!(ack.duplicate, step < next);
    }
    let history = r.server.history();
    let mut seen = std::collections::HashSet::new();
    for (w, step, _, _) in &history {
        assert!(
            seen.insert((*w, *step)),
            "step {step} of worker {w} applied twice"
        );
    }
    let s = r.server.stats();
    assert_eq!(s.version as usize, history.len());
    assert_eq!(s.updates + s.duplicates, 300);
    assert_eq!(r.server.parameters().1, vec![-(history.len() as f32); 8]);
}

// ---------------------------------------------------------------------------------------------
// TLS.

/// A TCP proxy on loopback in front of `to`: forwards every connection both ways and records
/// every byte it forwards, in either direction (what an observer on the path sees).
struct RecordingProxy {
    port: u16,
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl RecordingProxy {
    fn start(to: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    break;
                };
                for (from, into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let log = log.clone();
                    std::thread::spawn(move || pump(from, into, &log));
                }
            }
        });
        Self { port, seen }
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    log: &std::sync::Mutex<Vec<u8>>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Pull and push distinctive values through a recording proxy; returns what the proxy saw and
/// checks the values arrived intact.
fn traffic_through_a_proxy(tls: bool) -> (Vec<u8>, [u8; 16], [u8; 16]) {
    const PARAM: f32 = 1_234.567_9;
    const GRAD: f32 = -0.007_812_5;
    let n = 4096;
    let r = Running::start(server(Mode::Async, vec![PARAM; n], 1, |c| {
        c.tls = tls.then(|| ServerTls::generate().unwrap());
    }));
    let proxy = RecordingProxy::start(r.addr);
    let mut c = r.client_via(proxy.port, 0, 0).unwrap();
    let mut out = vec![0f32; n];
    c.pull(&mut out, None).unwrap();
    assert!(out.iter().all(|&v| v == PARAM));
    c.push(&vec![GRAD; n], 0, 1, 0.5, None).unwrap();
    c.close();
    assert_eq!(r.server.parameters().1[0], PARAM - GRAD);
    let four = |v: f32| -> [u8; 16] {
        let b = v.to_le_bytes();
        let mut out = [0u8; 16];
        for i in 0..4 {
            out[4 * i..4 * i + 4].copy_from_slice(&b);
        }
        out
    };
    (proxy.seen(), four(PARAM), four(GRAD))
}

#[test]
fn with_tls_an_observer_on_the_path_sees_no_parameter_or_gradient() {
    // Plaintext first, so that this test can fail: the proxy does see the values there.
    let (seen, param, grad) = traffic_through_a_proxy(false);
    assert!(contains(&seen, &param) && contains(&seen, &grad));
    assert!(contains(&seen, &sparktorch_proto::MAGIC));
    let (seen, param, grad) = traffic_through_a_proxy(true);
    assert!(
        seen.len() > 2 * 4096 * 4,
        "the traffic went through the proxy"
    );
    assert!(!contains(&seen, &param), "parameters in the clear");
    assert!(!contains(&seen, &grad), "gradients in the clear");
    assert!(
        !contains(&seen, &sparktorch_proto::MAGIC),
        "frames in the clear"
    );
    // TLS records: handshake (22) first, then application data (23).
    assert_eq!(seen[0], 22);
}

#[test]
fn a_client_pinning_another_certificate_is_refused() {
    let r = Running::start(server(Mode::Async, vec![0.0; 8], 1, |c| {
        c.tls = Some(ServerTls::generate().unwrap());
    }));
    let other = ServerTls::generate().unwrap().fingerprint();
    let err = Client::connect(
        "127.0.0.1",
        r.addr.port(),
        SECRET,
        0,
        0,
        ClientOptions {
            timeout: Duration::from_secs(5),
            server_fingerprint: Some(other),
            ..ClientOptions::default()
        },
    )
    .err()
    .unwrap();
    match &err {
        ClientError::Auth { reason, .. } => assert!(reason.contains("fingerprint"), "{reason}"),
        other => panic!("expected an Auth error, got {other}"),
    }
    r.quiesce();
    let s = r.server.stats();
    assert_eq!(s.auth_failures, 1);
    assert!(s.steps_per_worker.is_empty());
    // The right pin works.
    let mut ok = r.client(0, 0).unwrap();
    ok.push(&[1.0; 8], 0, 1, 0.0, None).unwrap();
}

#[test]
fn plaintext_and_tls_peers_do_not_talk_to_each_other() {
    let tls = Running::start(server(Mode::Async, vec![0.0; 8], 1, |c| {
        c.tls = Some(ServerTls::generate().unwrap());
    }));
    let options = ClientOptions {
        timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    // A plaintext client waits for a Hello that a TLS server never sends.
    let err = Client::connect("127.0.0.1", tls.addr.port(), SECRET, 0, 0, options)
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    // A TLS client finds no TLS on a plaintext server.
    let plain = Running::start(server(Mode::Async, vec![0.0; 8], 1, |_| {}));
    let err = Client::connect(
        "127.0.0.1",
        plain.addr.port(),
        SECRET,
        0,
        0,
        ClientOptions {
            server_fingerprint: Some(tls.server.config().tls.as_ref().unwrap().fingerprint()),
            ..options
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, ClientError::Auth { .. }), "{err}");
    assert_eq!(plain.server.stats().version, 0);
}

// ---------------------------------------------------------------------------------------------
// Limits on what a peer can hold or send.

#[tokio::test]
async fn connections_that_have_not_authenticated_are_capped() {
    let server = server(Mode::Async, vec![0.0; 4], 2, |c| c.max_unauthenticated = 2);
    let addr = start_local(&server).await;
    // Two peers connect and say nothing: they hold both pre-auth slots.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(addr).await;
        assert!(matches!(raw.recv().await, Some((Message::Hello { .. }, _))));
        silent.push(raw);
    }
    // A third is not served while they hold them...
    let mut third = Raw::connect(addr).await;
    let waited = tokio::time::timeout(Duration::from_millis(300), third.recv()).await;
    assert!(waited.is_err(), "served beyond the cap: {waited:?}");
    // ...and is as soon as one of them leaves.
    drop(silent.pop());
    let hello = tokio::time::timeout(Duration::from_secs(5), third.recv()).await;
    let Ok(Some((Message::Hello { server_nonce, .. }, _))) = hello else {
        panic!("not served after a slot freed up: {hello:?}")
    };
    // An authenticated connection gives its slot back: one silent peer + one more fit.
    third
        .authenticate(SECRET, &server_nonce, [9u8; NONCE_LEN])
        .await;
    let mut fourth = Raw::connect(addr).await;
    let hello = tokio::time::timeout(Duration::from_secs(5), fourth.recv()).await;
    assert!(matches!(hello, Ok(Some((Message::Hello { .. }, _)))));
}

/// Expect an `Error` frame with `code` (the server's answer before it closes).
async fn expect_error(raw: &mut Raw, code: ErrorCode) -> String {
    match raw.recv().await {
        Some((Message::Error { code: c, message }, _)) if c == code => message,
        other => panic!("expected Error({code:?}), got {other:?}"),
    }
}

#[tokio::test]
async fn a_step_that_cannot_be_followed_is_refused_not_wrapped() {
    let server = server(Mode::Async, vec![0.0; 4], 1, |_| {});
    let addr = start_local(&server).await;
    let mut raw = Raw::register(addr, 0).await;
    raw.send(&Message::Push(push_meta(0, u64::MAX, 1)), &[1.0; 4])
        .await;
    let message = expect_error(&mut raw, ErrorCode::Protocol).await;
    assert!(message.contains("step"), "{message}");
    assert!(raw.closed().await);
    // Nothing was booked: the worker still resumes at 0, and step 0 is new.
    let s = server.stats();
    assert_eq!((s.version, s.updates), (0, 0));
    assert_eq!(s.steps_per_worker.get(&0), Some(&0));
    let mut raw = Raw::register(addr, 0).await;
    raw.send(&Message::Push(push_meta(0, u64::MAX - 1, 1)), &[1.0; 4])
        .await;
    assert!(matches!(
        raw.recv().await,
        Some((
            Message::PushAck {
                version: 1,
                duplicate: false,
                ..
            },
            _
        ))
    ));
    assert_eq!(server.stats().steps_per_worker.get(&0), Some(&u64::MAX));
}

#[tokio::test]
async fn batch_sizes_that_overflow_a_round_are_refused() {
    let server = server(Mode::Synchronous, vec![0.0; 4], 2, |_| {});
    let addr = start_local(&server).await;
    let mut a = Raw::register(addr, 0).await;
    let mut b = Raw::register(addr, 1).await;
    a.send(&Message::Push(push_meta(0, 0, u64::MAX)), &[1.0; 4])
        .await;
    assert!(matches!(a.recv().await, Some((Message::PushAck { .. }, _))));
    b.send(&Message::Push(push_meta(1, 0, 1)), &[3.0; 4]).await;
    let message = expect_error(&mut b, ErrorCode::Protocol).await;
    assert!(message.contains("batch_size"), "{message}");
    // Nothing of the refused push was booked, and the server did not fail.
    let s = server.stats();
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!((s.version, s.updates), (0, 1));
    assert_eq!(s.steps_per_worker.get(&1), Some(&0));
    // The round closes with a push that fits (the weights are u64::MAX and 0).
    let mut b = Raw::register(addr, 1).await;
    b.send(&Message::Push(push_meta(1, 0, 0)), &[3.0; 4]).await;
    assert!(matches!(
        b.recv().await,
        Some((Message::PushAck { version: 1, .. }, _))
    ));
    assert_eq!(server.parameters().1, vec![-1.0; 4]);
}

#[test]
fn a_server_that_trickles_bytes_cannot_stretch_a_call() {
    use std::io::{Read, Write};
    // A fake server: an honest handshake and registration, then a Params frame one byte every
    // 100 ms (41 bytes: 4 s), each byte well within the client's 1 s timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let frame = |msg: &Message, values: &[f32]| {
            let bytes = payload::as_wire_bytes(values);
            let mut out = Vec::new();
            encode_head(msg, bytes.len(), &mut out).unwrap();
            out.extend_from_slice(&bytes);
            out
        };
        let recv = |s: &mut std::net::TcpStream| {
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let h = decode_header(&head, MAX_PAYLOAD_BYTES).unwrap();
            let mut meta = vec![0u8; h.meta_len];
            s.read_exact(&mut meta).unwrap();
            decode_meta(&h, &meta).unwrap()
        };
        let server_nonce = [3u8; NONCE_LEN];
        s.write_all(&frame(
            &Message::Hello {
                version: sparktorch_proto::PROTOCOL_VERSION,
                server_nonce,
            },
            &[],
        ))
        .unwrap();
        let Message::Auth { client_nonce, .. } = recv(&mut s) else {
            panic!("no Auth")
        };
        let server_proof = auth::server_proof(SECRET, &server_nonce, &client_nonce);
        s.write_all(&frame(&Message::AuthOk { server_proof }, &[]))
            .unwrap();
        assert!(matches!(recv(&mut s), Message::Register { .. }));
        let registered = Message::Registered {
            num_params: 4,
            resume_step: 0,
            version: 0,
            mode: Mode::Async,
            round_timeout_ms: 1000,
        };
        s.write_all(&frame(&registered, &[])).unwrap();
        assert!(matches!(recv(&mut s), Message::Pull { .. }));
        let params = frame(
            &Message::Params {
                version: 1,
                should_stop: false,
            },
            &[1.0; 4],
        );
        for b in params {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut c = Client::connect(
        "127.0.0.1",
        port,
        SECRET,
        0,
        0,
        ClientOptions {
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let t0 = Instant::now();
    let err = c.pull(&mut [0f32; 4], None).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(took < Duration::from_millis(2500), "the call took {took:?}");
    assert!(!c.is_open());
    drop(c);
    fake.join().unwrap();
}

/// Boundary-heavy values for the numbers a client controls.
struct Hostile(u64);

impl Hostile {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn u64(&mut self) -> u64 {
        match self.next(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX - 1,
            4 => u64::from(u32::MAX) + 1,
            5 => i64::MAX as u64 + 1,
            _ => self.next(u64::MAX),
        }
    }

    fn u32(&mut self) -> u32 {
        match self.next(5) {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            _ => self.next(4) as u32,
        }
    }

    fn f64(&mut self) -> f64 {
        [0.5, f64::NAN, f64::INFINITY, -f64::INFINITY, -0.0, f64::MAX][self.next(6) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match self.next(4) {
                0 => 0,
                1 => 0xff,
                _ => self.next(256) as u8,
            })
            .collect()
    }

    /// One well-framed request with hostile contents (valid magic, version and lengths unless
    /// the case is about them), from an authenticated, registered worker 0 or 1.
    fn frame(&mut self, n: usize) -> Vec<u8> {
        let raw_head = |kind: u8, flags: u8, meta_len: usize, payload_len: usize| {
            let mut h = Vec::with_capacity(HEADER_LEN);
            h.extend_from_slice(&sparktorch_proto::MAGIC);
            h.extend_from_slice(&sparktorch_proto::PROTOCOL_VERSION.to_le_bytes());
            h.extend_from_slice(&[kind, flags]);
            h.extend_from_slice(&(meta_len as u32).to_le_bytes());
            h.extend_from_slice(&(payload_len as u32).to_le_bytes());
            h
        };
        let push = |h: &mut Self| PushMeta {
            worker: h.u32(),
            attempt: h.u32(),
            step: h.u64(),
            batch_size: h.u64(),
            loss: h.f64(),
            val_loss: h.f64(),
            base_version: h.u64(),
        };
        let encode = |msg: &Message, values: usize| {
            let mut out = Vec::new();
            encode_head(msg, values * 4, &mut out).unwrap();
            out.extend(std::iter::repeat_n(0u8, values * 4));
            out
        };
        match self.next(10) {
            // Pushes with hostile numbers, of the right length or not.
            0..=2 => {
                let mut meta = push(self);
                if self.next(2) == 0 {
                    meta.worker = self.next(2) as u32;
                    meta.attempt = 0;
                }
                let values = if self.next(4) == 0 {
                    self.next(2 * n as u64) as usize
                } else {
                    n
                };
                let msg = if self.next(2) == 0 {
                    Message::Push(meta)
                } else {
                    Message::PushPull(meta)
                };
                encode(&msg, values)
            }
            3 => encode(
                &Message::Pull {
                    newer_than: self.u64() as i64,
                },
                0,
            ),
            // Register again: in range (attempt 0, so that later cases can still register
            // as attempt 0), or out of range with any attempt.
            4 => {
                let worker = self.u32();
                let attempt = if worker < 2 { 0 } else { self.u32() };
                encode(&Message::Register { worker, attempt }, 0)
            }
            // Any kind (server-only ones included) with random meta of the right size.
            5 | 6 => {
                let kind = 1 + self.next(16) as u8;
                let k = sparktorch_proto::FrameKind::from_u8(kind).unwrap();
                let meta_len = k.meta_len().unwrap_or(4 + self.next(64) as usize);
                let values = if k.has_payload() { n } else { 0 };
                let mut out = raw_head(kind, 0, meta_len, values * 4);
                out.extend(self.bytes(meta_len));
                out.extend(std::iter::repeat_n(0u8, values * 4));
                out
            }
            // Broken headers: unknown kind, reserved flags, wrong meta length, misaligned,
            // oversized or misplaced payload lengths.
            _ => {
                let kind = [0u8, 17, 255, 6, 8][self.next(5) as usize];
                let flags = [0u8, 1, 0x80][self.next(3) as usize];
                let meta_len = [0usize, 8, 48, 9000][self.next(4) as usize];
                let payload_len =
                    [0usize, 6, n * 4, n * 4 + 4, u32::MAX as usize][self.next(5) as usize];
                let mut out = raw_head(kind, flags, meta_len, payload_len);
                out.extend(self.bytes(meta_len.min(64)));
                out
            }
        }
    }
}

/// Valid handshakes, then well-framed requests with hostile contents: every one is answered
/// (a reply, or an `Error` frame before the close), never a silent drop (a panic in the
/// connection task); the server never records a failure, and still serves afterwards.
async fn hostile_requests_after_a_valid_handshake(mode: Mode, seed: u64) {
    let n = 16;
    let server = server(mode, vec![1.0; n], 2, |c| {
        c.round_timeout = Duration::from_secs(5);
    });
    let addr = start_local(&server).await;
    let mut h = Hostile(seed);
    for case in 0..300 {
        let worker = h.next(2) as u32;
        let mut raw = Raw::register(addr, worker).await;
        let frame = h.frame(n);
        raw.s.write_all(&frame).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(600), raw.recv()).await;
        assert!(
            matches!(answer, Ok(Some(_))),
            "case {case} (mode {mode}, frame {:02x?}...): no answer ({answer:?})",
            &frame[..frame.len().min(80)]
        );
        let s = server.stats();
        assert!(
            s.error.is_none(),
            "case {case}: server failed: {:?}",
            s.error
        );
    }
    let mut ok = Raw::register(addr, 0).await;
    ok.send(&Message::Pull { newer_than: -1 }, &[]).await;
    assert!(matches!(ok.recv().await, Some((Message::Params { .. }, _))));
}

#[tokio::test(start_paused = true)]
async fn hostile_requests_after_a_valid_handshake_async() {
    hostile_requests_after_a_valid_handshake(Mode::Async, 0x9E37_79B9_7F4A_7C15).await;
}

#[tokio::test(start_paused = true)]
async fn hostile_requests_after_a_valid_handshake_synchronous() {
    hostile_requests_after_a_valid_handshake(Mode::Synchronous, 0x2545_F491_4F6C_DD1D).await;
}

#[tokio::test(start_paused = true)]
async fn hostile_requests_after_a_valid_handshake_hogwild() {
    hostile_requests_after_a_valid_handshake(Mode::Hogwild, 0xD1B5_4A32_D192_ED03).await;
}

// Checkpoints and resume, end to end (a submodule so that the crate keeps one integration-test
// binary).
mod checkpoint;
