//! The harness the end-to-end tests share: servers on their own runtime, blocking clients,
//! and a minimal async client speaking raw frames.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sparktorch_optim::{build, HyperValue};
use sparktorch_proto::{
    auth, decode_header, decode_meta, encode_head, payload, Message, Mode, PushMeta, HEADER_LEN,
    MAX_PAYLOAD_BYTES, NONCE_LEN,
};
use sparktorch_ps::{Client, ClientError, ClientOptions, PsError, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const SECRET: &[u8] = b"test-secret-0123456789";

pub fn server(
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
    server_with(mode, params, num_workers, opt, tweak)
}

/// [`server`] with another optimizer.
pub fn server_with(
    mode: Mode,
    params: Vec<f32>,
    num_workers: u32,
    opt: Box<dyn sparktorch_optim::Optimizer>,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Server {
    let mut config = ServerConfig::new(SECRET, mode);
    config.num_workers = num_workers;
    tweak(&mut config);
    let layout = vec![("w".to_string(), vec![params.len()])];
    Server::new(params, layout, opt, config).unwrap()
}

/// A server running on its own runtime; stopped and joined on drop.
pub struct Running {
    pub server: Server,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), PsError>>>,
    rt: tokio::runtime::Runtime,
}

impl Running {
    pub fn start(server: Server) -> Self {
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
        });
        Self {
            server,
            addr,
            stop: Some(stop),
            task: Some(task),
            rt,
        }
    }

    pub fn client(&self, worker: u32, attempt: u32) -> Result<Client, ClientError> {
        self.client_via(self.addr.port(), worker, attempt)
    }

    /// A client connecting to `port` (the server's, or a proxy's in front of it), with TLS
    /// and the server's fingerprint when the server has TLS.
    pub fn client_via(&self, port: u16, worker: u32, attempt: u32) -> Result<Client, ClientError> {
        Client::connect(
            "127.0.0.1",
            port,
            SECRET,
            worker,
            attempt,
            ClientOptions {
                timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(2),
                server_fingerprint: self.server.config().tls.as_ref().map(|t| t.fingerprint()),
                ..ClientOptions::default()
            },
        )
    }

    /// Stop the server and return what `run` returned.
    pub fn stop(mut self) -> Result<(), PsError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().expect("running");
        self.rt.block_on(task).expect("the server task panicked")
    }

    /// Wait (bounded) until the server has closed every connection.
    pub fn quiesce(&self) {
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

pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            s: TcpStream::connect(addr).await.unwrap(),
        }
    }

    pub async fn send(&mut self, msg: &Message, values: &[f32]) {
        let bytes = payload::as_wire_bytes(values);
        let mut out = Vec::new();
        encode_head(msg, bytes.len(), &mut out).unwrap();
        out.extend_from_slice(&bytes);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<(Message, Vec<f32>)> {
        let mut head = [0u8; HEADER_LEN];
        self.s.read_exact(&mut head).await.ok()?;
        let h = decode_header(&head, MAX_PAYLOAD_BYTES).unwrap();
        let mut meta = vec![0u8; h.meta_len];
        self.s.read_exact(&mut meta).await.unwrap();
        let mut body = vec![0u8; h.payload_len];
        self.s.read_exact(&mut body).await.unwrap();
        Some((decode_meta(&h, &meta).unwrap(), payload::decode_f32s(&body)))
    }

    pub async fn handshake(addr: SocketAddr, secret: &[u8]) -> Self {
        let mut raw = Self::connect(addr).await;
        let Some((Message::Hello { server_nonce, .. }, _)) = raw.recv().await else {
            panic!("no hello")
        };
        raw.authenticate(secret, &server_nonce, [7u8; NONCE_LEN])
            .await;
        raw
    }

    /// Answer the server's `Hello` (its `server_nonce`) with a proof of `secret`; assert `AuthOk`.
    pub async fn authenticate(
        &mut self,
        secret: &[u8],
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: [u8; NONCE_LEN],
    ) {
        let proof = auth::client_proof(secret, server_nonce, &client_nonce);
        self.send(
            &Message::Auth {
                client_nonce,
                proof,
            },
            &[],
        )
        .await;
        assert!(matches!(
            self.recv().await,
            Some((Message::AuthOk { .. }, _))
        ));
    }

    pub async fn register(addr: SocketAddr, worker: u32) -> Self {
        let mut raw = Self::handshake(addr, SECRET).await;
        raw.send(&Message::Register { worker, attempt: 0 }, &[])
            .await;
        assert!(matches!(
            raw.recv().await,
            Some((Message::Registered { .. }, _))
        ));
        raw
    }

    /// True once the server has closed the connection: whatever it still sent is drained and
    /// the stream ends (EOF, or a reset for bytes it did not read) within 60 s; false if it
    /// stays open. (On a paused clock the 60 s elapse as soon as nothing else can happen.)
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(60), self.s.read_to_end(&mut rest)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Err(_) => false,
        }
    }
}

pub fn push_meta(worker: u32, step: u64, batch_size: u64) -> PushMeta {
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

/// A push of a gradient computed on parameters version `base`.
pub fn push_on(worker: u32, step: u64, batch_size: u64, base: u64) -> PushMeta {
    PushMeta {
        base_version: base,
        ..push_meta(worker, step, batch_size)
    }
}

pub async fn start_local(server: &Server) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.run(listener, std::future::pending()).await });
    addr
}
