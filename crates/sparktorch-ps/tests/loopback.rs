//! The server and client over loopback (port 0), end to end.
//!
//! Blocking-client tests run the server on a small multi-thread runtime and the clients on
//! plain threads. Timeout tests run everything on one paused-clock runtime with a minimal async
//! client speaking raw frames, so that round and handshake timeouts elapse instantly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sparktorch_optim::{build, HyperValue};
use sparktorch_proto::{
    auth, decode_header, decode_meta, encode_head, payload, ErrorCode, Message, Mode, PushMeta,
    HEADER_LEN, MAX_PAYLOAD_BYTES, NONCE_LEN,
};
use sparktorch_ps::{Client, ClientError, ClientOptions, LostWorkerPolicy, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const SECRET: &[u8] = b"test-secret-0123456789";

fn server(
    mode: Mode,
    params: Vec<f32>,
    num_workers: u32,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Server {
    let opt = build(
        "SGD",
        &vec![("lr".into(), HyperValue::Float(1.0))],
        params.len(),
    )
    .unwrap();
    let mut config = ServerConfig::new(SECRET, mode);
    config.num_workers = num_workers;
    tweak(&mut config);
    let layout = vec![("w".to_string(), vec![params.len()])];
    Server::new(params, layout, opt, config).unwrap()
}

/// A server running on its own runtime; stopped and joined on drop.
struct Running {
    server: Server,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl Running {
    fn start(server: Server) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let s = server.clone();
        let task = rt.spawn(async move {
            s.run(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            server,
            addr,
            stop: Some(stop),
            task: Some(task),
            rt,
        }
    }

    fn client(&self, worker: u32, attempt: u32) -> Result<Client, ClientError> {
        Client::connect(
            "127.0.0.1",
            self.addr.port(),
            SECRET,
            worker,
            attempt,
            ClientOptions {
                timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(2),
            },
        )
    }

    /// Wait (bounded) until the server has closed every connection.
    fn quiesce(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.server.stats().connections > 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(self.server.stats().connections, 0);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = self.rt.block_on(t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal async client speaking raw frames.

struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            s: TcpStream::connect(addr).await.unwrap(),
        }
    }

    async fn send(&mut self, msg: &Message, values: &[f32]) {
        let bytes = payload::as_wire_bytes(values);
        let mut out = Vec::new();
        encode_head(msg, bytes.len(), &mut out).unwrap();
        out.extend_from_slice(&bytes);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or `None` when the server closed the connection.
    async fn recv(&mut self) -> Option<(Message, Vec<f32>)> {
        let mut head = [0u8; HEADER_LEN];
        self.s.read_exact(&mut head).await.ok()?;
        let h = decode_header(&head, MAX_PAYLOAD_BYTES).unwrap();
        let mut meta = vec![0u8; h.meta_len];
        self.s.read_exact(&mut meta).await.unwrap();
        let mut body = vec![0u8; h.payload_len];
        self.s.read_exact(&mut body).await.unwrap();
        Some((decode_meta(&h, &meta).unwrap(), payload::decode_f32s(&body)))
    }

    async fn handshake(addr: SocketAddr, secret: &[u8]) -> Self {
        let mut raw = Self::connect(addr).await;
        let Some((Message::Hello { server_nonce, .. }, _)) = raw.recv().await else {
            panic!("no hello")
        };
        let client_nonce = [7u8; NONCE_LEN];
        let proof = auth::client_proof(secret, &server_nonce, &client_nonce);
        raw.send(
            &Message::Auth {
                client_nonce,
                proof,
            },
            &[],
        )
        .await;
        assert!(matches!(
            raw.recv().await,
            Some((Message::AuthOk { .. }, _))
        ));
        raw
    }

    async fn register(addr: SocketAddr, worker: u32) -> Self {
        let mut raw = Self::handshake(addr, SECRET).await;
        raw.send(&Message::Register { worker, attempt: 0 }, &[])
            .await;
        assert!(matches!(
            raw.recv().await,
            Some((Message::Registered { .. }, _))
        ));
        raw
    }

    /// True once the server has closed the connection (drains whatever it sent until EOF).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest).await;
        true
    }
}

fn push_meta(worker: u32, step: u64, batch_size: u64) -> PushMeta {
    PushMeta {
        worker,
        attempt: 0,
        step,
        batch_size,
        loss: 1.0,
        val_loss: f64::NAN,
        base_version: 0,
    }
}

async fn start_local(server: &Server) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.run(listener, std::future::pending()).await });
    addr
}

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
    // Relaxed element-wise updates may lose some increments, never invent any.
    assert!(params.iter().all(|&p| (-200.0..=-1.0).contains(&p)));
    assert_eq!(r.server.stats().updates, 200);
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
    a.send(&Message::Push(push_meta(0, 1, 2)), &[1.0; 4]).await;
    assert!(matches!(
        a.recv().await,
        Some((Message::PushAck { version: 2, .. }, _))
    ));
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

// Checkpoints and resume, end to end (a submodule so that the crate keeps one integration-test
// binary).
mod checkpoint;
