//! The `sparktorch-ps` binary, run as a user would.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sparktorch-ps"))
}

/// Run `sparktorch-ps bench <args>` (logging at warn), require success, return its stdout.
fn bench(args: &[&str]) -> String {
    let out = bin()
        .arg("bench")
        .args(args)
        .env("SPARKTORCH_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn bench_runs_every_op_over_loopback() {
    let stdout = bench(&[
        "--params",
        "1000",
        "--clients",
        "2",
        "--seconds",
        "0.2",
        "--reps",
        "2",
        "--loopback",
        "--dtype",
        "bfloat16",
    ]);
    let medians = stdout
        .split("medians over 2 repetition(s):")
        .nth(1)
        .unwrap_or_else(|| panic!("{stdout}"));
    for op in [
        "push ",
        "pull ",
        "push_pull ",
        "raw stream ",
        "raw stream, model-sized buffers",
        "raw push+pull exchange",
        "raw full-duplex exchange",
    ] {
        assert!(
            medians.lines().any(|l| l.trim_start().starts_with(op)),
            "{stdout}"
        );
    }
    assert!(medians.contains("x the raw exchange's time"), "{stdout}");
    assert!(
        medians.contains("x the raw full-duplex exchange's"),
        "{stdout}"
    );
    assert!(
        stdout.contains("on the wire 0.0 MB as bfloat16"),
        "{stdout}"
    );
    // Every measured line says how busy the CPU was (process cores, machine share).
    let row = stdout
        .lines()
        .find(|l| l.starts_with("1    push_pull"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.trim_end().ends_with('%'), "{row}");
}

#[test]
fn bench_compares_float32_and_bfloat16_in_pairs() {
    let stdout = bench(&[
        "--params",
        "1000",
        "--seconds",
        "0.2",
        "--reps",
        "3",
        "--ops",
        "pull,push_pull",
        "--dtype",
        "both",
    ]);
    for case in [
        "pull float32",
        "pull bfloat16",
        "push_pull float32",
        "push_pull bfloat16",
    ] {
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.get(5..).is_some_and(|r| r.starts_with(case)))
                .count(),
            3,
            "{case}: one row per repetition\n{stdout}"
        );
    }
    for op in ["pull", "push_pull"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{op}: bfloat16 takes")))
            .unwrap_or_else(|| panic!("{op}\n{stdout}"));
        let pairs = line.split("pairs: ").nth(1).unwrap_or_default();
        assert_eq!(pairs.split(", ").count(), 3, "{line}");
    }
    // One server per dtype, each of which stepped (push_pull).
    for d in ["float32", "bfloat16"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("server ({d}): ")))
            .unwrap_or_else(|| panic!("{d}\n{stdout}"));
        assert!(!line.contains(": 0 steps"), "{line}");
    }
    assert!(bin()
        .args(["bench", "--params", "10", "--dtype", "float16"])
        .output()
        .unwrap()
        .stderr
        .windows(5)
        .any(|w| w == b"both,"));
}

#[test]
fn bench_synchronous_push_pull() {
    bench(&[
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
    ]);
}

/// `--json`: stdout is one JSON document and nothing else, with the configuration, a row per
/// repetition and operation, and a median per operation, every value under a named field
/// (`benchmarks/run_all.py` and `report.py` read exactly these fields).
#[test]
fn bench_json_is_one_document_with_named_fields() {
    let stdout = bench(&[
        "--params",
        "1000",
        "--clients",
        "2",
        "--seconds",
        "0.1",
        "--reps",
        "2",
        "--ops",
        "pull,push",
        "--loopback",
        "--json",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["schema"], sparktorch_cli::bench::JSON_SCHEMA);
    for unit in ["ops_per_s", "ms_per_op_per_client", "mb_per_s", "cpu_cores"] {
        assert!(v["units"][unit].is_string(), "{unit}: {v}");
    }
    let c = &v["config"];
    assert_eq!(c["params"], 1000);
    assert_eq!(c["clients"], 2);
    assert_eq!(c["seconds"], 0.1);
    assert_eq!(c["mode"], "async");
    assert_eq!(c["ops"], serde_json::json!(["pull", "push"]));
    assert_eq!(c["dtypes"], serde_json::json!(["float32"]));
    assert_eq!(c["reps"], 2);
    // Per repetition: 4 baselines (op null) and the 2 operations.
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * (4 + 2), "{v}");
    let ops: Vec<&serde_json::Value> = rows.iter().filter(|r| !r["op"].is_null()).collect();
    assert_eq!(ops.len(), 4, "{v}");
    for r in ops {
        assert!(r["ops_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ms_per_op_per_client"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["mb_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["dtype"], "float32");
    }
    let medians = v["medians"].as_array().unwrap();
    let names: Vec<&str> = medians.iter().map(|m| m["op"].as_str().unwrap()).collect();
    assert_eq!(names, ["pull", "push"]);
    for m in medians {
        for field in ["ops_per_s", "ms_per_op_per_client", "mb_per_s"] {
            assert!(m[field].as_f64().unwrap() > 0.0, "{field}: {m}");
        }
    }
    assert!(v["baselines"]["raw_stream_mb_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["servers"][0]["dtype"], "float32");
    assert!(v["servers"][0]["steps"].as_u64().unwrap() > 0);
}

/// A real checkpoint: an async Adam server after two steps of worker 0.
fn write_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    use sparktorch_optim::HyperValue;
    use sparktorch_ps::{Mode, Server, ServerConfig};
    let opt =
        sparktorch_optim::build("Adam", &vec![("lr".into(), HyperValue::Float(0.1))], 6).unwrap();
    let layout = vec![("w".to_string(), vec![2, 2]), ("b".to_string(), vec![2])];
    let server = Server::new(
        vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5],
        layout,
        opt,
        ServerConfig::new(b"cli-test-secret-0123".to_vec(), Mode::Async),
    )
    .unwrap();
    server.save_checkpoint(dir).unwrap().1
}

#[test]
fn inspect_prints_a_checkpoint_as_a_table_and_as_json() {
    let dir = std::env::temp_dir().join(format!("spt-cli-inspect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = write_checkpoint(&dir);
    let out = bin().args(["inspect"]).arg(&dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "mode            async",
        "Adam",
        "parameters",
        "w ",
        "[2, 2]",
        "l2",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing in:\n{stdout}");
    }
    let out = bin()
        .args(["inspect", "--json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["optimizer"], "Adam");
    assert_eq!(v["num_params"], 6);
    assert_eq!(v["params"][0]["name"], "w");
    assert_eq!(v["params"][0]["max"], 4.0);
    assert_eq!(v["params"][1]["l2"], (1.25f64).sqrt());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_refuses_a_corrupt_file_with_its_name() {
    let file = std::env::temp_dir().join(format!(
        "spt-cli-corrupt-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&file, b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
    let out = bin().args(["inspect"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spt-cli-corrupt") && stderr.contains("invalid"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
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
