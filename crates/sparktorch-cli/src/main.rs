//! The `sparktorch-ps` binary: see the library crate (`sparktorch_cli::run`).

fn main() -> std::process::ExitCode {
    let code = sparktorch_cli::run(std::env::args_os());
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
