//! The `sparktorch-ps` binary, run as a user would.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sparktorch-ps"))
}

#[test]
fn bench_runs_every_op_over_loopback() {
    let out = bin()
        .args([
            "bench",
            "--params",
            "1000",
            "--clients",
            "2",
            "--seconds",
            "0.2",
        ])
        .env("SPARKTORCH_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in ["push ", "pull ", "push_pull "] {
        assert!(stdout.lines().any(|l| l.starts_with(op)), "{stdout}");
    }
}

#[test]
fn bench_synchronous_push_pull() {
    let out = bin()
        .args([
            "bench",
            "--params",
            "100",
            "--clients",
            "2",
            "--seconds",
            "0.2",
            "--mode",
            "synchronous",
            "--ops",
            "push_pull",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inspect_says_checkpoints_are_not_supported_yet() {
    let out = bin().args(["inspect", "model.ckpt"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not yet supported"));
}

#[test]
fn serve_without_a_secret_fails_clearly() {
    let out = bin()
        .args([
            "serve",
            "--params",
            "10",
            "--secret-env",
            "SPARKTORCH_TEST_UNSET_SECRET",
        ])
        .env_remove("SPARKTORCH_TEST_UNSET_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SPARKTORCH_TEST_UNSET_SECRET"));
}

#[test]
fn serve_prints_its_address_and_serves_clients() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let secret = "cli-test-secret-0123456789";
    let mut child = bin()
        .args(["serve", "--params", "16", "--lr", "1.0", "--seed", "3"])
        .env("SPARKTORCH_SECRET", secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let result = std::panic::catch_unwind(|| {
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let mut c = sparktorch_ps::Client::connect(
            "127.0.0.1",
            port,
            secret.as_bytes(),
            0,
            0,
            sparktorch_ps::ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(c.num_params(), 16);
        let mut before = vec![0f32; 16];
        c.pull(&mut before, None).unwrap();
        assert!(before.iter().all(|v| v.abs() <= 0.05) && before.iter().any(|v| *v != 0.0));
        c.push(&[1.0; 16], 0, 1, 0.5, None).unwrap();
        let mut after = vec![0f32; 16];
        assert_eq!(c.pull(&mut after, None).unwrap(), 1);
        for (a, b) in after.iter().zip(&before) {
            assert_eq!(*a, b - 1.0);
        }
        c.close();
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
