//! The `peer` binary: not implemented yet; exits with a clear message.

fn main() -> std::process::ExitCode {
    eprintln!("{}", peer::STATUS);
    std::process::ExitCode::from(2)
}
