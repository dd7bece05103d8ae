// The server_session target's harness and checks, shared by the cargo-fuzz target
// (fuzz_targets/server_session.rs) and the corpus replay that `cargo nextest` runs
// (crates/sparktorch-ps/tests/fuzz_corpus.rs), through `include!`.

use std::time::Duration;

use sparktorch_optim::HyperValue;
use sparktorch_proto::{auth, encode_head, Decoded, Decoder, Message, Mode, MAX_PAYLOAD_BYTES};
use sparktorch_ps::{LostWorkerPolicy, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The secret of the fuzzed server.
const SECRET: &[u8] = b"fuzz-secret-0123456789";

/// Parameters of the fuzzed model (small: pushes are cheap, and any payload bound is tiny).
const N: usize = 8;

/// Bound on the harness' own waits (paused clock: elapses only when nothing else can happen).
const HARNESS_WAIT: Duration = Duration::from_secs(3600);

/// Everything one input is checked for (the fuzz target's body).
pub fn check(data: &[u8]) {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(session(control, bytes));
}

fn server(mode: Mode) -> Server {
    let opt = sparktorch_optim::build("SGD", &vec![("lr".to_string(), HyperValue::Float(0.5))], N)
        .expect("optimizer");
    let mut config = ServerConfig::new(SECRET, mode);
    config.num_workers = 2;
    config.round_timeout = Duration::from_secs(2);
    config.lost_worker_policy = LostWorkerPolicy::Drop;
    Server::new(vec![0.25; N], vec![], opt, config).expect("server")
}

/// Read one whole frame (the harness' side of the handshake).
async fn read_frame(r: &mut DuplexStream) -> Option<Message> {
    let decoder = Decoder::new(4 * N);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Ok(Decoded::Frame { frame, .. }) = decoder.decode(&buf) {
            return Some(frame.message);
        }
        let n = tokio::time::timeout(HARNESS_WAIT, r.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write(w: &mut DuplexStream, msg: &Message) {
    let mut out = Vec::new();
    encode_head(msg, 0, &mut out).expect("encodes");
    let _ = w.write_all(&out).await;
}

/// The honest client's side: handshake (checking the server's proof), then, unless `register`
/// is `None`, register as `(worker, attempt)`.
async fn honest(c: &mut DuplexStream, register: Option<(u32, u32)>) -> bool {
    let Some(Message::Hello { server_nonce, .. }) = read_frame(c).await else {
        return false;
    };
    let client_nonce = [7u8; 32];
    let proof = auth::client_proof(SECRET, &server_nonce, &client_nonce);
    write(
        c,
        &Message::Auth {
            client_nonce,
            proof,
        },
    )
    .await;
    let Some(Message::AuthOk { server_proof }) = read_frame(c).await else {
        return false;
    };
    assert!(auth::verify_server_proof(
        SECRET,
        &server_nonce,
        &client_nonce,
        &server_proof
    ));
    let Some((worker, attempt)) = register else {
        return true;
    };
    write(c, &Message::Register { worker, attempt }).await;
    matches!(read_frame(c).await, Some(Message::Registered { .. }))
}

async fn session(control: u8, bytes: &[u8]) {
    let mode = match control & 3 {
        1 => Mode::Hogwild,
        2 => Mode::Synchronous,
        _ => Mode::Async,
    };
    let server = server(mode);
    let (mut client, end) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    let task = tokio::spawn(async move { s.serve_io(end).await });
    if control & 4 == 0 {
        let register = (control & 8 == 0).then_some((0, 0));
        assert!(
            honest(&mut client, register).await,
            "honest handshake failed"
        );
    }
    let (mut rd, mut wr) = tokio::io::split(client);
    // Drain and check everything the server sends, concurrently with our writes.
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(HARNESS_WAIT, rd.read_to_end(&mut all)).await;
        all
    });
    let _ = wr.write_all(bytes).await;
    let _ = wr.shutdown().await;
    drop(wr);
    let served = tokio::time::timeout(HARNESS_WAIT, task).await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the connection task failed: {e}"),
        Err(_) => panic!("the connection did not end after the client closed"),
    }
    let sent = reader.await.expect("reader");
    // Everything the server sent is a sequence of valid frames (a last one may be cut short
    // only if the server gave up writing, which it does not do here).
    let decoder = Decoder::new(MAX_PAYLOAD_BYTES);
    let mut at = 0;
    while at < sent.len() {
        match decoder.decode(&sent[at..]) {
            Ok(Decoded::Frame { consumed, .. }) => at += consumed,
            other => panic!("the server sent bytes that are not a frame: {other:?}"),
        }
    }
    let stats = server.stats();
    assert!(
        stats.error.is_none(),
        "the server failed: {:?}",
        stats.error
    );
    // The server still serves an honest client (nothing left locked or waiting).
    let (mut c, end) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    let task = tokio::spawn(async move { s.serve_io(end).await });
    // (The newest possible attempt: the fuzzed bytes may have registered newer attempts.)
    assert!(
        honest(&mut c, Some((1, u32::MAX))).await,
        "an honest client is refused afterwards"
    );
    write(&mut c, &Message::Pull { newer_than: -1 }).await;
    assert!(matches!(
        read_frame(&mut c).await,
        Some(Message::Params { .. })
    ));
    drop(c);
    let _ = tokio::time::timeout(HARNESS_WAIT, task).await;
}
