//! Writes the seed corpora of the fuzz targets, encoded by the protocol crate itself:
//! `frame_decoder` gets one valid frame of every kind (and a valid handshake exchange);
//! `server_session` (second directory, optional) gets a control byte per state (see that
//! target) followed by a worker's typical conversations.
//!
//! ```text
//! cargo run -p sparktorch-ps --example fuzz_corpus -- \
//!     crates/sparktorch-proto/fuzz/corpus/frame_decoder crates/sparktorch-proto/fuzz/corpus/server_session
//! ```

use sparktorch_proto::{auth, ErrorCode, Frame, Message, Mode, PushMeta, PROTOCOL_VERSION};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: fuzz_corpus <output directory>")?;
    std::fs::create_dir_all(&dir)?;
    let secret = b"fuzz-secret-0123456789";
    let server_nonce = [3u8; 32];
    let client_nonce = [7u8; 32];
    let meta = PushMeta {
        worker: 1,
        attempt: 0,
        step: 5,
        batch_size: 32,
        loss: 0.5,
        val_loss: f64::NAN,
        base_version: 4,
    };
    let payload = vec![0.25f32, -1.0, 3.5, f32::NAN];
    let frames: Vec<(&str, Message, Vec<f32>)> = vec![
        (
            "hello",
            Message::Hello {
                version: PROTOCOL_VERSION,
                server_nonce,
            },
            vec![],
        ),
        (
            "auth",
            Message::Auth {
                client_nonce,
                proof: auth::client_proof(secret, &server_nonce, &client_nonce),
            },
            vec![],
        ),
        (
            "auth_ok",
            Message::AuthOk {
                server_proof: auth::server_proof(secret, &server_nonce, &client_nonce),
            },
            vec![],
        ),
        (
            "register",
            Message::Register {
                worker: 2,
                attempt: 1,
            },
            vec![],
        ),
        (
            "registered",
            Message::Registered {
                num_params: 4,
                resume_step: 3,
                version: 9,
                mode: Mode::Synchronous,
                round_timeout_ms: 600_000,
            },
            vec![],
        ),
        ("pull", Message::Pull { newer_than: -1 }, vec![]),
        ("pull_newer", Message::Pull { newer_than: 12 }, vec![]),
        (
            "params",
            Message::Params {
                version: 9,
                should_stop: false,
            },
            payload.clone(),
        ),
        ("push", Message::Push(meta), payload.clone()),
        ("push_pull", Message::PushPull(meta), payload.clone()),
        (
            "push_ack",
            Message::PushAck {
                version: 10,
                should_stop: true,
                duplicate: false,
                stale: false,
            },
            vec![],
        ),
        ("stats_request", Message::StatsRequest, vec![]),
        (
            "stats",
            Message::Stats {
                version: 10,
                updates: 11,
                workers_live: 2,
                should_stop: false,
                best_loss: 0.125,
            },
            vec![],
        ),
        ("early_stop_request", Message::EarlyStopRequest, vec![]),
        (
            "early_stop",
            Message::EarlyStop {
                should_stop: false,
                best_loss: f64::NAN,
                bad_evaluations: 2,
            },
            vec![],
        ),
        ("bye", Message::Bye, vec![]),
        (
            "error",
            Message::error(ErrorCode::StaleAttempt, "worker 1 attempt 0 is stale"),
            vec![],
        ),
    ];
    let mut handshake = Vec::new();
    for (name, message, payload) in frames {
        let bytes = Frame { message, payload }.encode()?;
        if matches!(name, "hello" | "auth" | "auth_ok" | "register") {
            handshake.extend_from_slice(&bytes);
        }
        std::fs::write(format!("{dir}/seed-{name}"), bytes)?;
    }
    // A whole client conversation's first frames back to back (the decoder loops over them).
    std::fs::write(format!("{dir}/seed-handshake-stream"), handshake)?;
    if let Some(session_dir) = std::env::args().nth(2) {
        session_seeds(&session_dir, meta)?;
    }
    Ok(())
}

/// Seeds of `server_session`: control byte (mode and state) + requests of a model of 8
/// parameters, as worker 0 sends them after the harness registered it.
fn session_seeds(dir: &str, meta: PushMeta) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let grads = vec![0.5f32; 8];
    let push = |step: u64| PushMeta {
        worker: 0,
        attempt: 0,
        step,
        ..meta
    };
    let frame = |message: Message, payload: &[f32]| {
        Frame {
            message,
            payload: payload.to_vec(),
        }
        .encode()
    };
    let mut training = Vec::new();
    training.extend(frame(Message::Pull { newer_than: -1 }, &[])?);
    training.extend(frame(Message::Push(push(0)), &grads)?);
    training.extend(frame(Message::PushPull(push(1)), &grads)?);
    training.extend(frame(Message::Push(push(1)), &grads)?); // a replay
    training.extend(frame(Message::Pull { newer_than: 1 }, &[])?);
    training.extend(frame(Message::StatsRequest, &[])?);
    training.extend(frame(Message::EarlyStopRequest, &[])?);
    training.extend(frame(Message::Bye, &[])?);
    // Both workers of a synchronous round on one connection: worker 0 pushes, the connection
    // registers as worker 1 and pushes: the round closes (batch sizes are summed).
    let mut round = frame(Message::Push(push(0)), &grads)?;
    round.extend(frame(
        Message::Register {
            worker: 1,
            attempt: 0,
        },
        &[],
    )?);
    round.extend(frame(
        Message::PushPull(PushMeta {
            worker: 1,
            batch_size: 7,
            ..push(0)
        }),
        &grads,
    )?);
    round.extend(frame(Message::Pull { newer_than: 0 }, &[])?);
    let mut reregister = frame(
        Message::Register {
            worker: 1,
            attempt: 3,
        },
        &[],
    )?;
    reregister.extend(frame(
        Message::PushPull(PushMeta {
            worker: 1,
            attempt: 3,
            ..push(0)
        }),
        &grads,
    )?);
    let hello_back = frame(
        Message::Hello {
            version: PROTOCOL_VERSION,
            server_nonce: [1; 32],
        },
        &[],
    )?;
    let register = frame(
        Message::Register {
            worker: 0,
            attempt: 0,
        },
        &[],
    )?;
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("async-training", 0, training.clone()),
        ("hogwild-training", 1, training.clone()),
        ("sync-training", 2, training),
        ("async-reregister", 0, reregister.clone()),
        ("sync-reregister", 2, reregister),
        ("sync-round", 2, round.clone()),
        ("async-two-workers", 0, round),
        ("unauthenticated-register", 4, register.clone()),
        ("unauthenticated-hello", 4, hello_back),
        ("unregistered-register", 8, register),
    ];
    for (name, control, body) in seeds {
        let mut bytes = vec![control];
        bytes.extend(body);
        std::fs::write(format!("{dir}/seed-{name}"), bytes)?;
    }
    Ok(())
}
