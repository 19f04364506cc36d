//! The `relay` binary: not implemented yet; exits with a clear message.

fn main() -> std::process::ExitCode {
    eprintln!("{}", relay::STATUS);
    std::process::ExitCode::from(2)
}
