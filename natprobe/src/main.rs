//! The `natprobe` binary: not implemented yet; exits with a clear message.

fn main() -> std::process::ExitCode {
    eprintln!("{}", natprobe::STATUS);
    std::process::ExitCode::from(2)
}
