//! The `dbh` binary: everything lives in the library (`dbh::main`).
fn main() -> std::process::ExitCode {
    dbh::main()
}
